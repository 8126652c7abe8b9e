"""What feeds the training loop: each epoch's batches, each batch's parts on the device, the correct count.

:func:`train_batches` redraws a DataLoader's order each epoch from ``seed + epoch`` (sharded by a
DistributedSampler under DDP, as :class:`fxtucker.distributed.Dist` says), :func:`eval_batches`
gives each rank a strided share of the evaluation data, :func:`split_batch` and :func:`to_device`
turn one batch into (input, label) on the device, :func:`count_correct` counts top-1 hits and
:func:`batch_sums` is what a training batch adds to its epoch's record. With the channels-last
format, :func:`model_to_channels_last` puts the model in it as :func:`to_device` puts the batches,
and :func:`restore_strides` undoes it.
Anything that is not a DataLoader over a map-style dataset with a plain sampler is used as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)
from torch.utils.data.distributed import DistributedSampler

from fxtucker.distributed import Dist
from fxtucker.passes.memory_format import model_to_channels_last, restore_strides

__all__ = [
    "check_train_data",
    "warn_unsharded",
    "train_batches",
    "eval_batches",
    "split_batch",
    "to_device",
    "model_to_channels_last",
    "restore_strides",
    "count_correct",
    "batch_sums",
]


def check_train_data(train_data: object, epochs: int) -> None:
    """Raise unless ``train_data`` is a re-iterable, non-empty source of batches."""
    if isinstance(train_data, (torch.Tensor, str, bytes)) or not isinstance(train_data, Iterable):
        raise TypeError(
            f"train: train_data must be an iterable of (input, label) batches such as a "
            f"DataLoader or a list of pairs, got {type(train_data).__name__}"
        )
    try:
        size = len(train_data)  # type: ignore[arg-type]
    except TypeError:
        size = None
    if size == 0:
        raise ValueError(
            f"train: train_data ({type(train_data).__name__}) is empty, so there is nothing "
            f"to train on; pass a DataLoader or a list with at least one (input, label) batch"
        )
    if isinstance(train_data, Iterator) and epochs > 1:
        raise ValueError(
            f"train: train_data is an iterator ({type(train_data).__name__}), which is used up "
            f"after one epoch, but config.epochs is {epochs}; pass something that can be "
            f"iterated again (a DataLoader or a list of batches)"
        )


def warn_unsharded(train_data: Iterable, ctx: Dist) -> None:
    """Under DDP, warn (on rank 0) when every rank would iterate all of ``train_data``."""
    if ctx.active and ctx.main and not _rebuildable(train_data) and not isinstance(
        getattr(train_data, "sampler", None), DistributedSampler
    ):
        warnings.warn(
            f"train: train_data ({type(train_data).__name__}) is not a DataLoader over a "
            f"map-style dataset with a plain sampler, so fxtucker cannot shard it: each of the "
            f"{ctx.world} ranks iterates all of it. Pass a DataLoader(dataset, shuffle=...) or "
            f"give it a DistributedSampler",
            stacklevel=3,  # train()'s caller
        )


def _rebuildable(data: object) -> bool:
    """Whether ``data`` is a DataLoader whose order train can redraw each epoch."""
    return (
        isinstance(data, DataLoader)
        and not isinstance(data.dataset, IterableDataset)
        and data.batch_size is not None
        and type(data.batch_sampler) is BatchSampler
        and type(data.sampler) in (RandomSampler, SequentialSampler)
    )


def _loader_kwargs(loader: DataLoader) -> dict:
    """The arguments to build a DataLoader that batches like ``loader``."""
    kw = dict(
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
    )
    if loader.num_workers > 0:
        kw.update(prefetch_factor=loader.prefetch_factor,
                  persistent_workers=loader.persistent_workers)
    if hasattr(loader, "in_order"):
        kw["in_order"] = loader.in_order
    return kw


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def train_batches(data: Iterable, seed: int, epoch: int, ctx: Dist) -> Iterable:
    """The batches of one epoch: a DataLoader's order redrawn from ``seed + epoch`` (and its dataset's
    augmentation, when it has ``set_epoch``, set to ``epoch``)."""
    dataset = getattr(data, "dataset", None)
    if callable(getattr(dataset, "set_epoch", None)):
        dataset.set_epoch(epoch)
    if not _rebuildable(data):
        sampler = getattr(data, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        return data
    loader: DataLoader = data  # type: ignore[assignment]
    dataset, old = loader.dataset, loader.sampler
    shuffle = isinstance(old, RandomSampler)
    # The loader's own generator seeds its workers; the rank keeps worker streams apart.
    worker_gen = _generator(seed + epoch + (ctx.rank << 32))
    drawing = shuffle and not old.replacement and old._num_samples is not None and old._num_samples < len(dataset)
    if ctx.active and drawing:
        # Each epoch a draw of fewer items than the dataset holds (make_loader's epoch_items): the
        # draw one process would make, shared out among the ranks in its order.
        drawn = torch.randperm(len(dataset), generator=_generator(seed + epoch))[:old._num_samples].tolist()
        dataset = Subset(dataset, drawn)
        sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=False,
                                     drop_last=loader.drop_last)
    elif ctx.active:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank,
                                     shuffle=shuffle, seed=seed, drop_last=loader.drop_last)
        sampler.set_epoch(epoch)  # DistributedSampler shuffles with seed + epoch
    elif shuffle:
        sampler = RandomSampler(dataset, replacement=old.replacement,
                                num_samples=old._num_samples, generator=_generator(seed + epoch))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, sampler=sampler, generator=worker_gen, **_loader_kwargs(loader))


def eval_batches(data: Iterable, seed: int, ctx: Dist) -> Iterable:
    """The eval batches: in order, this rank's share of a DataLoader's dataset under DDP."""
    if not _rebuildable(data):
        return data
    loader: DataLoader = data  # type: ignore[assignment]
    dataset = loader.dataset
    if ctx.active:
        # Strided shards without DistributedSampler's padding, so no item counts twice.
        dataset = Subset(dataset, range(ctx.rank, len(dataset), ctx.world))
    kw = _loader_kwargs(loader)
    return DataLoader(dataset, shuffle=False, generator=_generator(seed), **kw)


def split_batch(batch: object, what: str, index: int) -> tuple[Any, torch.Tensor]:
    """(input, label) of a batch, or a TypeError saying what the batch was."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        found = (f"a {type(batch).__name__} of length {len(batch)}"
                 if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}")
        raise TypeError(
            f"{what} must yield (input, label) pairs, but batch {index} is {found}; wrap the "
            f"dataset so each item is (input, label), e.g. a TensorDataset(inputs, labels)"
        )
    x, y = batch
    if not isinstance(y, torch.Tensor):
        raise TypeError(
            f"{what}: the label of batch {index} is a {type(y).__name__}, not a tensor of class "
            f"indices; batch the labels with a DataLoader or torch.tensor(labels)"
        )
    return x, y


