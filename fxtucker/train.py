"""The thin training loop: cross-entropy plus an optional gate penalty, with exact resume and DDP.

:func:`train` runs ``config.epochs`` epochs of SGD or AdamW over (input, label) batches, adds
``penalty(model, epoch, step)`` to the cross-entropy when given (compress() passes
``lambda * sum f_c(gates)``), evaluates after each epoch and returns one history record per
epoch. With ``out_dir`` it appends each record to ``<out_dir>/<stage>.jsonl`` and writes
``<out_dir>/<stage>.ckpt`` atomically after every epoch (the one before it is kept as
``<stage>.ckpt.prev``); ``resume=True`` continues a killed run and, on the CPU with
``num_workers=0``, ends bitwise where the uninterrupted run would have.

Conventions:

- ``epoch`` is 0-based everywhere (history records, ``penalty``, messages); ``step`` counts
  optimizer steps of the stage from 0, across epochs.
- Weight decay applies to every parameter of two or more dimensions that is not a gate: gates
  (1-d, and found through ``node.meta``), biases and normalization weights only feel the
  gradient of the loss and of the penalty.
- A fresh run seeds torch, numpy and ``random`` with ``config.seed`` (plus the rank under DDP).
  A DataLoader over a map-style dataset is rebuilt each epoch with its order drawn from
  ``config.seed + epoch``, so the order does not depend on what ran before.
- Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel, the data
  is sharded with a DistributedSampler, logged metrics are averaged over the ranks and only
  rank 0 writes files. The process group is left initialised for the caller's next stage.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import random
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
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

from fxtucker.io import append_line, load_error, write_atomic
from fxtucker.meta import GATE_ROLES, factor_record

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # tqdm is optional (the "progress" extra): no bar without it.
    _tqdm = None

__all__ = [
    "TrainConfig",
    "train",
    "evaluate",
    "TrainingDiverged",
    "OPTIMIZERS",
    "SCHEDULES",
    "RECORD_KEYS",
    "CHECKPOINT_FORMAT",
]

#: Valid values of ``TrainConfig.optimizer``.
OPTIMIZERS = ("sgd", "adamw")
#: Valid values of ``TrainConfig.schedule``; the learning rate changes once per epoch.
SCHEDULES = ("cosine", "step", "constant")
#: The keys every history record has; ``epoch_stats`` adds its own after these.
RECORD_KEYS = (
    "stage", "epoch", "loss", "ce", "penalty", "train_accuracy", "accuracy", "lr", "seconds",
)
#: The ``"format"`` entry of a checkpoint written by :func:`train`.
CHECKPOINT_FORMAT = "fxtucker-train-checkpoint/1"

PathLike = Union[str, os.PathLike]
_STAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept.

    Attributes:
        stage: the stage that diverged.
        epoch: the 0-based epoch it diverged in.
        step: the 0-based optimizer step of the stage (the step that was not taken).
        checkpoint: the path of the last good checkpoint, or None when there is none.
    """

    def __init__(self, message: str, *, stage: str, epoch: int, step: int,
                 checkpoint: Optional[Path]) -> None:
        super().__init__(message)
        self.stage, self.epoch, self.step, self.checkpoint = stage, epoch, step, checkpoint


