"""The training checkpoint: its format, the files of a stage in ``out_dir``, and the RNG state.

A checkpoint is ``torch.save({"format": CHECKPOINT_FORMAT, "sha256": fxtucker.io.digest(payload),
"payload": payload})``, written through :func:`fxtucker.io.write_atomic` after every epoch with
the one before it kept as ``<stage>.ckpt.prev``; ``<stage>.jsonl`` holds one history record per
line. The payload holds the stage, the config, the progress (epochs, steps, history), the
state_dicts of the model, optimizer, schedule, scaler and stateful callbacks, and every rank's
RNG state, so a resumed run repeats the uninterrupted one bitwise. Reading loads with
``weights_only=True``, checks the checksum (damage) and the schema (a crafted file), and falls
back from ``.ckpt`` to ``.prev``; an unusable file is set aside as ``<name>.bad``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from fxtucker.distributed import Dist
from fxtucker.io import append_line, digest, is_int, load_error, write_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointFiles",
    "Progress",
    "Resumable",
    "stateful",
    "start_stage",
    "seed_everything",
    "rng_state",
    "set_rng_state",
]

#: The ``"format"`` entry of a checkpoint written by :func:`fxtucker.train.train`.
CHECKPOINT_FORMAT = "fxtucker-train-checkpoint/1"

log = logging.getLogger(__name__)


# --- RNG state --------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    """Every RNG state as tensors and plain types, so ``weights_only`` loading reads it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (the CUDA states only on as many devices)."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --- the payload ------------------------------------------------------------------------------


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


def stateful(**fns: Any) -> dict:
    """The callbacks that carry state across epochs: those with state_dict and load_state_dict."""
    return {name: fn for name, fn in fns.items()
            if callable(getattr(fn, "state_dict", None)) and callable(getattr(fn, "load_state_dict", None))}


@dataclass
class Progress:
    """How far a stage got: what the loop carries between epochs and a checkpoint records."""

    epoch: int = 0          # epochs finished
    step: int = 0           # optimizer steps taken
    history: list = dataclasses.field(default_factory=list)
    saved: Optional[Path] = None   # the last good checkpoint
    saved_epochs: int = 0          # epochs it holds

    def where_saved(self, out_dir: Any) -> str:
        """Where the last good checkpoint is, as a phrase for a message."""
        if out_dir is None:
            return "nothing is saved because out_dir was not given"
        if self.saved is None:
            return "no checkpoint was written yet (no epoch finished)"
        return f"the last good checkpoint, after {self.saved_epochs} epoch(s), is kept at {self.saved}"


@dataclass
class Resumable:
    """What a checkpoint saves besides the progress, and restores on resume."""

    stage: str
    config: Any             # the stage's TrainConfig, recorded as dataclasses.asdict
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    callbacks: dict         # stateful() callbacks by name

    def payload(self, progress: Progress, rngs: list) -> dict:
        """The checkpoint payload after ``progress``, every tensor on the CPU; ``rngs``: one state per rank."""
        return _to_cpu({
            "stage": self.stage,
            "config": dataclasses.asdict(self.config),
            "epoch": progress.epoch,
            "step": progress.step,
            "history": progress.history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs,
            "callbacks": self._callback_states(),
        })

    def _callback_states(self) -> dict:
        states = {}
        for name, obj in self.callbacks.items():
            st = obj.state_dict()
            if not isinstance(st, dict):
                raise TypeError(f"train: {name}.state_dict() returned a {type(st).__name__}; it must "
                                f"return a dict of tensors, numbers, strings, lists and dicts")
            states[name] = st
        return states

    def restore(self, path: Path, payload: dict, ctx: Dist) -> Progress:
        """Load a verified checkpoint into the model, optimizer, schedule, scaler, callbacks and RNGs."""
        # A field the checkpoint lacks was added to the config after it was written: it ran at the default.
        defaults = {f.name: f.default for f in dataclasses.fields(self.config)}
        stored = {**defaults, **payload["config"]}
        current = dataclasses.asdict(self.config)
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
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            found = " ".join(str(e).split())  # load_state_dict's message spans lines
            raise ValueError(
                f"train: checkpoint {path} does not fit this model ({found}); resume with the model "
                f"the run started from, or pass resume=False to start the stage over"
            ) from e
        if self.scaler is not None and payload["scaler"] is not None:
            self.scaler.load_state_dict(payload["scaler"])
        stored_callbacks = payload.get("callbacks") or {}
        missing = sorted(set(self.callbacks) - set(stored_callbacks))
        if missing:
            raise ValueError(
                f"train: checkpoint {path} holds no state for the stateful {', '.join(missing)} of this "
                f"call; resume with the callbacks the run started with, or pass resume=False to start "
                f"the stage over"
            )
        for name, obj in self.callbacks.items():
            obj.load_state_dict(stored_callbacks[name])
        states = payload["rng"]
        if len(states) != ctx.world:
            warnings.warn(f"train: checkpoint {path} was written by {len(states)} process(es), this "
                          f"run has {ctx.world}; the resumed run will not repeat the original one "
                          f"exactly", stacklevel=4)  # train()'s caller, through start_stage()
        set_rng_state(states[ctx.rank] if ctx.rank < len(states) else states[0])
        epochs = int(payload["epoch"])
        return Progress(epoch=epochs, step=int(payload["step"]), history=list(payload["history"]),
                        saved=path, saved_epochs=epochs)


