"""compress(): the paper's four steps end to end, around the pass chain and the training loop."""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from fxtucker import pipeline, regularizers
from fxtucker.batches import model_to_channels_last
from fxtucker.budget import (GatePenalty, component_macs, floor_for_budget, gate_histogram, gate_stats, pruned_share,
                             threshold_for_budget)
from fxtucker.distill import TeacherCache, distillation_loss
from fxtucker.io import is_int, is_real
from fxtucker.passes import cost_model, layer_nodes
from fxtucker.passes.compose_factors import compose_factors
from fxtucker.passes.decompose_conv import METHODS as DECOMPOSITION_METHODS
from fxtucker.passes.plan_decomposition import NOT_POINTWISE
from fxtucker.report import report
from fxtucker.tracing import trace
from fxtucker.train import TrainConfig, evaluate, recalibrate_batchnorm, train

__all__ = ["CompressConfig", "CompressResult", "compress", "threshold_for_budget", "gate_histogram", "GatePenalty",
           "component_macs", "cut_layers"]


@dataclass(frozen=True)
class CompressConfig:
    """Hyper-parameters of :func:`compress`; every field can come from a TOML file.

    Steps (Chu and Lee 2021): 1. decompose at ``ranks`` (full rank by default; kxk convs by Tucker-2,
    or as SVD pairs with ``method="svd"``, see :func:`~fxtucker.passes.decompose_conv`) and insert gates;
    2. train ``train_epochs`` with cross-entropy at ``train_lr``; 3. train ``reg_epochs`` with
    cross-entropy + ``reg_weight`` x sum of ``reg``(gate, c) over all gates of all layers, c
    following ``c_schedule`` from ``c_start`` (to ``c_end`` for "linear"; times ``c_factor`` every
    ``c_every`` epochs for "exp"); strip every gate below ``threshold``; 4. fold-or-restore and
    fine-tune ``finetune_epochs``, optionally distilling from the original model (``distill``;
    ``distill_reg`` distills in step 3 as well, so that the penalty removes components while the
    loss keeps the model's outputs close to the original's; ``distill_reg_weight`` weighs it there,
    ``distill_weight`` by default).

    ``target_macs`` (or ``target_speedup`` = MACs before / MACs after) replaces ``threshold``: the
    smallest global threshold whose result, after fold-or-restore, fits the budget is used. With a
    budget and ``steer`` (the default), ``reg_weight`` is only lambda's starting value: every
    ``steer_every`` steps of step 3, lambda is raised or lowered so that the MACs left by cutting
    the gates at exactly 0 follow a path from the full model to the budget (reached one epoch
    before the end of step 3), so that the gates cut at the end are the ones the funnel has
    already pulled to zero (see :class:`GatePenalty`). ``reach`` sets when the zeros meet the budget:
    by the end of that epoch of step 3 (a float; None, the default: all epochs but the last, half of
    a single one). ``c_per_step`` (off by default) moves c every optimizer step of step 3 instead of
    once an epoch, so that it reaches ``c_end`` where the zeros meet the budget: by epoch, with two
    epochs of step 3, c stays at ``c_start`` through the first, where the zeros meet the budget, and
    the funnel's narrowing never acts on which components are cut. ``reg_weight="auto"`` (the default)
    calibrates lambda from ``reg_lr`` and the steps of step 3 (:func:`auto_reg_weight`).
    ``compose`` trains steps 2 and 3 through :func:`~fxtucker.passes.compose_factors` (one conv per
    layer; the same function and gradients, at about the original model's cost).

    ``relative_gates`` (beyond the paper, on by default): the penalty and the threshold see each
    gate relative to the mean magnitude of its gate vector. A BatchNorm after a layer makes the
    scale of its gates arbitrary; with absolute gates the penalty shrinks whole layers instead of
    sparsifying them, and without weight decay on the gates their scale drifts in training.
    ``proximal`` (also on by default) applies the penalty by a proximal step after each
    optimizer step, which takes small gates to exactly 0 instead of letting them oscillate
    around it (see :class:`GatePenalty`). ``mac_weighted`` (on by default) weights each gate's
    penalty by the MACs of its component, since the budget is in MACs; ``live_mac_weights`` (off
    by default) by what the component saves at the ranks still alive instead of at full rank.
    ``rank_floor`` (0 by default) keeps that share of every mode's rank whatever the budget or
    threshold (the components with the largest gates, which the penalty then does not pull), so
    that the global cut cannot take a mode below ``ceil(rank_floor x rank)``. ``floor_share`` (with
    a budget; None by default) sets ``rank_floor`` from the budget instead: the largest floor that
    holds at most that share of the budget's MACs (:func:`~fxtucker.budget.floor_for_budget`), the
    funnel choosing the rest globally; the report's ``rank_floor`` says which floor that was (a
    warning when not even one component per mode fits: no floor). On ResNet-20 the floors chosen on
    validation in benchmarks/RESULTS.md (session 27) held 0.91 of the budget at 2x, 0.83 at 3x.
    On ResNet-20, above the floor the two modes of a layer did not share the cut: the mode pulled
    harder lost all of its components above the floor (the output mode by default, the input mode
    with ``penalty_per_component``; benchmarks/RESULTS.md, session 35).

    ``one_schedule`` (off by default): steps 2-4 train as one run of all their epochs instead of
    three runs that each start again: the learning rate follows one ``schedule`` over all of them
    (each stage at its own base rate, ``train_lr``, ``reg_lr`` or ``finetune_lr``; with the default
    cosine and rates, fine-tuning goes on from where step 3 left the rate rather than from the top),
    and each epoch's data order is that epoch's of the whole run (without it, fine-tuning's epoch e
    sees step 3's epoch e's order). See :class:`~fxtucker.train.TrainConfig`'s ``first_epoch``.

    ``lr_per_step`` (off by default): every stage moves its learning rate after each optimizer
    step instead of once an epoch (:class:`~fxtucker.train.TrainConfig`'s ``per_step``), so that
    a stage of a few epochs ends its cosine near 0 (once an epoch, one fine-tuning epoch runs at
    its start rate throughout). ``"reg"``: step 3 only, the other stages once an epoch; with
    ``one_schedule`` step 3 then glides down the shared cosine to where fine-tuning takes it up,
    and fine-tuning runs as it would without it.

    ``pointwise`` (on by default): 1x1 convs are decomposed (into SVD pairs) and gated like the
    others; off, they stay whole and the budget is met on the other layers (a ResNet's 1x1
    shortcuts hold about 1% of its MACs; under the unweighted penalty the cut takes them as far as
    any layer).

    ``scale_free_gates`` (off by default; with ``relative_gates``): step 3 moves every gate vector at
    one rate in units of its own mean (:class:`GatePenalty`'s ``scale_free``): a gate's gradient and
    its proximal shrink both go as 1 / mean^2 in those units otherwise, so the layers whose gates a
    BatchNorm happens to leave small move faster.

    ``penalty_per_component`` (off by default): step 3 pulls each component once (:class:`GatePenalty`'s
    ``per_component``). By default every gate is pulled in full, and an output-mode component has two
    (``gate_core``, ``gate_out``) against an input-mode component's one, so the output mode is pulled
    about twice as hard: under ``rank_floor`` the output rank of every layer ends at its floor (with
    it, the input rank does).

    ``cache_teacher`` (off by default): distillation keeps the teacher's output for every input it
    has seen (:class:`~fxtucker.distill.TeacherCache`, up to 1 GiB), so an input that comes back in a
    later epoch or stage costs a lookup instead of a forward of the original model; with a fixed
    training set, every epoch after the first. :func:`compress`'s ``teacher_cache`` shares one cache
    between runs distilled from the same model.

    ``recalibrate_bn`` (50 by default; 0: off): after the cut, every BatchNorm's running statistics
    are re-estimated from that many training batches (:func:`~fxtucker.train.recalibrate_batchnorm`),
    so that the pruned model is judged, and returned without fine-tuning, with statistics of its
    own layers instead of the uncut ones. The report keeps the cut's accuracy (``pruned``) and adds
    ``recalibrated``; no weight changes, and fine-tuning (which normalises by batch statistics)
    trains the same weights either way.
    """

    ranks: Union[None, float, str] = None
    method: str = "tucker2"  # how kxk convs are decomposed: "tucker2" or "svd" (decompose_conv's method)
    linear: bool = False
    pointwise: bool = True  # decompose 1x1 convs too (SVD pairs); False leaves every conv with a 1x1(x1) kernel whole
    train_epochs: int = 2
    train_lr: float = 0.01
    reg_epochs: int = 6
    reg_lr: float = 0.01
    reg: str = "funnel"
    reg_weight: Union[float, str] = "auto"  # lambda; "auto": AUTO_SHRINK over step 3 (see auto_reg_weight)
    c_schedule: str = "linear"
    c_start: float = 1.0
    c_end: Optional[float] = 0.01
    c_factor: Optional[float] = None
    c_every: Optional[int] = None
    threshold: float = 0.01
    round_to: Optional[int] = None  # kept ranks rounded up to a multiple of this (strip_gates); the budget counts it
    rank_floor: float = 0.0  # share of each mode's rank always kept, the largest gates (strip_gates); not pulled
    floor_share: Optional[float] = None  # with a budget: rank_floor holding at most this share of its MACs
    target_macs: Optional[int] = None
    target_speedup: Optional[float] = None
    steer: bool = True
    steer_every: int = 10
    reach: Optional[float] = None  # with a budget: the epoch of step 3 by whose end the zeros meet it; None: all but the last
    c_per_step: bool = False  # c moves every optimizer step of step 3, reaching its end where the zeros meet the budget
    scale_free_gates: bool = False  # with relative_gates: every gate vector moves at one rate in its own units (GatePenalty)
    penalty_per_component: bool = False  # one pull per component: a two-gate component's gates pay half each (GatePenalty)
    relative_gates: bool = True
    proximal: bool = True
    mac_weighted: bool = True
    live_mac_weights: bool = False  # mac_weighted at the ranks still alive (GatePenalty's live_macs)
    compose: bool = True  # train through compose_factors: one conv per layer, same function and gradients
    c_follows_budget: bool = False  # with a budget: c = the gate size the budget would cut now (GatePenalty)
    max_shrink: float = 0.05  # lambda's cap: a proximal step shrinks a gate by at most this share of its vector's mean
    recalibrate_bn: int = 50  # batches that re-estimate BatchNorm statistics after the cut; 0: off
    finetune_epochs: int = 3
    finetune_lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    distill: bool = False  # fine-tuning distills from the original model
    distill_reg: bool = False  # step 3 distills from the original model too
    distill_weight: float = 0.5
    distill_reg_weight: Optional[float] = None  # step 3's distillation weight (with distill_reg); None: distill_weight
    distill_temperature: float = 4.0
    cache_teacher: bool = False  # keep the teacher's outputs by input (fxtucker.distill.TeacherCache): repeats cost no forward
    seed: int = 0
    compile: bool = False  # every stage's training step under torch.compile (TrainConfig.compile)
    one_schedule: bool = False  # steps 2-4 as one run: one learning-rate schedule and data stream (see above)
    lr_per_step: Union[bool, str] = False  # the rate moves every step, not every epoch; "reg": step 3 only (see above)
    channels_last: bool = False  # every stage (and the teacher) in the channels-last format (TrainConfig.channels_last)

    def __post_init__(self) -> None:
        """Every field checked here, in one place; the training fields by the TrainConfig they build."""
        bad = lambda name, want: ValueError(f"CompressConfig.{name} must be {want}, got {getattr(self, name)!r}")  # noqa: E731
        for name in ("train_epochs", "reg_epochs", "finetune_epochs"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        if self.reg_epochs < 1:
            raise ValueError("CompressConfig.reg_epochs must be >= 1: step 3 is what chooses the ranks")
        for name in ("train_lr", "reg_lr", "finetune_lr", "target_speedup"):
            if isinstance(getattr(self, name), bool):
                raise bad(name, "a number")
        for name in ("train_lr", "reg_lr", "finetune_lr"):
            if not is_real(getattr(self, name)) or not getattr(self, name) > 0:
                raise bad(name, "a finite number > 0")
        if self.reg not in regularizers.REGULARIZERS:
            raise ValueError(f"CompressConfig.reg {self.reg!r} is not known; valid: {sorted(regularizers.REGULARIZERS)}")
        if self.reg_weight != "auto" and (not is_real(self.reg_weight) or self.reg_weight < 0):
            raise ValueError(f"CompressConfig.reg_weight (lambda) must be 'auto' or a finite number >= 0, "
                             f"got {self.reg_weight!r}")
        if not is_real(self.threshold) or self.threshold < 0:
            raise bad("threshold", "a finite number >= 0 (paper: 0.01 to 0.02)")
        if self.target_macs is not None and self.target_speedup is not None:
            raise ValueError("give CompressConfig.target_macs or target_speedup, not both")
        if self.target_macs is not None and (not is_int(self.target_macs) or self.target_macs <= 0):
            raise bad("target_macs", "a positive integer")
        if self.target_speedup is not None and (not isinstance(self.target_speedup, numbers.Real)
                                                or not self.target_speedup >= 1):
            raise bad("target_speedup", "a number >= 1")
        if self.target_speedup is not None and not math.isfinite(self.target_speedup):
            raise bad("target_speedup", "a finite number >= 1")
        for name in ("steer", "relative_gates", "proximal", "mac_weighted", "live_mac_weights", "compose",
                     "c_follows_budget", "linear", "pointwise", "distill", "distill_reg", "compile", "one_schedule",
                     "channels_last", "cache_teacher", "c_per_step", "scale_free_gates", "penalty_per_component"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if not isinstance(self.lr_per_step, bool) and self.lr_per_step != "reg":
            raise bad("lr_per_step", "true, false or 'reg' (step 3 only)")
        if self.round_to is not None and (not is_int(self.round_to) or self.round_to < 1):
            raise bad("round_to", "None or an integer >= 1 (e.g. 8 or 16)")
        if not is_real(self.max_shrink) or not self.max_shrink > 0:
            raise bad("max_shrink", "a finite number > 0 (the share of a gate vector's mean one step may take; 0.05)")
        if not is_real(self.rank_floor) or not 0 <= self.rank_floor < 1:
            raise bad("rank_floor", "a number in [0, 1) (the share of each mode's rank always kept; 0: none)")
        if self.floor_share is not None:
            if not is_real(self.floor_share) or not 0 < self.floor_share <= 1:
                raise bad("floor_share", "None or a number in (0, 1] (the share of the MAC budget that rank_floor "
                                         "holds)")
            if self.target_macs is None and self.target_speedup is None:
                raise ValueError("CompressConfig.floor_share needs a MAC budget (target_macs or target_speedup): "
                                 "it is a share of the budget")
            if self.rank_floor:
                raise ValueError(f"give CompressConfig.rank_floor or floor_share, not both (rank_floor="
                                 f"{self.rank_floor!r}, floor_share={self.floor_share!r})")
        if not is_int(self.recalibrate_bn) or self.recalibrate_bn < 0:
            raise bad("recalibrate_bn", "an integer >= 0 (training batches that re-estimate BatchNorm statistics "
                                        "after the cut; 0: off)")
        if not is_int(self.steer_every) or self.steer_every < 1:
            raise bad("steer_every", "an integer >= 1 (optimizer steps)")
        if self.scale_free_gates and not self.relative_gates:
            raise ValueError("CompressConfig.scale_free_gates needs relative_gates=True (it measures every gate in "
                             "units of its vector's mean)")
        if self.reach is not None:
            if not is_real(self.reach) or not 0 < self.reach <= self.reg_epochs:
                raise bad("reach", f"None or a number in (0, reg_epochs={self.reg_epochs}] (the epoch of step 3 by "
                                   f"whose end the zeros meet the budget)")
            if self.target_macs is None and self.target_speedup is None:
                raise ValueError("CompressConfig.reach needs a MAC budget (target_macs or target_speedup): it says "
                                 "when the zeros meet it")
        r = self.ranks
        if not (r is None or r == "vbmf" or (is_real(r) and 0 < r <= 1)):
            raise bad("ranks", "None (full rank), a fraction in (0, 1] or 'vbmf'")
        if self.method not in DECOMPOSITION_METHODS:
            raise bad("method", f"one of {list(DECOMPOSITION_METHODS)} (how kxk convs are decomposed)")
        if not is_real(self.distill_weight) or self.distill_weight < 0:
            raise bad("distill_weight", "a finite number >= 0")
        if self.distill_reg_weight is not None:
            if not is_real(self.distill_reg_weight) or self.distill_reg_weight < 0:
                raise bad("distill_reg_weight", "None (distill_weight) or a finite number >= 0")
            if not self.distill_reg:
                raise ValueError(f"CompressConfig.distill_reg_weight={self.distill_reg_weight!r} weighs step 3's "
                                 f"distillation, which is off: set distill_reg=True too, or leave it None")
        if not is_real(self.distill_temperature) or not self.distill_temperature > 0:
            raise bad("distill_temperature", "a finite number > 0")
        self.c_schedule_fn(1)  # validates the schedule's arguments (the steps of an epoch count with c_per_step only)
        try:  # optimizer, momentum, weight_decay, schedule, seed: checked by the TrainConfig they build
            self.stage_config(1, 1.0)
        except ValueError as e:
            raise ValueError(str(e).replace("TrainConfig: ", "CompressConfig: ")) from None

    def c_schedule_fn(self, steps_per_epoch: Optional[int] = None) -> regularizers.CSchedule:
        """The c schedule, indexed by epoch of step 3; with ``c_per_step``, by its optimizer step
        (``steps_per_epoch`` of them an epoch): "linear" then reaches ``c_end`` where the zeros
        meet the budget (``reach``, or all epochs but the last) instead of at the start of the last
        epoch, and "exp" multiplies by ``c_factor`` every ``c_every`` epochs' steps."""
        kw: dict[str, Any] = {"c_start": self.c_start}
        per = steps_per_epoch if self.c_per_step else None
        if self.c_per_step and not (is_int(per) and per > 0):
            raise ValueError(f"CompressConfig.c_per_step needs the steps of an epoch of step 3 (training data with a "
                             f"len()), got {steps_per_epoch!r}")
        if self.c_schedule == "linear":
            if per:
                end = self.reach if self.reach is not None else max(self.reg_epochs - 1, self.reg_epochs / 2)
                kw.update(c_end=self.c_end, total=max(1, round(end * per)))
            else:
                kw.update(c_end=self.c_end, total=max(1, self.reg_epochs - 1))
        elif self.c_schedule == "exp":
            kw.update(factor=self.c_factor, every=self.c_every * per if per else self.c_every)
        return regularizers.c_schedule(self.c_schedule, **kw)

    def stage_config(self, epochs: int, lr: float, first_epoch: int = 0, reg: bool = False) -> TrainConfig:
        """The TrainConfig of a stage of ``epochs`` at ``lr``; with ``one_schedule``, one that starts
        ``first_epoch`` epochs into steps 2-4's shared schedule and data stream. ``reg``: the stage is
        step 3 (``lr_per_step="reg"`` moves its rate every step, no other stage's)."""
        run = (dict(first_epoch=first_epoch, schedule_epochs=self.train_epochs + self.reg_epochs + self.finetune_epochs)
               if self.one_schedule else {})
        return TrainConfig(epochs=epochs, lr=lr, optimizer=self.optimizer, momentum=self.momentum,
                           weight_decay=self.weight_decay, schedule=self.schedule, seed=self.seed,
                           compile=self.compile, per_step=self.lr_per_step is True or (reg and self.lr_per_step == "reg"),
                           channels_last=self.channels_last,
                           **run)

    @classmethod
    def from_toml(cls, path: Union[str, Path]) -> "CompressConfig":
        """Read a config from a TOML file of ``key = value`` lines (a ``[compress]`` table is also accepted)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        with path.open("rb") as f:
            data = tomllib.load(f)
        data = data.get("compress", data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**data)


#: Every CompressConfig field's default, as ``config.<field>``: a stored run that lacks a field predates
#: it and ran at its default, so it resumes when the field is still at that default (as checkpoints do
#: for TrainConfig, fxtucker.checkpoint).
CONFIG_DEFAULTS = {f"config.{f.name}": f.default for f in dataclasses.fields(CompressConfig)}


def _left_whole(gm: nn.Module) -> int:
    """How many convs ``pointwise=False`` left whole in ``gm``."""
    return sum(r.reason == NOT_POINTWISE for r in report(gm).layers)


def _nothing_decomposed(gm: nn.Module) -> str:
    """Why nothing was decomposed when no layer gave a warning."""
    whole = _left_whole(gm)
    return f"its {whole} conv(s) are 1x1, left whole by pointwise=False" if whole else "it has no conv layer"


@dataclass
class CompressResult:
    """What :func:`compress` returns: the compressed model, its report and the training history."""

    model: fx.GraphModule
    report: dict[str, Any]
    history: list[dict] = field(default_factory=list)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


#: With reg_weight="auto": the shrink, in units of a gate vector's mean, that the proximal steps of
#: step 3 add up to at slope 1 (chosen on the validation split: benchmarks/RESULTS.md, "tuning").
AUTO_SHRINK = 2.0


def auto_reg_weight(config: "CompressConfig", steps_per_epoch: Optional[int]) -> float:
    """lambda for ``reg_weight="auto"``: calibrated from the learning rate and the number of steps,
    so that the proximal steps of step 3 shrink a gate at slope 1 by about :data:`AUTO_SHRINK` times
    its vector's mean in all, whatever the data size and batch; a given number is used as it is.

    The cosine schedule is taken at half its start rate, its continuous mean, which is what step 3
    runs at with ``lr_per_step``. Stepped once an epoch (the default), its mean over E epochs is
    (1 + 1/E) / 2 of the start (0.75 for step 3's default 2), and with ``one_schedule`` step 3 runs
    at the top of a longer cosine: there the proximal steps add up to more than AUTO_SHRINK (1.5x
    at 2 epochs). AUTO_SHRINK was chosen on the validation split with this formula and the default
    schedule, and steering (``steer``) corrects lambda within step 3's first steps, so the formula
    stays as it was chosen."""
    if config.reg_weight != "auto":
        return float(config.reg_weight)
    if not steps_per_epoch:
        raise ValueError("CompressConfig.reg_weight='auto' needs train_data with a len() (a DataLoader or a list) to "
                         "count the steps of step 3; give reg_weight a number instead")
    mean_lr = config.reg_lr / 2 if config.schedule == "cosine" else config.reg_lr
    return AUTO_SHRINK / (mean_lr * steps_per_epoch * config.reg_epochs)


def _len(data: Iterable) -> Optional[int]:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _constant(model: nn.Module, inputs: tuple) -> bool:
    """Whether ``model`` (in eval mode) gives bitwise the same outputs for ``inputs`` and for other
    random inputs of the same shapes."""
    was = model.training
    model.eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        other = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) if t.is_floating_point() else t
                      for t in inputs)
        a, _ = tree_flatten(model(*inputs))
        b, _ = tree_flatten(model(*other))
    model.train(was)
    return all(torch.equal(u, v) for u, v in zip(a, b) if isinstance(u, torch.Tensor))


def cut_layers(before: nn.Module, pruned: fx.GraphModule, inputs: tuple) -> list[str]:
    """The layers at rank 0 in ``pruned`` when the cut made the model's output independent of its
    input (layers at rank 0 on every path: a downsampling block whose conv and shortcut are both at
    rank 0, say), so that it is a constant function no fine-tuning can recover; else []. A model that
    was constant before the cut (``before``: all its ReLUs dead on these inputs, say) gives []."""
    dead = [r["name"] for r in report(pruned).to_dict()["layers"] if r["ranks"] and 0 in r["ranks"]]
    if not dead or not _constant(pruned, inputs) or _constant(before, inputs):
        return []
    return dead


def _check_connected(gated: fx.GraphModule, pruned: fx.GraphModule, inputs: tuple, threshold: float,
                     budget: bool) -> None:
    """A ValueError when the cut made the model a constant function (:func:`cut_layers`)."""
    dead = cut_layers(gated, pruned, inputs)
    if not dead:
        return
    what = "that meets the MAC budget" if budget else "(CompressConfig.threshold)"
    fix = ("give a smaller budget (target_macs / target_speedup), or drop or lower round_to, which rounds ranks up "
           "and so leaves the budget fewer components to cut" if budget else "give a smaller threshold (paper: 0.01 "
           "to 0.02) or a smaller reg_weight")
    raise ValueError(f"compress: the threshold {threshold:.4g} {what} cuts every path from the input to the output "
                     f"(layers with a rank of 0: {', '.join(dead)}), so the pruned model is a constant function that "
                     f"no fine-tuning can recover; {fix}")


def compress(
    model: nn.Module,
    train_data: Iterable,
    example_inputs: Union[torch.Tensor, tuple],
    *,
    eval_data: Optional[Iterable] = None,
    config: Optional[CompressConfig] = None,
    out_dir: Optional[Union[str, Path]] = None,
    resume: bool = False,
    progress: bool = True,
    teacher_cache: Optional[TeacherCache] = None,
) -> CompressResult:
    """Compress a trained CNN by Tucker-2 decomposition with funnel-regularized rank selection.

    Args:
        model: the trained network (left untouched).
        train_data: iterable of (input, label) batches, e.g. a DataLoader.
        example_inputs: a tensor or tuple of tensors: one batch, for tracing and the cost model.
        eval_data: optional (input, label) batches; accuracy is measured after every stage.
        config: :class:`CompressConfig` (defaults if None).
        out_dir: where each stage writes its JSONL log and checkpoint; needed for ``resume``.
        resume: continue a killed run from the checkpoints in ``out_dir``.
        progress: progress bars.
        teacher_cache: a :class:`~fxtucker.distill.TeacherCache` for distillation's teacher outputs, to
            share with other runs distilled from the same model (it refuses another teacher); None
            makes one for this run where ``config.cache_teacher`` is on.

    Returns:
        :class:`CompressResult` with ``.model`` (a GraphModule of standard torch.nn modules),
        ``.report`` (MACs, params and accuracy before and after, accuracy per stage, the
        per-layer table) and ``.history`` (one record per epoch of every stage).

    Example::

        >>> result = fxtucker.compress(model, train_loader, torch.randn(1, 1, 28, 28), eval_data=test_loader)
        >>> result.report["macs_before"] / result.report["macs_after"]  # doctest: +SKIP
    """
    config = config or CompressConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress: model must be an nn.Module (the trained network), got {type(model).__name__}")
    if not isinstance(config, CompressConfig):
        raise TypeError(f"config must be a CompressConfig, got {type(config).__name__}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir: the checkpoints of the earlier run live there")
    if teacher_cache is not None and not isinstance(teacher_cache, TeacherCache):
        raise TypeError(f"compress: teacher_cache must be a fxtucker.distill.TeacherCache or None, "
                        f"got {type(teacher_cache).__name__}")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        raise TypeError(f"example_inputs must be a tensor or a tuple of tensors (one batch of the model's inputs), "
                        f"got {type(example_inputs).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors (one batch of the model's inputs)")
    torch.manual_seed(config.seed)
    original = copy.deepcopy(model).eval()
    if config.channels_last:  # the teacher of distillation sees the stages' channels-last batches
        model_to_channels_last(original)
    gm = trace(copy.deepcopy(model))
    macs_before = sum(n.meta["macs"] for n in cost_model(gm, *inputs).graph.nodes)
    if config.target_speedup is not None:
        target = int(macs_before / config.target_speedup)
    else:
        target = config.target_macs
    rep: dict[str, Any] = {"macs_before": macs_before, "params_before": _params(original),
                           "config": dataclasses.asdict(config), "stages": {}}
    acc = (lambda m: evaluate(m, eval_data)) if eval_data is not None else (lambda m: None)
    rep["accuracy_before"] = acc(original)
    kw = dict(eval_data=eval_data, out_dir=out_dir, resume=resume, progress=progress)
    if out_dir is not None:  # a resume may only continue the run whose config trained the stored gates
        from fxtucker.runs import record_run

        record_run(out_dir, {"config": rep["config"]}, resume=resume, name="compress.json", defaults=CONFIG_DEFAULTS)
    history: list[dict] = []

    # 1. decompose at full rank and gate every component
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gated = pipeline.decomposition(inputs, ranks=config.ranks, method=config.method, linear=config.linear,
                                       pointwise=config.pointwise)(gm)
    rep["skipped_layers"] = [str(w.message) for w in caught]
    if not layer_nodes(gated):  # nothing could be decomposed: the model comes back as it is, with the reasons
        warnings.warn(f"compress: no layer of the model can be decomposed, so it is returned unchanged and untrained"
                      f"{' (the MAC budget cannot be met)' if target is not None and target < macs_before else ''}: "
                      f"{'; '.join(rep['skipped_layers']) or _nothing_decomposed(gated)}", stacklevel=2)
        final = gated.eval()
        rep.update(macs_after=macs_before, params_after=_params(final), accuracy_after=rep["accuracy_before"],
                   target_macs=target, threshold=None, rank_floor=config.rank_floor, layers=report(final).to_dict()["layers"])
        return CompressResult(model=final, report=rep, history=history)
    rank_floor = config.rank_floor
    if config.floor_share is not None:  # __post_init__: only with a budget
        rank_floor = floor_for_budget(gated, config.floor_share * target, relative=config.relative_gates,
                                      round_to=config.round_to)
        if not rank_floor:
            warnings.warn(f"compress: floor_share={config.floor_share:g} of the budget ({target:,} MACs) does not hold "
                          f"one component of every mode, so there is no floor; raise floor_share", stacklevel=2)
    rep["rank_floor"] = rank_floor
    if target is not None:  # an impossible budget fails now, not after hours of training
        try:
            threshold_for_budget(gated, target, relative=config.relative_gates, round_to=config.round_to,
                                 rank_floor=rank_floor)
        except ValueError as e:
            whole = _left_whole(gated)
            raise (ValueError(f"{e}, or set pointwise=True: {whole} 1x1 conv(s) are left whole by pointwise=False")
                   if whole else e) from None
    # Training runs each layer as one conv composed from its factors and gates: the same function
    # and gradients as the gated chain, at about the original model's cost (compose_factors); the
    # stages' accuracy is measured on it too (a third of the gated chain's time).
    view = compose_factors(gated) if config.compose else gated
    rep["stages"]["decomposed"] = {"accuracy": acc(view), "macs": sum(n.meta["macs"] for n in gated.graph.nodes),
                                   "gate_histogram": gate_histogram(gated, relative=config.relative_gates)}

    # 2. train the decomposed model on the classification loss alone
    if config.train_epochs:
        history += train(view, train_data, config.stage_config(config.train_epochs, config.train_lr),
                         stage="decomposed", **kw)
        rep["stages"]["trained"] = {"accuracy": acc(view), "gate_histogram": gate_histogram(gated, relative=config.relative_gates)}

    # 3. the funnel (or other) penalty on all gates of all layers at once
    if teacher_cache is None and config.cache_teacher and (config.distill or config.distill_reg):
        teacher_cache = TeacherCache()
    kd = distillation_loss(original, config.distill_weight, config.distill_temperature, teacher_cache)  # with distill
    kd_reg = (kd if config.distill_reg_weight is None  # with distill_reg
              else distillation_loss(original, config.distill_reg_weight, config.distill_temperature, teacher_cache))
    rep["reg_weight_start"] = auto_reg_weight(config, _len(train_data))
    penalty = GatePenalty(gated, config.reg, rep["reg_weight_start"],
                          config.c_schedule_fn(_len(train_data)),
                          target_macs=target if config.steer else None, threshold=config.threshold,
                          epochs=config.reg_epochs, every=config.steer_every, relative=config.relative_gates,
                          proximal=config.proximal, round_to=config.round_to, mac_weighted=config.mac_weighted,
                          steps_per_epoch=_len(train_data), c_follows_budget=config.c_follows_budget,
                          live_macs=config.live_mac_weights, rank_floor=rank_floor,
                          max_shrink=config.max_shrink, reach=config.reach, c_per_step=config.c_per_step,
                          scale_free=config.scale_free_gates, per_component=config.penalty_per_component)
    rel = config.relative_gates
    threshold_fn = ((lambda g: threshold_for_budget(g, target, relative=rel, round_to=config.round_to,
                                                    rank_floor=rank_floor)) if target is not None
                    else (lambda g: config.threshold))
    try:
        history += train(view, train_data, config.stage_config(config.reg_epochs, config.reg_lr, config.train_epochs,
                                                               reg=True),
                         penalty=penalty,
                         epoch_stats=gate_stats(threshold_fn, penalty, gated), stage="regularize",
                         extra_loss=kd_reg if config.distill_reg else None, **kw)
    finally:
        penalty.remove_hooks()  # scale_free_gates' gradient hooks belong to step 3 only
    threshold = threshold_fn(gated)
    rep["threshold"], rep["reg_weight_end"] = threshold, penalty.weight
    rep["stages"]["regularized"] = {"accuracy": acc(view), "gate_histogram": gate_histogram(gated, relative=config.relative_gates),
                                    "pruning_ratio": pruned_share(gated, threshold, relative=rel,
                                                                  rank_floor=rank_floor)}

    # strip, then keep each decomposition only where it is cheaper (gates folded into weights)
    final = pipeline.pruning(inputs, threshold, round_to=config.round_to, relative=rel,
                             rank_floor=rank_floor)(copy.deepcopy(gated))
    _check_connected(gated, final, inputs, threshold, budget=target is not None)
    rep["stages"]["pruned"] = {"accuracy": acc(final), "macs": sum(n.meta["macs"] for n in final.graph.nodes)}
    # BatchNorm statistics of the pruned layers, not the uncut ones (no weight changes)
    if config.recalibrate_bn and recalibrate_batchnorm(final, train_data, batches=config.recalibrate_bn,
                                                       seed=config.seed):
        rep["stages"]["recalibrated"] = {"accuracy": acc(final)}

    # 4. fine-tune the compressed model
    if config.finetune_epochs:
        history += train(final, train_data, config.stage_config(config.finetune_epochs, config.finetune_lr,
                                                                config.train_epochs + config.reg_epochs),
                         extra_loss=kd if config.distill else None,
                         stage="finetune", **kw)
    final.eval()
    macs_after = sum(n.meta["macs"] for n in cost_model(final, *inputs).graph.nodes)
    rep.update(macs_after=macs_after, params_after=_params(final), accuracy_after=acc(final),
               target_macs=target, layers=report(final).to_dict()["layers"])
    rep["stages"]["finetuned"] = {"accuracy": rep["accuracy_after"]}
    if teacher_cache is not None:
        rep["teacher_cache"] = teacher_cache.stats()  # cumulative, where the cache is shared
    return CompressResult(model=final, report=rep, history=history)