def _is_int(value: object) -> bool:
    """Whether ``value`` is an integer and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """Whether ``value`` is a finite real number and not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)))


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training stage; validated when built.

    Attributes:
        epochs: number of epochs, an integer >= 1.
        lr: the initial learning rate, > 0.
        optimizer: ``"sgd"`` (momentum ``momentum``, not Nesterov) or ``"adamw"``.
        momentum: SGD momentum in [0, 1); AdamW ignores it.
        weight_decay: >= 0, on every parameter of two or more dimensions except gates.
        schedule: ``"cosine"`` (to 0 over ``epochs``), ``"step"`` (times ``gamma`` every
            ``step_size`` epochs) or ``"constant"``.
        step_size: epochs between decays for ``"step"``, an integer >= 1.
        gamma: decay factor for ``"step"``, > 0.
        amp: autocast to float16 with a GradScaler on CUDA; ignored on the CPU.
        channels_last: channels-last memory format on CUDA; ignored on the CPU.
        seed: seeds the RNGs of a fresh run and the data order of each epoch, an integer >= 0.
        max_grad_norm: clip the global gradient 2-norm to this (> 0), or None for no clipping.
    """

    epochs: int
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    amp: bool = False
    channels_last: bool = False
    seed: int = 0
    max_grad_norm: Optional[float] = None

    def __post_init__(self) -> None:
        """Check every field and normalize numbers to plain ints and floats."""
        def fail(name: str, need: str) -> None:
            raise ValueError(f"TrainConfig: {name} must be {need}, got {getattr(self, name)!r}")

        if not _is_int(self.epochs) or self.epochs < 1:
            fail("epochs", "an integer >= 1")
        if not _is_real(self.lr) or self.lr <= 0:
            fail("lr", "a finite number > 0")
        if not isinstance(self.optimizer, str) or self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"TrainConfig: unknown optimizer {self.optimizer!r}; valid optimizers are "
                f"{list(OPTIMIZERS)}"
            )
        if not _is_real(self.momentum) or not 0.0 <= self.momentum < 1.0:
            fail("momentum", "a number in [0, 1)")
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            fail("weight_decay", "a finite number >= 0")
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise ValueError(
                f"TrainConfig: unknown schedule {self.schedule!r}; valid schedules are "
                f"{list(SCHEDULES)}"
            )
        if not _is_int(self.step_size) or self.step_size < 1:
            fail("step_size", "an integer >= 1")
        if not _is_real(self.gamma) or self.gamma <= 0:
            fail("gamma", "a finite number > 0")
        if not isinstance(self.amp, bool):
            fail("amp", "True or False")
        if not isinstance(self.channels_last, bool):
            fail("channels_last", "True or False")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**32:
            fail("seed", "an integer in [0, 2**32)")
        if self.max_grad_norm is not None and (
            not _is_real(self.max_grad_norm) or self.max_grad_norm <= 0
        ):
            fail("max_grad_norm", "a finite number > 0 or None")
        # object.__setattr__ because the dataclass is frozen; a recorded config reads back equal.
        for name in ("epochs", "step_size", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.max_grad_norm is not None:
            object.__setattr__(self, "max_grad_norm", float(self.max_grad_norm))


# --- distributed ------------------------------------------------------------------------------


@dataclass
class _Dist:
    """Rank and world size of this process, and the device collectives run on."""

    rank: int = 0
    world: int = 1
    comm_device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a float64 tensor over the ranks (a no-op without DDP)."""
        if not self.active:
            return values
        values = values.to(self.comm_device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()

    def main_failed(self, failed: bool) -> bool:
        """Rank 0 tells the others whether its file writes failed."""
        if not self.active:
            return failed
        flag = torch.tensor([int(failed)], device=self.comm_device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def gather(self, obj: Any) -> list:
        """``obj`` of every rank, in rank order."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, say)."""
        if not self.active:
            return
        for b in model.buffers():
            t = b.detach().to(self.comm_device)
            dist.broadcast(t, src=0)
            b.detach().copy_(t)


def _env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"the environment variable WORLD_SIZE is {raw!r}, not an integer; fxtucker.train "
            f"reads it to decide on DistributedDataParallel: unset it or launch with torchrun"
        ) from None


def _wants_ddp() -> bool:
    """Whether this process is one of several (launched by torchrun or an initialised group)."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    return _env_world_size() > 1


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU when it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _resolve_device(model: nn.Module, device: Any, ddp: bool) -> torch.device:
    """The device to train on: ``device``, else the local GPU under DDP, else the model's."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(
                f"train: device={device!r} is not a device ({e}); pass e.g. 'cpu', 'cuda', "
                f"'cuda:1' or a torch.device"
            ) from None
    elif ddp and torch.cuda.is_available():
        dev = torch.device("cuda")
    else:
        dev = _model_device(model)
    if dev.type == "cuda" and dev.index is None:
        index = int(os.environ.get("LOCAL_RANK", "0")) if ddp else torch.cuda.current_device()
        dev = torch.device("cuda", index)
    return dev


def _setup_distributed(dev: torch.device) -> _Dist:
    """Join (initialising if needed) the process group; a single-process _Dist without DDP."""
    if not _wants_ddp():
        return _Dist()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL's object collectives use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    comm = dev if dist.get_backend() == "nccl" else torch.device("cpu")
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), comm_device=comm)


# --- data -------------------------------------------------------------------------------------


def _check_train_data(train_data: object, epochs: int) -> None:
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


def _train_batches(data: Iterable, seed: int, epoch: int, ctx: _Dist) -> Iterable:
    """The batches of one epoch: a DataLoader's order redrawn from ``seed + epoch``."""
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
    if ctx.active:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank,
                                     shuffle=shuffle, seed=seed, drop_last=loader.drop_last)
        sampler.set_epoch(epoch)  # DistributedSampler shuffles with seed + epoch
    elif shuffle:
        sampler = RandomSampler(dataset, replacement=old.replacement,
                                num_samples=old._num_samples, generator=_generator(seed + epoch))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, sampler=sampler, generator=worker_gen, **_loader_kwargs(loader))


def _eval_batches(data: Iterable, seed: int, ctx: _Dist) -> Iterable:
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


def _split_batch(batch: object, what: str, index: int) -> tuple[Any, torch.Tensor]:
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


def _to_device(x: Any, dev: torch.device, channels_last: bool) -> Any:
    """Move an input (tensor, or tuple/list/dict of them) to ``dev``."""
    if isinstance(x, torch.Tensor):
        x = x.to(dev, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, dev, channels_last) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, dev, channels_last) for k, v in x.items()}
    return x


# --- evaluation -------------------------------------------------------------------------------


def _count_correct(model: nn.Module, data: Iterable, dev: torch.device, amp: bool,
                   what: str) -> tuple[int, int]:
    """(correct top-1 predictions, labels seen) over ``data``, in eval mode and without grad."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    total = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(data):
                x, y = _split_batch(batch, what, i)
                x, y = _to_device(x, dev, False), y.to(dev, non_blocking=True)
                with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
                    out = model(x)
                correct += (out.argmax(dim=1) == y).sum()
                total += y.shape[0]
    finally:
        model.train(was_training)
    return int(correct.item()), total


def evaluate(model: nn.Module, data: Iterable, *, device: Any = None) -> float:
    """Top-1 accuracy of ``model`` over ``data``, as a fraction in [0, 1].

    Runs in eval mode without gradients and leaves the model in the mode it was in.

    Args:
        model: a classifier whose output is (batch, classes) logits.
        data: an iterable of (input, label) batches, e.g. a DataLoader.
        device: where the batches go; by default the device of the model's parameters
            (evaluate does not move the model).

    Raises:
        ValueError: ``data`` yielded no batches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"evaluate: model must be an nn.Module, got {type(model).__name__}")
    dev = _resolve_device(model, device, ddp=False)
    correct, total = _count_correct(model, data, dev, False, "evaluate: data")
    if total == 0:
        raise ValueError(
            f"evaluate: data ({type(data).__name__}) yielded no labels, so there is no "
            f"accuracy to compute; pass at least one (input, label) batch"
        )
    return correct / total