def start_stage(files: Optional["CheckpointFiles"], saved: Resumable, resume: bool, seed: int,
                ctx: Dist) -> Progress:
    """Where a stage starts: with ``resume``, the newest usable checkpoint in ``files`` restored into
    ``saved``; else epoch 0, the RNGs seeded with ``seed`` plus the rank. The files are made to match."""
    loaded, bad = files.open(ctx, resume) if files is not None else (None, [])
    if loaded is not None:
        progress = saved.restore(*loaded, ctx)
    else:
        progress = Progress()
        seed_everything(seed + ctx.rank)
    if files is not None:
        files.settle(bad, resume, progress.history, ctx)
    return progress


# --- reading ----------------------------------------------------------------------------------


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
        actual = digest(payload)
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
        if not is_int(payload[key]) or payload[key] < 0:
            raise bad(key, "an integer >= 0")
    for key in ("stage",):
        if not isinstance(payload[key], str):
            raise bad(key, "a str")
    for key in ("config", "scheduler"):
        if not isinstance(payload[key], dict):
            raise bad(key, "a dict")
    epochs = payload["config"].get("epochs")
    if not is_int(epochs) or payload["epoch"] > epochs:
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
    """Whether one rank's RNG state has the types rng_state() writes (so set_rng_state cannot crash)."""
    def u8(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1

    n, py = state["numpy"], state["python"]
    return (u8(state["torch"]) and isinstance(state["cuda"], list) and all(u8(t) for t in state["cuda"])
            and isinstance(n, dict) and isinstance(n.get("name"), str)
            and isinstance(n.get("keys"), torch.Tensor) and n["keys"].dtype == torch.int64 and n["keys"].numel() == 624
            and is_int(n.get("pos")) and is_int(n.get("has_gauss")) and isinstance(n.get("cached"), float)
            and isinstance(py, (list, tuple)) and len(py) == 3 and is_int(py[0])
            and isinstance(py[1], (list, tuple)) and len(py[1]) == 625 and all(is_int(v) for v in py[1])
            and (py[2] is None or isinstance(py[2], float)))


# --- the files of a stage ---------------------------------------------------------------------


@dataclass
class CheckpointFiles:
    """The files of one stage in out_dir: ``<stage>.ckpt``, ``<stage>.ckpt.prev``, ``<stage>.jsonl``.

    Under DDP every rank calls :meth:`open`, :meth:`settle` and :meth:`save_epoch`; only rank 0
    writes, and the others learn whether it failed.
    """

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

    def open(self, ctx: Dist, resume: bool) -> tuple[Optional[tuple[Path, dict]], list[Path]]:
        """Make out_dir, clear killed writes' temp files and, with ``resume``, :meth:`load`."""
        if ctx.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.remove_temps()
        ctx.barrier()
        # stacklevel 5: load, open, start_stage, train, then train()'s caller
        loaded, bad = self.load(say=ctx.main, stacklevel=5) if resume else (None, [])
        ctx.barrier()  # every rank has read before rank 0 writes
        return loaded, bad

    def settle(self, bad: list[Path], resume: bool, history: list[dict], ctx: Dist) -> None:
        """Set the unusable checkpoints aside and make the files start where ``history`` ends."""
        failed = False
        if ctx.main:
            try:
                self.set_aside(bad)
                if not resume:
                    self.start_fresh(stacklevel=5)  # train()'s caller, through start_stage()
                else:
                    self.rewrite_log(history)
            except OSError:
                failed = True
                raise
            finally:
                ctx.main_failed(failed)
        elif ctx.main_failed(False):
            raise RuntimeError(f"train: rank 0 could not prepare the files of stage {self.stage!r} in "
                               f"{self.out_dir}; see its error")

    def save_epoch(self, what: Resumable, progress: Progress, ctx: Dist) -> None:
        """Rank 0 appends the last record and writes the checkpoint; every rank learns if it failed."""
        rngs = ctx.gather(rng_state())
        error: Optional[OSError] = None
        if ctx.main:
            writing = self.log
            try:
                self.append(progress.history[-1])
                writing = self.ckpt
                self.save(what.payload(progress, rngs))
            except OSError as e:
                error = e
                kept = (f"the previous checkpoint {progress.saved} (after {progress.saved_epochs} epoch(s)) "
                        f"is left as it was" if progress.saved is not None else
                        "no earlier checkpoint exists")
                message = (
                    f"train: could not write {writing} after epoch {progress.epoch - 1} (0-based) of stage "
                    f"{self.stage!r}: {e}; {kept}. Free disk space or fix the permissions of "
                    f"{self.out_dir}, then run again with resume=True"
                )
        if ctx.main_failed(error is not None):
            if error is not None:
                raise OSError(message) from error
            raise RuntimeError(f"train: rank 0 could not write the checkpoint of stage {self.stage!r} "
                               f"after epoch {progress.epoch - 1}; see its error")
        progress.saved, progress.saved_epochs = self.ckpt, progress.epoch

    def remove_temps(self) -> None:
        """Remove temp files left by a write that was killed."""
        for pattern in (f".{self.stage}.ckpt.tmp.*", f".{self.stage}.ckpt.prev.tmp.*",
                        f".{self.stage}.jsonl.tmp.*"):
            for leftover in self.out_dir.glob(pattern):
                leftover.unlink(missing_ok=True)

    def start_fresh(self, stacklevel: int = 2) -> None:
        """Remove the files of an earlier run of this stage, saying so."""
        old = [p for p in (self.ckpt, self.prev, self.log) if p.exists()]
        if old:
            warnings.warn(
                f"train: stage {self.stage!r} starts over (resume=False) and removes the files of "
                f"an earlier run: {', '.join(str(p) for p in old)}; pass resume=True (--resume on the "
                f"command line) to continue that run instead",
                stacklevel=stacklevel,
            )
        for p in old:
            p.unlink()

    def set_aside(self, paths: list[Path]) -> None:
        """Rename unusable checkpoints to ``<name>.bad``: kept for a look, out of the rotation."""
        for path in paths:
            if path.exists():
                os.replace(path, path.with_name(path.name + ".bad"))

    def load(self, say: bool, stacklevel: int = 2) -> tuple[Optional[tuple[Path, dict]], list[Path]]:
        """The newest usable checkpoint (ckpt, else .prev) with its payload, and the unusable ones.

        ``say``: warn about what is unusable (rank 0 only, so the warning shows once), at
        ``stacklevel`` as if this method called ``warnings.warn``.
        """
        def warn(message: str) -> None:
            if say:
                warnings.warn(f"train: {message}", stacklevel=stacklevel + 1)

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
        write_atomic(self.log, "".join(json.dumps(r) + "\n" for r in history))

    def save(self, payload: dict) -> None:
        """Write the checkpoint atomically, the one it replaces kept as ``.prev``."""
        checkpoint = {"format": CHECKPOINT_FORMAT, "sha256": digest(payload), "payload": payload}
        write_atomic(self.ckpt, lambda f: torch.save(checkpoint, f), keep_prev=True)