def to_device(x: Any, dev: torch.device, channels_last: bool) -> Any:
    """Move an input (tensor, or tuple/list/dict of them) to ``dev``."""
    if isinstance(x, torch.Tensor):
        x = x.to(dev, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, dev, channels_last) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, dev, channels_last) for k, v in x.items()}
    return x


def count_correct(model: nn.Module, data: Iterable, dev: torch.device, amp: bool,
                  what: str, *, channels_last: bool = False) -> tuple[int, int]:
    """(correct top-1 predictions, labels seen) over ``data``, in eval mode and without grad (4-D
    inputs in the channels-last format with ``channels_last``)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    total = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(data):
                x, y = split_batch(batch, what, i)
                x, y = to_device(x, dev, channels_last), y.to(dev, non_blocking=True)
                with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
                    out = model(x)
                correct += (out.argmax(dim=1) == y).sum()
                total += y.shape[0]
    finally:
        model.train(was_training)
    return int(correct.item()), total


def batch_sums(ce: torch.Tensor, penalty: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[ce * n, penalty * n, correct top-1, n] of one training batch of ``n`` labels, in float64."""
    n = y.shape[0]
    correct = (out.detach().argmax(dim=1) == y).sum()
    return torch.stack([
        ce.detach().double() * n,
        penalty.detach().double().to(ce.device) * n,
        correct.double(),
        torch.tensor(float(n), dtype=torch.float64, device=ce.device),
    ])