# --- optimizer and schedule -------------------------------------------------------------------


def _gate_parameters(model: nn.Module) -> set[int]:
    """ids of the gate parameters of a gated GraphModule (found through node.meta)."""
    from fxtucker.passes.insert_gates import Gate  # a training view (compose_factors) holds gates without nodes

    ids: set[int] = {id(p) for m in model.modules() if isinstance(m, Gate) for p in m.parameters()}
    graph_modules = [m for m in model.modules() if isinstance(m, fx.GraphModule)]
    for gm in graph_modules:
        for node in gm.graph.nodes:
            rec = factor_record(node)
            if rec is None or rec.role not in GATE_ROLES or node.op != "call_module":
                continue
            try:
                gate = gm.get_submodule(node.target)
            except AttributeError:
                continue
            ids.update(id(p) for p in gate.parameters())
    return ids


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, not decayed] parameter groups; gates and 1-d parameters are not decayed."""
    gates = _gate_parameters(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() <= 1 or id(p) in gates else decay).append(p)
    if not decay and not no_decay:
        raise ValueError(
            f"train: the model ({type(model).__name__}) has no parameter with requires_grad=True, "
            f"so there is nothing to train; unfreeze some parameters"
        )
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=config.lr)


def _make_scheduler(opt: torch.optim.Optimizer, config: TrainConfig):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=config.step_size,
                                               gamma=config.gamma)
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


# --- RNG state --------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state() -> dict:
    """Every RNG state as tensors and plain types, so ``weights_only`` loading reads it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --- checkpoint files -------------------------------------------------------------------------


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    """Feed a canonical serialization of ``obj`` into the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, no copy
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for value in obj:
            _feed(h, value)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        text = repr(obj)
        h.update(f"{type(obj).__name__}{len(text)}:{text};".encode())
    else:
        raise TypeError(f"checkpoint payload holds a {type(obj).__name__}, which cannot be hashed")


def _digest(payload: dict) -> str:
    """SHA-256 of the payload's contents (tensor bytes, keys, numbers, strings, in order)."""
    h = hashlib.sha256()
    _feed(h, payload)
    return h.hexdigest()


def _to_cpu(obj: Any) -> Any:
    """A copy of a nested structure with every tensor on the CPU (state_dict metadata kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _to_cpu(value)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


class _Unusable(Exception):
    """A checkpoint file that cannot be used, with the reason."""


def _read_checkpoint(path: Path, stage: str) -> dict:
    """The verified payload of a checkpoint file, or _Unusable saying why not."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn zip, truncated pickle, unknown type: all mean "unusable"
        raise _Unusable(f"it does not load: {load_error(e)}")
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise _Unusable(f"it is not an fxtucker training checkpoint (format {found!r}, "
                        f"expected {CHECKPOINT_FORMAT!r})")
    payload, stored = raw.get("payload"), raw.get("sha256")
    if not isinstance(payload, dict):
        raise _Unusable("it has no payload")
    try:
        actual = _digest(payload)
    except TypeError as e:
        raise _Unusable(str(e))
    if actual != stored:
        raise _Unusable(f"its SHA-256 checksum does not match (stored {stored}, computed "
                        f"{actual}): the file is corrupted or was torn while written")
    missing = [k for k in ("stage", "config", "epoch", "step", "history", "model", "optimizer",
                           "scheduler", "scaler", "rng") if k not in payload]
    if missing:
        raise _Unusable(f"its payload lacks {missing}")
    _check_schema(payload)
    if payload["stage"] != stage:
        raise _Unusable(f"it belongs to stage {payload['stage']!r}, not {stage!r}")
    return payload


