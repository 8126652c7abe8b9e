"""The thin training loop: cross-entropy plus an optional gate penalty, with exact resume and DDP.

:func:`train` runs ``config.epochs`` epochs of SGD or AdamW over (input, label) batches, adds
``penalty(model, epoch, step)`` to the cross-entropy when given (compress() passes
``lambda * sum f_c(gates)``), evaluates after each epoch and returns one history record per
epoch. With ``out_dir`` it appends each record to ``<out_dir>/<stage>.jsonl`` and writes
``<out_dir>/<stage>.ckpt`` atomically after every epoch (the one before it is kept as
``<stage>.ckpt.prev``); ``resume=True`` continues a killed run and, on the CPU with
``num_workers=0``, ends bitwise where the uninterrupted run would have. The checkpoint format
lives in :mod:`fxtucker.checkpoint`, each epoch's (sharded) batches in :mod:`fxtucker.batches`,
the devices, process group and DDP in :mod:`fxtucker.distributed`.

Conventions:

- ``epoch`` is 0-based everywhere (history records, ``penalty``, messages); ``step`` counts
  optimizer steps of the stage from 0, across epochs.
- Weight decay applies to every parameter of two or more dimensions that is not a gate (see
  :mod:`fxtucker.optim`, which builds the optimizer and schedule).
- A fresh run seeds torch, numpy and ``random`` with ``config.seed`` (plus the rank under DDP).
  A DataLoader over a map-style dataset is rebuilt each epoch with its order drawn from
  ``config.seed + config.first_epoch + epoch``, so the order does not depend on what ran before.
- Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel, the data
  is sharded with a DistributedSampler, logged metrics are averaged over the ranks and only
  rank 0 writes files. The process group is left initialised for the caller's next stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fxtucker.batches import (batch_sums, check_train_data, count_correct, eval_batches, model_to_channels_last,
                              restore_strides, split_batch, to_device, train_batches, warn_unsharded)
from fxtucker.checkpoint import CHECKPOINT_FORMAT, CheckpointFiles, Progress, Resumable, start_stage, stateful
from fxtucker.distributed import Dist, resolve_device, setup_distributed, wants_ddp, wrap_ddp
from fxtucker.io import is_int, is_real
from fxtucker.optim import OPTIMIZERS, SCHEDULES, check_penalty, check_stats, lr_factor, make_optimizer, make_scheduler

__all__ = ["TrainConfig", "train", "evaluate", "recalibrate_batchnorm", "TrainingDiverged", "progress_bar",
           "OPTIMIZERS", "SCHEDULES", "RECORD_KEYS", "CHECKPOINT_FORMAT"]

#: The keys every history record has; ``epoch_stats`` adds its own after these.
RECORD_KEYS = (
    "stage", "epoch", "loss", "ce", "penalty", "train_accuracy", "accuracy", "lr", "seconds",
)

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
        channels_last: train in the channels-last memory format (the model's 4-D parameters and
            buffers, and every 4-D input batch, for training and the evaluation after each epoch),
            on the CPU or CUDA: the same function, with faster convolutions on most back ends
            (ResNet-20 on 2 CPU threads: ``benchmarks/RESULTS.md``, "What a training step
            costs"). Its gradients are less exact: on the CPU, BatchNorm's training-mode backward
            in this format sums in float32, and a trained ResNet-20's gradient on a batch of 128
            is off float64's by about 3% (0.002% in the default format), an error of the order
            of mixed precision's and far under one batch's sampling noise; so training gives
            other weights than in the default format, not the same to float rounding.
            Every tensor converted gets its strides back when the stage ends, however it ends (a
            model given in the default format comes back in it); tensors of other ranks (Conv3d's)
            are left as they are. A model that calls ``.view`` on a 4-D activation fails in this
            format (use ``flatten`` or ``reshape``).
        seed: seeds the RNGs of a fresh run and the data order of each epoch, an integer >= 0.
        max_grad_norm: clip the global gradient 2-norm to this (> 0), or None for no clipping.
        first_epoch: where this stage starts in a longer run it is part of (e.g. the stages of
            :func:`~fxtucker.compress`), an integer >= 0: epoch ``e`` of the stage draws its data
            order as epoch ``first_epoch + e`` of that run does, and the learning rate goes on
            along the run's schedule from there instead of starting it again. The stage's own
            records and checkpoints still count its epochs from 0.
        schedule_epochs: the length of that run's schedule (``"cosine"`` reaches 0 at its end),
            at least ``first_epoch + epochs``; None: ``first_epoch + epochs`` (the run ends with
            this stage).
        per_step: set the learning rate of every optimizer step from where it lies in the
            schedule (epoch + step / the epoch's steps; ``train_data`` needs a len()) instead of
            once an epoch. Once an epoch, a short stage never comes near the end of its cosine:
            over 2 epochs the second runs at half the start rate, over 1 the whole stage at the
            start rate; per step the rate falls within each epoch, to (1 - cos(pi / n)) / 2 of the
            start at the last of a run's n steps. A step's rate depends on its place alone, so a
            resume, another batch count per rank or an epoch of another length each get theirs.
        compile: run the training step's forward (and so its backward) under ``torch.compile``,
            on the CPU or a GPU. Checkpoints and the trained model are the original module's
            (no ``_orig_mod.`` prefix); evaluation runs the plain module, uncompiled. The first
            step compiles (slow); the losses agree with ``compile=False`` to float rounding,
            except that dropout draws its masks from inductor's own generator.
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
    compile: bool = False
    first_epoch: int = 0
    schedule_epochs: Optional[int] = None
    per_step: bool = False

    def __post_init__(self) -> None:
        """Check every field and normalize numbers to plain ints and floats."""
        def fail(name: str, need: str) -> None:
            raise ValueError(f"TrainConfig: {name} must be {need}, got {getattr(self, name)!r}")

        if not is_int(self.epochs) or self.epochs < 1:
            fail("epochs", "an integer >= 1")
        if not is_real(self.lr) or self.lr <= 0:
            fail("lr", "a finite number > 0")
        if not isinstance(self.optimizer, str) or self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"TrainConfig: unknown optimizer {self.optimizer!r}; valid optimizers are "
                f"{list(OPTIMIZERS)}"
            )
        if not is_real(self.momentum) or not 0.0 <= self.momentum < 1.0:
            fail("momentum", "a number in [0, 1)")
        if not is_real(self.weight_decay) or self.weight_decay < 0:
            fail("weight_decay", "a finite number >= 0")
        if not isinstance(self.schedule, str) or self.schedule not in SCHEDULES:
            raise ValueError(
                f"TrainConfig: unknown schedule {self.schedule!r}; valid schedules are "
                f"{list(SCHEDULES)}"
            )
        if not is_int(self.step_size) or self.step_size < 1:
            fail("step_size", "an integer >= 1")
        if not is_real(self.gamma) or self.gamma <= 0:
            fail("gamma", "a finite number > 0")
        if not isinstance(self.amp, bool):
            fail("amp", "True or False")
        if not isinstance(self.channels_last, bool):
            fail("channels_last", "True or False")
        if not isinstance(self.compile, bool):
            fail("compile", "True or False")
        if not isinstance(self.per_step, bool):
            fail("per_step", "True or False")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            fail("seed", "an integer in [0, 2**32)")
        if self.max_grad_norm is not None and (
            not is_real(self.max_grad_norm) or self.max_grad_norm <= 0
        ):
            fail("max_grad_norm", "a finite number > 0 or None")
        if not is_int(self.first_epoch) or self.first_epoch < 0:
            fail("first_epoch", "an integer >= 0 (where this stage starts in the run it is part of)")
        if self.schedule_epochs is not None and (not is_int(self.schedule_epochs)
                                                 or self.schedule_epochs < self.first_epoch + self.epochs):
            fail("schedule_epochs", f"None or an integer >= first_epoch + epochs = "
                                    f"{self.first_epoch + self.epochs} (the schedule's length in epochs)")
        # object.__setattr__ because the dataclass is frozen; a recorded config reads back equal.
        for name in ("epochs", "step_size", "seed", "first_epoch"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.schedule_epochs is not None:
            # A schedule that ends with this stage is the default: one config, one checkpoint check.
            span = int(self.schedule_epochs)
            object.__setattr__(self, "schedule_epochs", None if span == self.first_epoch + self.epochs else span)
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.max_grad_norm is not None:
            object.__setattr__(self, "max_grad_norm", float(self.max_grad_norm))


# --- evaluation -------------------------------------------------------------------------------


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
    dev = resolve_device(model, device, ddp=False)
    correct, total = count_correct(model, data, dev, False, "evaluate: data")
    if total == 0:
        raise ValueError(
            f"evaluate: data ({type(data).__name__}) yielded no labels, so there is no "
            f"accuracy to compute; pass at least one (input, label) batch"
        )
    return correct / total


def recalibrate_batchnorm(model: nn.Module, data: Iterable, *, batches: int = 50, seed: int = 0,
                          device: Any = None) -> int:
    """Re-estimate the running statistics of every BatchNorm of ``model`` from ``data``, in place.

    Cutting components changes what each layer outputs, and the BatchNorm after it normalises
    with statistics of the uncut model in eval mode, which can cost more accuracy than the cut
    itself (``benchmarks/RESULTS.md``, "BatchNorm statistics after the cut"). The
    statistics are reset and averaged (``momentum=None``) over the first ``batches`` batches of
    one draw of ``data``'s order (a DataLoader is redrawn from ``seed``, as :func:`train` draws an
    epoch, so no global random state is used), in training mode without gradients; weights are
    not touched. Each BatchNorm's momentum and the model's mode are restored afterwards, and on
    an error every statistic is put back as it was.

    Args:
        model: the model (BatchNorm layers with ``track_running_stats``; others are left alone).
        data: an iterable of (input, label) batches, e.g. the training DataLoader.
        batches: how many batches to average over (>= 1).
        seed: the order of a DataLoader's batches.
        device: where the batches go; by default the device of the model's parameters.

    Returns:
        The number of batches used: 0 when the model has no BatchNorm to recalibrate.

    Raises:
        ValueError: ``batches`` is not an integer >= 1, or ``data`` yielded no batches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate_batchnorm: model must be an nn.Module, got {type(model).__name__}")
    if not is_int(batches) or batches < 1:
        raise ValueError(f"recalibrate_batchnorm: batches must be an integer >= 1, got {batches!r}")
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"recalibrate_batchnorm: data must be an iterable of (input, label) batches such as a "
                        f"DataLoader, got {type(data).__name__}")
    dev = resolve_device(model, device, ddp=False)
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    was_training, used = model.training, 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches seen
        model.train()
        with torch.no_grad():
            for i, batch in enumerate(train_batches(data, seed, 0, Dist())):
                if i >= batches:
                    break
                x, _ = split_batch(batch, "recalibrate_batchnorm: data", i)
                model(to_device(x, dev, False))
                used += 1
        if not used:
            raise ValueError(f"recalibrate_batchnorm: data ({type(data).__name__}) yielded no batches; "
                             f"pass at least one (input, label) batch")
    except BaseException:
        with torch.no_grad():
            for m, (_, mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        raise
    finally:
        for m, (momentum, *_) in zip(norms, saved):
            m.momentum = momentum
        model.train(was_training)
    return used


# --- the loop ---------------------------------------------------------------------------------


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


def progress_bar(total: Optional[int], desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar on stderr, or None without tqdm (the "progress" extra); tqdm itself turns it off
    when stderr is not a terminal. Every stage of train and the CLI shows this bar."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, disable=None, file=sys.stderr, dynamic_ncols=True,
                leave=True, initial=initial)


@dataclass
class _Run:
    """One call of train(): what each epoch and step reads, and the progress they make."""

    net: nn.Module            # model, maybe in DistributedDataParallel, under torch.compile with config.compile
    model: nn.Module
    train_data: Iterable
    eval_data: Optional[Iterable]
    config: TrainConfig
    stage: str
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Optional[torch.amp.GradScaler]
    penalty: Optional[Callable]
    extra_loss: Optional[Callable]
    epoch_stats: Optional[Callable]
    ctx: Dist
    dev: torch.device
    amp: bool
    channels_last: bool
    out_dir: Optional[PathLike]
    state: Progress
    show_bar: bool
    bar: Any = None           # the stage's progress bar, made in its first epoch
    compiled: bool = False    # config.compile's first forward has run (so torch.compile worked)


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
    the epoch ran at (with ``config.per_step``, its first step's) and ``accuracy`` is None without
    ``eval_data``.

    Args:
        model: any nn.Module returning (batch, classes) logits, including a GraphModule with
            parametrized modules. It is moved to the device and left in the mode it was given in.
        train_data: an iterable of (input, label) batches. A DataLoader over a map-style
            dataset is rebuilt each epoch with its order drawn from ``config.seed + config.first_epoch + epoch``
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
    check_train_data(train_data, config.epochs)
    callbacks = stateful(penalty=penalty, epoch_stats=epoch_stats, extra_loss=extra_loss)
    dev = resolve_device(model, device, wants_ddp())
    ctx = setup_distributed(dev)
    on_cuda = dev.type == "cuda"
    amp = config.amp and on_cuda
    channels_last = config.channels_last

    model.to(dev)
    # channels-last is how this stage trains, not what it returns: what it converts is put back at its end
    converted = model_to_channels_last(model) if channels_last else []
    try:
        opt = make_optimizer(model, config.optimizer, lr=config.lr, momentum=config.momentum,
                             weight_decay=config.weight_decay)
        sched = make_scheduler(opt, config.schedule, epochs=config.epochs, step_size=config.step_size,
                               gamma=config.gamma, first_epoch=config.first_epoch,
                               schedule_epochs=config.schedule_epochs)
        scaler = torch.amp.GradScaler("cuda") if amp else None
        saved = Resumable(stage, config, model, opt, sched, scaler, callbacks)

        files = CheckpointFiles(Path(out_dir), stage) if out_dir is not None else None
        state = start_stage(files, saved, resume, config.seed, ctx)
        if state.epoch >= config.epochs:
            log.info("train: stage %r already finished %d epoch(s); returning its history",
                     stage, state.epoch)
            return state.history

        warn_unsharded(train_data, ctx)
        net = wrap_ddp(model, ctx, dev)
        # Only the step is compiled: checkpoints keep model's state_dict and evaluation its eager forward.
        run = _Run(net=torch.compile(net) if config.compile else net, model=model, train_data=train_data,
                   eval_data=eval_data, config=config, stage=stage, opt=opt, sched=sched, scaler=scaler,
                   penalty=penalty, extra_loss=extra_loss, epoch_stats=epoch_stats, ctx=ctx, dev=dev,
                   amp=amp, channels_last=channels_last, out_dir=out_dir, state=state,
                   show_bar=progress and ctx.main)
        was_training = model.training
        try:
            while state.epoch < config.epochs:
                record = _run_epoch(run)
                state.history.append(record)
                state.epoch += 1
                if files is not None:
                    files.save_epoch(saved, state, ctx)
        except KeyboardInterrupt:
            if ctx.main:
                where = state.where_saved(out_dir)
                how = ("run again with resume=True (fxtucker ... --resume) to continue from it"
                       if state.saved is not None else "nothing can be resumed yet")
                log.warning("train: stage %r interrupted in epoch %d (0-based) of %d; %s: %s",
                            stage, state.epoch, config.epochs, where, how)
            raise
        finally:
            model.train(was_training)
            if run.bar is not None:
                run.bar.close()
        return state.history
    finally:
        restore_strides(converted)


def _set_step_rate(run: _Run, epoch: int, i: int, steps: Optional[int]) -> None:
    """``per_step``: the rate of step ``i`` of the stage's epoch ``epoch`` (of ``steps``), a function of
    where the step lies in the run's schedule alone, so a resumed run, a rank of another batch count
    or an epoch of another length each get theirs."""
    config = run.config
    if steps is None:
        raise ValueError("train: TrainConfig.per_step needs each epoch's batches to have a len() (a DataLoader or "
                         "a list) to place each step on the schedule; give a DataLoader or leave per_step False")
    span = config.schedule_epochs or config.first_epoch + config.epochs
    factor = lr_factor(config.schedule, config.first_epoch + epoch + i / steps, span=span,
                       step_size=config.step_size, gamma=config.gamma)
    for group in run.opt.param_groups:
        group["lr"] = group["initial_lr"] * factor


def _run_epoch(run: _Run) -> dict:
    """Train one epoch, evaluate, and return its record."""
    config, epoch = run.config, run.state.epoch
    start = time.perf_counter()
    batches = train_batches(run.train_data, config.seed, config.first_epoch + epoch, run.ctx)
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    per_step = config.per_step and config.schedule != "constant"
    if per_step:
        _set_step_rate(run, epoch, 0, total)
    lr = float(run.opt.param_groups[0]["lr"])  # with per_step, the epoch's first step's
    if run.show_bar and run.bar is None:
        # One bar for the whole stage, so that its ETA covers every epoch left; after a resume it
        # starts at the epochs already done (tqdm's ETA counts only the steps timed here).
        run.bar = progress_bar(None if total is None else total * config.epochs, run.stage,
                               initial=0 if total is None else total * epoch)
    bar = run.bar
    epoch_text = f"{epoch + 1}/{config.epochs}"
    # Sums over the epoch, over every rank: ce * n, penalty * n, correct, n.
    sums = [0.0, 0.0, 0.0, 0.0]
    run.net.train()
    for i, batch in enumerate(batches):
        if per_step:
            _set_step_rate(run, epoch, i, total)
        step_sums = _step(run, batch, i, lr)
        for k in range(4):
            sums[k] += step_sums[k]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=epoch_text, loss=f"{(sums[0] + sums[1]) / sums[3]:.4f}",
                            acc=f"{sums[2] / sums[3]:.3f}", refresh=False)
    if sums[3] == 0:
        raise ValueError(
            f"train: train_data yielded no batches in epoch {epoch} of stage {run.stage!r}; it "
            f"must yield at least one (input, label) batch per epoch (a generator is used up "
            f"after one pass: pass a list or a DataLoader)"
        )
    # DDP sends rank 0's buffers before each forward, so after the last one every rank has
    # its own batch statistics: without this, evaluation, the checkpoint and the model a
    # stage returns would differ between the ranks.
    run.ctx.broadcast_buffers(run.model)
    if not config.per_step:  # with per_step, _set_step_rate sets each step's rate instead
        run.sched.step()
    accuracy = None
    if run.eval_data is not None:
        c, t = count_correct(run.model, eval_batches(run.eval_data, config.seed, run.ctx), run.dev,
                              run.amp, "train: eval_data", channels_last=run.channels_last)
        c, t = run.ctx.sum(torch.tensor([c, t], dtype=torch.float64)).tolist()
        if t == 0:
            raise ValueError(f"train: eval_data yielded no batches in epoch {epoch} of stage "
                             f"{run.stage!r}; pass at least one (input, label) batch, or "
                             f"eval_data=None")
        accuracy = c / t
    count = sums[3]
    record = {
        "stage": run.stage,
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
    if run.epoch_stats is not None:
        record.update(check_stats(run.epoch_stats(run.model), RECORD_KEYS))
    record["seconds"] = time.perf_counter() - start
    log.info("train: %s", json.dumps(record))
    return record


def _step(run: _Run, batch: object, i: int, lr: float) -> list[float]:
    """One optimizer step on batch ``i`` of the epoch; its [ce * n, penalty * n, correct, n] over the ranks."""
    state, epoch, model, opt, config = run.state, run.state.epoch, run.model, run.opt, run.config
    x, y = split_batch(batch, "train: train_data", i)
    x = to_device(x, run.dev, run.channels_last)
    y = y.to(run.dev, non_blocking=True)
    with torch.autocast(device_type=run.dev.type, dtype=torch.float16, enabled=run.amp):
        out = _forward(run, x)
        ce = F.cross_entropy(out, y)  # float32 under autocast, the model's dtype otherwise
    pen = torch.zeros((), device=ce.device)
    if run.penalty is not None:
        pen = check_penalty(run.penalty(model, epoch, state.step), epoch, state.step)
    if run.extra_loss is not None:  # e.g. distillation: it sees the batch and the outputs
        pen = pen.to(ce.device) + check_penalty(run.extra_loss(x, out, y), epoch, state.step).to(ce.device)
    loss = ce + pen.to(device=ce.device, dtype=ce.dtype)
    # All ranks see the same sums, so all of them stop together on a NaN.
    step_sums = run.ctx.sum(batch_sums(ce, pen, out, y).cpu()).tolist()
    step_ce, step_pen = step_sums[0] / step_sums[3], step_sums[1] / step_sums[3]
    if not math.isfinite(step_ce + step_pen):
        raise TrainingDiverged(
            f"train: stage {run.stage!r} diverged in epoch {epoch} (0-based) at step "
            f"{state.step} (batch {i} of the epoch): the loss is {step_ce + step_pen} "
            f"(cross-entropy {step_ce}, penalty {step_pen}), so training stopped before "
            f"this step; {state.where_saved(run.out_dir)}. Lower lr (it is {lr:g}), set "
            f"max_grad_norm or weaken the penalty, then run the stage again",
            stage=run.stage, epoch=epoch, step=state.step, checkpoint=state.saved,
        )
    opt.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        if config.max_grad_norm is not None:
            run.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        run.scaler.step(opt)
        run.scaler.update()
    else:
        loss.backward()
        if config.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
    after_step = getattr(run.penalty, "after_step", None)
    if after_step is not None:
        with torch.no_grad():
            after_step(model, epoch, state.step, opt.param_groups[0]["lr"])
    state.step += 1
    return step_sums


def _forward(run: _Run, x: Any) -> torch.Tensor:
    """run.net(x); with config.compile, a failing first call (the one that compiles) says torch.compile failed."""
    if not run.config.compile or run.compiled:
        return run.net(x)
    try:
        out = run.net(x)
    except Exception as e:  # noqa: BLE001 - dynamo and inductor raise many types; all mean "did not compile"
        found = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:300]
        raise RuntimeError(
            f"train: config.compile=True, but torch.compile could not compile the training step of "
            f"{type(run.model).__name__} on {run.dev} ({type(e).__name__}: {found}); train without it "
            f"(compile=False, or drop --compile), or give torch.compile what it needs (on the CPU, its "
            f"inductor back end needs a working C++ compiler)"
        ) from e
    run.compiled = True
    return out