def _check_schema(payload: dict) -> None:
    """_Unusable unless every entry of the payload has the type and range train() writes.

    The checksum finds damage, not a file written to fool the loader (anyone can recompute it),
    and weights_only loading still allows any dict, list, str or number: this checks the rest.
    """
    def bad(key: str, need: str) -> _Unusable:
        return _Unusable(f"its payload does not have the structure train() writes: {key} must be {need}, "
                         f"got {type(payload[key]).__name__} {str(payload[key])[:60]!r}")

    for key in ("epoch", "step"):
        if not _is_int(payload[key]) or payload[key] < 0:
            raise bad(key, "an integer >= 0")
    for key in ("stage",):
        if not isinstance(payload[key], str):
            raise bad(key, "a str")
    for key in ("config", "scheduler"):
        if not isinstance(payload[key], dict):
            raise bad(key, "a dict")
    epochs = payload["config"].get("epochs")
    if not _is_int(epochs) or payload["epoch"] > epochs:
        raise bad("epoch", f"at most the config's epochs ({epochs!r})")
    history = payload["history"]
    if not isinstance(history, list) or len(history) != payload["epoch"] or not all(isinstance(r, dict) for r in history):
        raise bad("history", f"a list of {payload['epoch']} records (one per epoch)")
    model = payload["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise bad("model", "a state_dict (str -> tensor)")
    opt = payload["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        raise bad("optimizer", "an optimizer state_dict (state, param_groups)")
    if payload["scaler"] is not None and not isinstance(payload["scaler"], dict):
        raise bad("scaler", "a dict or None")
    rng = payload["rng"]
    if not isinstance(rng, list) or not rng or not all(
            isinstance(r, dict) and {"torch", "cuda", "numpy", "python"} <= set(r) for r in rng):
        raise bad("rng", "a non-empty list of RNG states (torch, cuda, numpy, python)")
    if not all(_rng_well_typed(r) for r in rng):
        raise bad("rng", "RNG states of the types train() writes (torch: a uint8 tensor, cuda: a list of them, "
                         "numpy: name, keys, pos, has_gauss, cached; python: version, internal state, gauss)")
    if "callbacks" in payload and not (isinstance(payload["callbacks"], dict)
                                       and all(isinstance(v, dict) for v in payload["callbacks"].values())):
        raise bad("callbacks", "a dict of state dicts")


def _rng_well_typed(state: dict) -> bool:
    """Whether one rank's RNG state has the types _rng_state() writes (so _set_rng_state cannot crash)."""
    def u8(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1

    n, py = state["numpy"], state["python"]
    return (u8(state["torch"]) and isinstance(state["cuda"], list) and all(u8(t) for t in state["cuda"])
            and isinstance(n, dict) and isinstance(n.get("name"), str)
            and isinstance(n.get("keys"), torch.Tensor) and n["keys"].dtype == torch.int64 and n["keys"].numel() == 624
            and _is_int(n.get("pos")) and _is_int(n.get("has_gauss")) and isinstance(n.get("cached"), float)
            and isinstance(py, (list, tuple)) and len(py) == 3 and _is_int(py[0])
            and isinstance(py[1], (list, tuple)) and len(py[1]) == 625 and all(_is_int(v) for v in py[1])
            and (py[2] is None or isinstance(py[2], float)))


@dataclass
class _Files:
    """The files of one stage in out_dir."""

    out_dir: Path
    stage: str

    @property
    def ckpt(self) -> Path:
        return self.out_dir / f"{self.stage}.ckpt"

    @property
    def prev(self) -> Path:
        return self.out_dir / f"{self.stage}.ckpt.prev"

    @property
    def log(self) -> Path:
        return self.out_dir / f"{self.stage}.jsonl"

    def remove_temps(self) -> None:
        """Remove temp files left by a write that was killed."""
        for pattern in (f".{self.stage}.ckpt.tmp.*", f".{self.stage}.ckpt.prev.tmp.*",
                        f".{self.stage}.jsonl.tmp.*"):
            for leftover in self.out_dir.glob(pattern):
                leftover.unlink(missing_ok=True)

    def start_fresh(self) -> None:
        """Remove the files of an earlier run of this stage, saying so."""
        old = [p for p in (self.ckpt, self.prev, self.log) if p.exists()]
        if old:
            warnings.warn(
                f"train: stage {self.stage!r} starts over (resume=False) and removes the files of "
                f"an earlier run: {', '.join(str(p) for p in old)}; pass resume=True to continue "
                f"that run instead",
                stacklevel=3,
            )
        for p in old:
            p.unlink()

    def set_aside(self, paths: list[Path]) -> None:
        """Rename unusable checkpoints to ``<name>.bad``: kept for a look, out of the rotation."""
        for path in paths:
            if path.exists():
                os.replace(path, path.with_name(path.name + ".bad"))

    def load(self, say: bool) -> tuple[Optional[tuple[Path, dict]], list[Path]]:
        """The newest usable checkpoint (ckpt, else .prev) with its payload, and the unusable ones.

        ``say``: warn about what is unusable (rank 0 only, so the warning shows once).
        """
        def warn(message: str) -> None:
            if say:
                warnings.warn(f"train: {message}", stacklevel=4)

        bad: list[Path] = []
        for path in (self.ckpt, self.prev):
            if not path.exists():
                continue
            try:
                payload = _read_checkpoint(path, self.stage)
            except _Unusable as e:
                bad.append(path)
                then = f"trying {self.prev}" if path == self.ckpt else "not using it either"
                warn(f"checkpoint {path} is unusable because {e}; it is kept as "
                     f"{path.name}.bad, {then}")
                continue
            if path == self.prev and not bad:
                warn(f"{self.ckpt} is missing; resuming from {path}, one epoch older")
            return (path, payload), bad
        if bad:
            warn(f"no usable checkpoint for stage {self.stage!r} in {self.out_dir}; starting the "
                 f"stage from scratch")
        else:
            log.info("train: no checkpoint of stage %r in %s; starting from scratch",
                     self.stage, self.out_dir)
        return None, bad

    def append(self, record: dict) -> None:
        """Append one JSON line and make it durable."""
        append_line(self.log, json.dumps(record) + "\n")

    def rewrite_log(self, history: list[dict]) -> None:
        """Make the JSONL hold exactly ``history`` (on resume; empty when nothing was usable)."""
        text = "".join(json.dumps(r) + "\n" for r in history)
        write_atomic(self.log, text)

    def save(self, payload: dict) -> None:
        checkpoint = {"format": CHECKPOINT_FORMAT, "sha256": _digest(payload), "payload": payload}
        write_atomic(self.ckpt, lambda f: torch.save(checkpoint, f), keep_prev=True)


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class _State:
    """What the loop carries between epochs."""

    epoch: int = 0          # epochs finished
    step: int = 0           # optimizer steps taken
    history: list = dataclasses.field(default_factory=list)
    saved: Optional[Path] = None   # the last good checkpoint
    saved_epochs: int = 0          # epochs it holds


def _check_args(model, config, stage, penalty, epoch_stats, out_dir, resume) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"train: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig, got {type(config).__name__}; "
                        f"build one with TrainConfig(epochs=...)")
    if not isinstance(stage, str) or not _STAGE_RE.fullmatch(stage):
        raise ValueError(f"train: stage must be a name usable in a file name (letters, digits, "
                         f"'_', '-', '.', starting with a letter or digit), got {stage!r}")
    for name, fn in (("penalty", penalty), ("epoch_stats", epoch_stats)):
        if fn is not None and not callable(fn):
            raise TypeError(f"train: {name} must be a callable or None, got {type(fn).__name__}")
    if resume and out_dir is None:
        raise ValueError("train: resume=True needs out_dir=<the directory of the run to "
                         "continue>; without out_dir nothing was saved to resume from")


def _check_penalty(value: object, epoch: int, step: int) -> torch.Tensor:
    """The penalty as a 0-dim tensor, or an error saying what penalty returned."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"train: penalty(model, epoch={epoch}, step={step}) returned a "
            f"{type(value).__name__}; it must return a scalar tensor (e.g. lam * "
            f"fxtucker.regularizers.penalty(gates, 'funnel', c)) so its gradient reaches the gates"
        )
    if value.numel() != 1:
        raise ValueError(
            f"train: penalty(model, epoch={epoch}, step={step}) returned a tensor of shape "
            f"{tuple(value.shape)}; it must return a scalar (one element), e.g. sum it with .sum()"
        )
    if not value.is_floating_point():
        raise TypeError(
            f"train: penalty(model, epoch={epoch}, step={step}) returned a {value.dtype} tensor; "
            f"it must be floating point to be added to the loss"
        )
    return value.reshape(())


def _check_stats(stats: object) -> dict:
    """epoch_stats' dict, checked to be JSON-ready and not to shadow the record's keys."""
    if not isinstance(stats, dict):
        raise TypeError(f"train: epoch_stats(model) returned a {type(stats).__name__}; it must "
                        f"return a dict of JSON-ready values")
    clash = sorted(set(stats) & set(RECORD_KEYS))
    if clash:
        raise ValueError(f"train: epoch_stats(model) returned keys {clash} that the history "
                         f"record already has ({list(RECORD_KEYS)}); rename them")
    try:
        json.dumps(stats)
    except (TypeError, ValueError) as e:
        raise TypeError(f"train: epoch_stats(model) returned a dict that is not JSON-ready "
                        f"({e}); return only str keys and numbers, strings, bools, None, lists "
                        f"and dicts of them (use .item() / .tolist() for tensors)") from None
    return stats


def _saved_phrase(state: _State, out_dir: Optional[PathLike]) -> str:
    if out_dir is None:
        return "nothing is saved because out_dir was not given"
    if state.saved is None:
        return "no checkpoint was written yet (no epoch finished)"
    return (f"the last good checkpoint, after {state.saved_epochs} epoch(s), is kept at "
            f"{state.saved}")


def _bar(total: Optional[int], desc: str, enabled: bool, initial: int = 0):
    """A tqdm bar on stderr; tqdm itself turns it off when stderr is not a terminal."""
    if _tqdm is None or not enabled:
        return None
    return _tqdm(total=total, desc=desc, disable=None, file=sys.stderr, dynamic_ncols=True,
                 leave=True, initial=initial)


def _stateful(**fns: Any) -> dict:
    """The callbacks that carry state across epochs: those with state_dict and load_state_dict."""
    return {name: fn for name, fn in fns.items()
            if callable(getattr(fn, "state_dict", None)) and callable(getattr(fn, "load_state_dict", None))}


def _callback_states(callbacks: dict) -> dict:
    states = {}
    for name, obj in callbacks.items():
        st = obj.state_dict()
        if not isinstance(st, dict):
            raise TypeError(f"train: {name}.state_dict() returned a {type(st).__name__}; it must "
                            f"return a dict of tensors, numbers, strings, lists and dicts")
        states[name] = st
    return states


def _restore(payload: dict, path: Path, config: TrainConfig, model: nn.Module, opt, sched,
             scaler, ctx: _Dist, callbacks: dict) -> None:
    """Load a verified checkpoint into the model, optimizer, schedule, scaler and RNGs."""
    stored = payload["config"]
    current = dataclasses.asdict(config)
    diff = [k for k in current if stored.get(k) != current[k]]
    if diff:
        was = ", ".join(f"{k}={stored.get(k)!r}" for k in diff)
        now = ", ".join(f"{k}={current[k]!r}" for k in diff)
        raise ValueError(
            f"train: checkpoint {path} was written with {was} but this call has {now}; resume "
            f"with the TrainConfig the run started with, or pass resume=False to start the stage "
            f"over (which removes it)"
        )
    try:
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        sched.load_state_dict(payload["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        found = " ".join(str(e).split())  # load_state_dict's message spans lines
        raise ValueError(
            f"train: checkpoint {path} does not fit this model ({found}); resume with the model "
            f"the run started from, or pass resume=False to start the stage over"
        ) from e
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    stored_callbacks = payload.get("callbacks") or {}
    missing = sorted(set(callbacks) - set(stored_callbacks))
    if missing:
        raise ValueError(
            f"train: checkpoint {path} holds no state for the stateful {', '.join(missing)} of this "
            f"call; resume with the callbacks the run started with, or pass resume=False to start "
            f"the stage over"
        )
    for name, obj in callbacks.items():
        obj.load_state_dict(stored_callbacks[name])
    states = payload["rng"]
    if len(states) != ctx.world:
        warnings.warn(f"train: checkpoint {path} was written by {len(states)} process(es), this "
                      f"run has {ctx.world}; the resumed run will not repeat the original one "
                      f"exactly", stacklevel=3)
    _set_rng_state(states[ctx.rank] if ctx.rank < len(states) else states[0])


def train(
    model: nn.Module,
    train_data: Iterable,
    config: TrainConfig,
    *,
    eval_data: Optional[Iterable] = None,
    penalty: Optional[Callable[[nn.Module, int, int], torch.Tensor]] = None,
    out_dir: Optional[PathLike] = None,
    stage: str = "train",
    resume: bool = False,
    progress: bool = True,
    device: Any = None,
    epoch_stats: Optional[Callable[[nn.Module], dict]] = None,
    extra_loss: Optional[Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
) -> list[dict]:
    """Train ``model`` in place for ``config.epochs`` epochs and return the history.

    The loss is cross-entropy plus ``penalty(model, epoch, step)`` when given. After each
    epoch the model is evaluated on ``eval_data`` and a record is made::

        {"stage", "epoch", "loss", "ce", "penalty", "train_accuracy", "accuracy", "lr",
         "seconds", **epoch_stats(model)}

    ``loss``, ``ce`` and ``penalty`` are means over the epoch's samples, ``lr`` is the rate
    the epoch ran at and ``accuracy`` is None without ``eval_data``.

    Args:
        model: any nn.Module returning (batch, classes) logits, including a GraphModule with
            parametrized modules. It is moved to the device and left in the mode it was given in.
        train_data: an iterable of (input, label) batches. A DataLoader over a map-style
            dataset is rebuilt each epoch with its order drawn from ``config.seed + epoch``
            (sharded by a DistributedSampler under DDP); anything else is used as it is.
        config: the hyper-parameters.
        eval_data: batches to measure top-1 accuracy on after each epoch.
        penalty: ``penalty(model, epoch, step) -> scalar tensor`` added to the loss; ``model``
            is the unwrapped module, ``epoch`` and ``step`` are 0-based.
        out_dir: where to write ``<stage>.jsonl`` (one record per line) and ``<stage>.ckpt``
            (atomically, after every epoch; the one before is kept as ``<stage>.ckpt.prev``).
            Without ``resume``, earlier files of the stage are removed with a warning.
        stage: names the files and the records.
        resume: continue from the checkpoint in ``out_dir`` (``.prev`` if the newest is
            corrupted); a stage that finished loads its weights and returns its history at
            once. Needs the same config.
        progress: show one tqdm bar for the stage, named after it, over all its epochs' steps,
            with its ETA (when tqdm is installed and stderr is a terminal).
        device: where to train; by default the local GPU under DDP, else the model's device.
        epoch_stats: ``epoch_stats(model) -> dict`` of JSON-ready values added to each record.
        extra_loss: ``extra_loss(inputs, outputs, labels) -> scalar`` added to the loss of each
            batch (and logged with the penalty): for distillation, say.

    A ``penalty`` object with an ``after_step(model, epoch, step, lr)`` method has it called
    (under ``torch.no_grad``) after every optimizer step, with the learning rate of the step: a
    proximal step for the penalty, say.

    A ``penalty``, ``epoch_stats`` or ``extra_loss`` that is an object with ``state_dict()`` and
    ``load_state_dict()`` (a controller that steers lambda, say) has its state saved in every
    checkpoint and restored on resume, so a resumed run still repeats the uninterrupted one.

    Returns:
        One record per epoch (all epochs of the stage, including those before a resume).

    Raises:
        TrainingDiverged: the loss became NaN or infinite; the last good checkpoint is kept.
        OSError: a checkpoint or log write failed; the previous checkpoint is left as it was.
        KeyboardInterrupt: re-raised after logging how to resume.
        ValueError, TypeError: bad arguments, empty data, a bad penalty or epoch_stats value,
            or a checkpoint that does not fit the config or the model.

    Example::

        >>> cfg = TrainConfig(epochs=10, lr=0.01)
        >>> history = train(model, loader, cfg, eval_data=test_loader, out_dir="runs/a")
        >>> history[-1]["accuracy"]
        0.91
    """
    _check_args(model, config, stage, penalty, epoch_stats, out_dir, resume)
    _check_train_data(train_data, config.epochs)
    callbacks = _stateful(penalty=penalty, epoch_stats=epoch_stats, extra_loss=extra_loss)
    ddp = _wants_ddp()
    dev = _resolve_device(model, device, ddp)
    ctx = _setup_distributed(dev)
    on_cuda = dev.type == "cuda"
    amp = config.amp and on_cuda
    channels_last = config.channels_last and on_cuda

    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = _make_optimizer(model, config)
    sched = _make_scheduler(opt, config)
    scaler = torch.amp.GradScaler("cuda") if amp else None

    files = _Files(Path(out_dir), stage) if out_dir is not None else None
    state = _State()
    loaded, bad = None, []
    if files is not None:
        if ctx.main:
            files.out_dir.mkdir(parents=True, exist_ok=True)
            files.remove_temps()
        ctx.barrier()
        loaded, bad = files.load(say=ctx.main) if resume else (None, [])
        ctx.barrier()  # every rank has read before rank 0 writes
    if loaded is not None:
        path, payload = loaded
        _restore(payload, path, config, model, opt, sched, scaler, ctx, callbacks)
        state = _State(epoch=int(payload["epoch"]), step=int(payload["step"]),
                       history=list(payload["history"]), saved=path,
                       saved_epochs=int(payload["epoch"]))
    else:
        _seed_everything(config.seed + ctx.rank)
    if files is not None:
        failed = False
        if ctx.main:
            try:
                files.set_aside(bad)
                if not resume:
                    files.start_fresh()
                else:
                    files.rewrite_log(state.history)
            except OSError:
                failed = True
                raise
            finally:
                ctx.main_failed(failed)
        elif ctx.main_failed(False):
            raise RuntimeError(f"train: rank 0 could not prepare the files of stage {stage!r} in "
                               f"{out_dir}; see its error")
    if state.epoch >= config.epochs:
        log.info("train: stage %r already finished %d epoch(s); returning its history",
                 stage, state.epoch)
        return state.history

    net: nn.Module = model
    if ctx.active:
        if not _rebuildable(train_data) and not isinstance(
            getattr(train_data, "sampler", None), DistributedSampler
        ) and ctx.main:
            warnings.warn(
                f"train: train_data ({type(train_data).__name__}) is not a DataLoader over a "
                f"map-style dataset with a plain sampler, so fxtucker cannot shard it: each of the "
                f"{ctx.world} ranks iterates all of it. Pass a DataLoader(dataset, shuffle=...) or "
                f"give it a DistributedSampler",
                stacklevel=2,
            )
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if on_cuda else None)

    was_training = model.training
    # One bar for the whole stage, so that its ETA covers every epoch left (made at the first epoch,
    # when the number of batches per epoch is known).
    stage_bar: list = [None] if progress and ctx.main else []
    try:
        while state.epoch < config.epochs:
            record = _run_epoch(net, model, train_data, eval_data, config, penalty, epoch_stats,
                                opt, sched, scaler, state, ctx, dev, amp, channels_last, stage,
                                out_dir, stage_bar, extra_loss)
            state.history.append(record)
            state.epoch += 1
            if files is not None:
                _save_epoch(files, model, opt, sched, scaler, config, state, ctx, stage, callbacks)
    except KeyboardInterrupt:
        if ctx.main:
            where = _saved_phrase(state, out_dir)
            how = ("run again with resume=True (fxtucker ... --resume) to continue from it"
                   if state.saved is not None else "nothing can be resumed yet")
            log.warning("train: stage %r interrupted in epoch %d (0-based) of %d; %s: %s",
                        stage, state.epoch, config.epochs, where, how)
        raise
    finally:
        model.train(was_training)
        if stage_bar and stage_bar[0] is not None:
            stage_bar[0].close()
    return state.history


def _run_epoch(net, model, train_data, eval_data, config, penalty, epoch_stats, opt, sched,
               scaler, state: _State, ctx: _Dist, dev, amp, channels_last, stage, out_dir,
               stage_bar: list, extra_loss=None) -> dict:
    """Train one epoch, evaluate, and return its record; ``stage_bar`` holds the stage's bar (or is empty)."""
    epoch = state.epoch
    start = time.perf_counter()
    lr = float(opt.param_groups[0]["lr"])
    batches = _train_batches(train_data, config.seed, epoch, ctx)
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if stage_bar and stage_bar[0] is None:
        # After a resume the bar starts at the epochs already done; tqdm's ETA counts only the steps timed here.
        stage_bar[0] = _bar(None if total is None else total * config.epochs, stage, True,
                            initial=0 if total is None else total * epoch)
    bar = stage_bar[0] if stage_bar else None
    epoch_text = f"{epoch + 1}/{config.epochs}"
    # Sums over the epoch, over every rank: ce * n, penalty * n, correct, n.
    sums = [0.0, 0.0, 0.0, 0.0]
    net.train()
    after_step = getattr(penalty, "after_step", None)
    for i, batch in enumerate(batches):
        x, y = _split_batch(batch, "train: train_data", i)
        x = _to_device(x, dev, channels_last)
        y = y.to(dev, non_blocking=True)
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=amp):
            out = net(x)
            ce = F.cross_entropy(out, y)  # float32 under autocast, the model's dtype otherwise
        pen = torch.zeros((), device=ce.device)
        if penalty is not None:
            pen = _check_penalty(penalty(model, epoch, state.step), epoch, state.step)
        if extra_loss is not None:  # e.g. distillation: it sees the batch and the outputs
            pen = pen.to(ce.device) + _check_penalty(extra_loss(x, out, y), epoch, state.step).to(ce.device)
        loss = ce + pen.to(device=ce.device, dtype=ce.dtype)
        n = y.shape[0]
        correct = (out.detach().argmax(dim=1) == y).sum()
        step_sums = torch.stack([
            ce.detach().double() * n,
            pen.detach().double().to(ce.device) * n,
            correct.double(),
            torch.tensor(float(n), dtype=torch.float64, device=ce.device),
        ])
        # All ranks see the same sums, so all of them stop together on a NaN.
        step_sums = ctx.sum(step_sums.cpu()).tolist()
        step_ce, step_pen = step_sums[0] / step_sums[3], step_sums[1] / step_sums[3]
        if not math.isfinite(step_ce + step_pen):
            raise TrainingDiverged(
                f"train: stage {stage!r} diverged in epoch {epoch} (0-based) at step "
                f"{state.step} (batch {i} of the epoch): the loss is {step_ce + step_pen} "
                f"(cross-entropy {step_ce}, penalty {step_pen}), so training stopped before "
                f"this step; {_saved_phrase(state, out_dir)}. Lower lr (it is {lr:g}), set "
                f"max_grad_norm or weaken the penalty, then run the stage again",
                stage=stage, epoch=epoch, step=state.step, checkpoint=state.saved,
            )
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if config.max_grad_norm is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            opt.step()
        if after_step is not None:
            with torch.no_grad():
                after_step(model, epoch, state.step, opt.param_groups[0]["lr"])
        state.step += 1
        for k in range(4):
            sums[k] += step_sums[k]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=epoch_text, loss=f"{(sums[0] + sums[1]) / sums[3]:.4f}",
                            acc=f"{sums[2] / sums[3]:.3f}", refresh=False)
    if sums[3] == 0:
        raise ValueError(
            f"train: train_data yielded no batches in epoch {epoch} of stage {stage!r}; it "
            f"must yield at least one (input, label) batch per epoch (a generator is used up "
            f"after one pass: pass a list or a DataLoader)"
        )
    # DDP sends rank 0's buffers before each forward, so after the last one every rank has
    # its own batch statistics: without this, evaluation, the checkpoint and the model a
    # stage returns would differ between the ranks.
    ctx.broadcast_buffers(model)
    sched.step()
    accuracy = None
    if eval_data is not None:
        c, t = _count_correct(model, _eval_batches(eval_data, config.seed, ctx), dev, amp,
                              "train: eval_data")
        c, t = ctx.sum(torch.tensor([c, t], dtype=torch.float64)).tolist()
        if t == 0:
            raise ValueError(f"train: eval_data yielded no batches in epoch {epoch} of stage "
                             f"{stage!r}; pass at least one (input, label) batch, or "
                             f"eval_data=None")
        accuracy = c / t
    count = sums[3]
    record = {
        "stage": stage,
        "epoch": epoch,
        "loss": (sums[0] + sums[1]) / count,
        "ce": sums[0] / count,
        "penalty": sums[1] / count,
        "train_accuracy": sums[2] / count,
        "accuracy": accuracy,
        "lr": lr,
        "seconds": 0.0,  # set below, once epoch_stats has run too
    }
    if bar is not None:
        post = {"epoch": epoch_text, "loss": f"{record['loss']:.4f}", "acc": f"{record['train_accuracy']:.3f}"}
        if accuracy is not None:
            post["eval_acc"] = f"{accuracy:.3f}"
        bar.set_postfix(post)
    if epoch_stats is not None:
        record.update(_check_stats(epoch_stats(model)))
    record["seconds"] = time.perf_counter() - start
    log.info("train: %s", json.dumps(record))
    return record


def _save_epoch(files: _Files, model, opt, sched, scaler, config: TrainConfig, state: _State,
                ctx: _Dist, stage: str, callbacks: dict) -> None:
    """Rank 0 appends the record and writes the checkpoint; every rank learns if it failed."""
    rngs = ctx.gather(_rng_state())
    error: Optional[OSError] = None
    if ctx.main:
        what = files.log
        try:
            files.append(state.history[-1])
            what = files.ckpt
            payload = _to_cpu({
                "stage": stage,
                "config": dataclasses.asdict(config),
                "epoch": state.epoch,
                "step": state.step,
                "history": state.history,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rngs,
                "callbacks": _callback_states(callbacks),
            })
            files.save(payload)
        except OSError as e:
            error = e
            kept = (f"the previous checkpoint {state.saved} (after {state.saved_epochs} epoch(s)) "
                    f"is left as it was" if state.saved is not None else
                    "no earlier checkpoint exists")
            message = (
                f"train: could not write {what} after epoch {state.epoch - 1} (0-based) of stage "
                f"{stage!r}: {e}; {kept}. Free disk space or fix the permissions of "
                f"{files.out_dir}, then run again with resume=True"
            )
    if ctx.main_failed(error is not None):
        if error is not None:
            raise OSError(message) from error
        raise RuntimeError(f"train: rank 0 could not write the checkpoint of stage {stage!r} "
                           f"after epoch {state.epoch - 1}; see its error")
    state.saved, state.saved_epochs = files.ckpt, state.epoch
