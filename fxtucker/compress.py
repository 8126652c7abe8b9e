"""compress(): the paper's four steps end to end, around the pass chain and the training loop."""

from __future__ import annotations

import bisect
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
import torch.nn.functional as F

from fxtucker import regularizers
from fxtucker.passes import cost_model, decompose_conv, fold_or_restore, gates, insert_gates, predict_macs, strip_gates
from fxtucker.meta import CORE, FIRST, GATE_CORE, GATE_IN, GATE_OUT, LAST, MACS
from fxtucker.passes._common import layer_nodes
from fxtucker.passes.compose_factors import compose_factors
from fxtucker.passes.decompose_conv import METHODS as DECOMPOSITION_METHODS
from fxtucker.passes.strip_gates import relative_gates
from fxtucker.report import report
from fxtucker.tracing import trace
from fxtucker.train import TrainConfig, evaluate, train

__all__ = ["CompressConfig", "CompressResult", "compress", "threshold_for_budget", "gate_histogram", "GatePenalty",
           "component_macs"]


@dataclass(frozen=True)
class CompressConfig:
    """Hyper-parameters of :func:`compress`; every field can come from a TOML file.

    Steps (Chu and Lee 2021): 1. decompose at ``ranks`` (full rank by default; kxk convs by Tucker-2,
    or as SVD pairs with ``method="svd"``, see :func:`~fxtucker.passes.decompose_conv`) and insert gates;
    2. train ``train_epochs`` with cross-entropy at ``train_lr``; 3. train ``reg_epochs`` with
    cross-entropy + ``reg_weight`` x sum of ``reg``(gate, c) over all gates of all layers, c
    following ``c_schedule`` from ``c_start`` (to ``c_end`` for "linear"; times ``c_factor`` every
    ``c_every`` epochs for "exp"); strip every gate below ``threshold``; 4. fold-or-restore and
    fine-tune ``finetune_epochs``, optionally distilling from the original model.

    ``target_macs`` (or ``target_speedup`` = MACs before / MACs after) replaces ``threshold``: the
    smallest global threshold whose result, after fold-or-restore, fits the budget is used. With a
    budget and ``steer`` (the default), ``reg_weight`` is only lambda's starting value: every
    ``steer_every`` steps of step 3, lambda is raised or lowered so that the MACs left by cutting
    the gates at exactly 0 follow a path from the full model to the budget (reached one epoch
    before the end of step 3), so that the gates cut at the end are the ones the funnel has
    already pulled to zero (see :class:`GatePenalty`). ``reg_weight="auto"`` (the default)
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
    penalty by the MACs of its component, since the budget is in MACs.
    """

    ranks: Union[None, float, str] = None
    method: str = "tucker2"  # how kxk convs are decomposed: "tucker2" or "svd" (decompose_conv's method)
    linear: bool = False
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
    target_macs: Optional[int] = None
    target_speedup: Optional[float] = None
    steer: bool = True
    steer_every: int = 10
    relative_gates: bool = True
    proximal: bool = True
    mac_weighted: bool = True
    compose: bool = True  # train through compose_factors: one conv per layer, same function and gradients
    c_follows_budget: bool = False  # with a budget: c = the gate size the budget would cut now (GatePenalty)
    finetune_epochs: int = 3
    finetune_lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    distill: bool = False
    distill_weight: float = 0.5
    distill_temperature: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_epochs", "reg_epochs", "finetune_epochs"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
                raise ValueError(f"CompressConfig.{name} must be an integer >= 0, got {v!r}")
        if self.reg_epochs < 1:
            raise ValueError("CompressConfig.reg_epochs must be >= 1: step 3 is what chooses the ranks")
        for name in ("train_lr", "reg_lr", "finetune_lr"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or not v > 0 or not math.isfinite(v):
                raise ValueError(f"CompressConfig.{name} must be a finite number > 0, got {v!r}")
        if self.reg not in regularizers.REGULARIZERS:
            raise ValueError(f"CompressConfig.reg {self.reg!r} is not known; valid: {sorted(regularizers.REGULARIZERS)}")
        if self.reg_weight != "auto" and (isinstance(self.reg_weight, bool) or not isinstance(self.reg_weight, numbers.Real)
                                          or not math.isfinite(self.reg_weight) or self.reg_weight < 0):
            raise ValueError(f"CompressConfig.reg_weight (lambda) must be 'auto' or a finite number >= 0, "
                             f"got {self.reg_weight!r}")
        if (not isinstance(self.threshold, numbers.Real) or isinstance(self.threshold, bool)
                or not math.isfinite(self.threshold) or self.threshold < 0):
            raise ValueError(f"CompressConfig.threshold must be a finite number >= 0 (paper: 0.01 to 0.02), got {self.threshold!r}")
        if self.target_macs is not None and self.target_speedup is not None:
            raise ValueError("give CompressConfig.target_macs or target_speedup, not both")
        if self.target_macs is not None and (not isinstance(self.target_macs, numbers.Integral) or self.target_macs <= 0):
            raise ValueError(f"CompressConfig.target_macs must be a positive integer, got {self.target_macs!r}")
        if self.target_speedup is not None and (not isinstance(self.target_speedup, numbers.Real) or not self.target_speedup >= 1):
            raise ValueError(f"CompressConfig.target_speedup must be a number >= 1, got {self.target_speedup!r}")
        for name in ("steer", "relative_gates", "proximal", "mac_weighted", "compose", "c_follows_budget"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CompressConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, numbers.Integral)
                                          or self.round_to < 1):
            raise ValueError(f"CompressConfig.round_to must be None or an integer >= 1 (e.g. 8 or 16), got {self.round_to!r}")
        if isinstance(self.steer_every, bool) or not isinstance(self.steer_every, numbers.Integral) or self.steer_every < 1:
            raise ValueError(f"CompressConfig.steer_every must be an integer >= 1 (optimizer steps), got {self.steer_every!r}")
        self.c_schedule_fn()  # validates the schedule's arguments
        self._check_more()

    def _check_more(self) -> None:
        """The fields the checks above leave out: ranks, flags, distillation, TrainConfig's own."""
        r = self.ranks
        if not (r is None or r == "vbmf" or (isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 < r <= 1)):
            raise ValueError(f"CompressConfig.ranks must be None (full rank), a fraction in (0, 1] or 'vbmf', got {r!r}")
        if self.method not in DECOMPOSITION_METHODS:
            raise ValueError(f"CompressConfig.method must be one of {list(DECOMPOSITION_METHODS)} (how kxk convs are "
                             f"decomposed), got {self.method!r}")
        for name in ("linear", "distill"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CompressConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name, low in (("distill_weight", ">= 0"), ("distill_temperature", "> 0")):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0
                    or (low == "> 0" and v == 0)):
                raise ValueError(f"CompressConfig.{name} must be a finite number {low}, got {v!r}")
        for name in ("train_lr", "reg_lr", "finetune_lr", "target_speedup"):
            if isinstance(getattr(self, name), bool):
                raise ValueError(f"CompressConfig.{name} must be a number, got {getattr(self, name)!r}")
        if isinstance(self.target_macs, bool):
            raise ValueError(f"CompressConfig.target_macs must be a positive integer, got {self.target_macs!r}")
        if self.target_speedup is not None and not math.isfinite(self.target_speedup):
            raise ValueError(f"CompressConfig.target_speedup must be a finite number >= 1, got {self.target_speedup!r}")
        try:  # optimizer, momentum, weight_decay, schedule, seed: checked by the TrainConfig they build
            self.stage_config(1, 1.0)
        except ValueError as e:
            raise ValueError(str(e).replace("TrainConfig: ", "CompressConfig: ")) from None

    def c_schedule_fn(self) -> regularizers.CSchedule:
        """The c schedule, indexed by epoch of step 3."""
        kw: dict[str, Any] = {"c_start": self.c_start}
        if self.c_schedule == "linear":
            kw.update(c_end=self.c_end, total=max(1, self.reg_epochs - 1))
        elif self.c_schedule == "exp":
            kw.update(factor=self.c_factor, every=self.c_every)
        return regularizers.c_schedule(self.c_schedule, **kw)

    def stage_config(self, epochs: int, lr: float) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=lr, optimizer=self.optimizer, momentum=self.momentum,
                           weight_decay=self.weight_decay, schedule=self.schedule, seed=self.seed)

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


@dataclass
class CompressResult:
    """What :func:`compress` returns: the compressed model, its report and the training history."""

    model: fx.GraphModule
    report: dict[str, Any]
    history: list[dict] = field(default_factory=list)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _all_gates(gm: fx.GraphModule) -> list[torch.Tensor]:
    return [g for layer in gates(gm).values() for g in layer.values()]


def _magnitudes(gm: fx.GraphModule, relative: bool) -> torch.Tensor:
    """Every gate's magnitude in float64, divided by its vector's mean magnitude when ``relative``."""
    return torch.cat([(relative_gates(g.detach().double()) if relative else g.detach().abs().double()).flatten()
                      for g in _all_gates(gm)])


def component_macs(gated: fx.GraphModule) -> dict[str, dict[str, float]]:
    """MACs per component of every gate vector: ``{layer: {gate role: MACs}}``.

    An input-mode component (``gate_in``) costs its share of ``first`` and ``core``; an
    output-mode one (``gate_core``, ``gate_out``) its share of ``core`` and ``last``; an SVD
    pair's component its share of both factors. Needs cost-model annotations.
    """
    out: dict[str, dict[str, float]] = {}
    for source, roles in layer_nodes(gated).items():
        if GATE_IN not in roles:
            continue
        macs = {r: sum(n.meta.get(MACS, 0) for n in roles.get(r, [])) for r in (FIRST, CORE, LAST)}
        c = gated.get_submodule(source)
        r_in, r_out = c[GATE_IN].weight.numel(), c[GATE_OUT].weight.numel()
        if CORE in roles:
            per_in, per_out = (macs[FIRST] + macs[CORE]) / r_in, (macs[CORE] + macs[LAST]) / r_out
            out[source] = {GATE_IN: per_in, GATE_CORE: per_out, GATE_OUT: per_out}
        else:
            per = (macs[FIRST] + macs[LAST]) / r_in
            out[source] = {GATE_IN: per, GATE_OUT: per}
    return out


def threshold_for_budget(gated: fx.GraphModule, target_macs: int, *, relative: bool = False,
                         round_to: Optional[int] = None) -> float:
    """The smallest gate threshold whose stripped, folded model has at most ``target_macs`` MACs.

    ``gated`` must carry cost-model annotations (see :func:`fxtucker.passes.predict_macs`, which
    is exact). ``relative`` and ``round_to`` mean what they mean for :func:`strip_gates`. Raises
    ValueError when even pruning every gate cannot meet the budget.
    """
    values = _magnitudes(gated, relative).unique().tolist()
    # Thresholds just above each gate magnitude: every distinct pruning set, smallest first.
    candidates = [0.0] + [math.nextafter(v, math.inf) for v in values]
    macs = lambda i: predict_macs(gated, candidates[i], round_to, relative=relative)  # noqa: E731 - non-increasing in i
    if macs(len(candidates) - 1) > target_macs:
        raise ValueError(
            f"the MAC budget {target_macs:,} cannot be met: pruning every gate still leaves "
            f"{macs(len(candidates) - 1):,} MACs (layers that are not decomposed, and one component per "
            f"decomposed layer); raise target_macs or lower target_speedup"
        )
    i = bisect.bisect_left(range(len(candidates)), True, key=lambda i: macs(i) <= target_macs)
    return candidates[i]


#: With reg_weight="auto": the shrink, in units of a gate vector's mean, that the proximal steps of
#: step 3 add up to at slope 1 (chosen on the validation split: benchmarks/RESULTS.md, "tuning").
AUTO_SHRINK = 2.0


def auto_reg_weight(config: "CompressConfig", steps_per_epoch: Optional[int]) -> float:
    """lambda for ``reg_weight="auto"``: calibrated from the learning rate and the number of steps,
    so that the proximal steps of step 3 shrink a gate at slope 1 by :data:`AUTO_SHRINK` times its
    vector's mean in all (the cosine schedule's mean learning rate is half its start), whatever
    the data size and batch; a given number is used as it is."""
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


def _distillation(teacher: nn.Module, config: CompressConfig):
    """weight * T^2 * KL(teacher || student) at temperature T (Hinton et al. 2015)."""
    t, w = config.distill_temperature, config.distill_weight

    def loss(x: Any, out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        teacher.to(out.device)
        with torch.no_grad():
            target = teacher(x).float()
        return w * t * t * F.kl_div(F.log_softmax(out.float() / t, 1), F.softmax(target / t, 1), reduction="batchmean")

    return loss


def gate_histogram(gm: fx.GraphModule, bins: int = 40, relative: bool = False) -> dict[str, list]:
    """Histogram of log10 |gate| over every gate (zeros counted apart), for plots like the paper's
    Fig. 4; ``relative`` divides each gate vector by its mean magnitude first."""
    flat = _magnitudes(gm, relative)
    nonzero = flat[flat > 0]
    counts = torch.histc(nonzero.log10().clamp(-6, 2), bins=bins, min=-6, max=2)
    edges = torch.linspace(-6, 2, bins + 1)
    return {"relative": relative, "log10_edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts],
            "zeros": int((flat == 0).sum()), "total": int(flat.numel())}


def _gate_stats(threshold_fn, penalty: Optional["GatePenalty"] = None, gated: Optional[fx.GraphModule] = None) -> Any:
    relative = penalty.relative if penalty is not None else False
    round_to = penalty.round_to if penalty is not None else None

    def stats(model: nn.Module) -> dict:
        gm = gated if gated is not None else getattr(model, "module", model)
        flat = _magnitudes(gm, relative)
        th = threshold_fn(gm)
        out = {"gates": flat.numel(), "gates_below_threshold": int((flat < th).sum()), "threshold": th,
               "gate_mean": float(flat.mean()), "macs_if_stripped": predict_macs(gm, th, round_to, relative=relative)}
        if penalty is not None:
            out["reg_weight"] = penalty.weight
        return out
    return stats


class GatePenalty:
    """lambda x sum of ``reg``(gate, c) over all gates of all layers: step 3's penalty for :func:`train`.

    Called as ``penalty(model, epoch, step)``. With ``relative``, each gate enters as ``|g|``
    divided by the mean magnitude of its gate vector (a constant of the step, not differentiated),
    so the penalty is measured in units of the layer's own gates, whose scale a BatchNorm after
    the layer makes arbitrary: the same lambda and c mean the same in every layer.

    With ``target_macs``, lambda is steered so that the funnel itself removes what the budget
    removes. Every ``every`` optimizer steps, the MACs left by cutting only the gates that are
    exactly 0 are compared with a path that runs straight from the full model at the start of
    step 3 to the budget at ``reach`` of its epochs (by default all but the last, which is left
    for the network to adapt to the components already at 0): lambda is multiplied by
    ``exp(GAIN x gap)``, clipped to [1/``MAX_CHANGE``, ``MAX_CHANGE``], where ``gap`` is how far the
    MACs are above the path, as a fraction of the MACs to remove. Behind the path lambda grows
    fast (it may double every ``every`` steps), ahead of it lambda shrinks, and the proximal step
    never zeroes past the budget, so at the end of step 3 the budget cuts gates that are already
    0 or close to it. lambda stays within [1/``RANGE``, ``RANGE``] times its start value, depends
    only on the states so far, and is part of the training checkpoint (``state_dict``), so a
    resumed run repeats the uninterrupted one.

    Args:
        gated: the gated GraphModule, annotated by :func:`~fxtucker.passes.cost_model`.
        reg: a name in :data:`fxtucker.regularizers.REGULARIZERS`.
        weight: lambda (its start value when steered).
        schedule: epoch -> c (used by the funnel kinds).
        target_macs: the budget to steer to; None keeps lambda constant.
        threshold: the relative (or absolute) gate size below which a gate counts as cut.
        epochs: the epochs of step 3.
        every: steer every this many optimizer steps.
        relative: penalize and threshold gates relative to their vector's mean magnitude.
        proximal: apply the penalty by a proximal step after each optimizer step
            (:meth:`after_step`) instead of through the gradient. A gradient step overshoots 0 on
            a penalty whose slope there is lambda / c, so small gates oscillate around 0 instead
            of reaching it; the proximal step stops at 0, which is what the threshold then cuts.
        round_to: ranks rounded up as :func:`strip_gates` rounds them, when steering.
        mac_weighted: weight each gate's penalty by the MACs its component costs
            (:func:`component_macs`), divided by the mean over all gates, so that lambda buys
            MACs, not components: a component of a wide, high-resolution layer costs more than
            one of a small layer, and the budget is in MACs.
        steps_per_epoch: optimizer steps in one epoch (``len`` of the training data), so the
            path can move within an epoch; None: it moves once an epoch.
        reach: the epoch (a float) by whose end the zeros meet the budget; default
            ``max(epochs - 1, epochs / 2)``.
    """

    GAIN, MAX_CHANGE, RANGE, MAX_SHRINK = 4.0, 2.0, 1e4, 0.05

    def __init__(self, gated: fx.GraphModule, reg: str, weight: float, schedule: regularizers.CSchedule, *,
                 target_macs: Optional[int] = None, threshold: float = 0.01, epochs: int = 1, every: int = 10,
                 relative: bool = True, proximal: bool = True, round_to: Optional[int] = None,
                 mac_weighted: bool = True, steps_per_epoch: Optional[int] = None, reach: Optional[float] = None,
                 c_follows_budget: bool = False):
        self.gated, self.gate_list = gated, _all_gates(gated)
        self.proximal, self.round_to = proximal, round_to
        self.fn, self.uses_c = regularizers.get_regularizer(reg), reg in regularizers.FUNNEL_KINDS
        self.schedule, self.target, self.threshold = schedule, target_macs, threshold
        self.epochs, self.every, self.relative = epochs, every, relative
        self.steps_per_epoch = steps_per_epoch
        self.reach = max(epochs - 1, epochs / 2) if reach is None else float(reach)
        self.weight = self.start = float(weight)
        self.lr: Optional[float] = None  # the last step's learning rate (after_step), for MAX_SHRINK
        self.zero_mask: Optional[torch.Tensor] = None  # which gates the last proximal step left at 0
        self.scales = [1.0] * len(self.gate_list)
        if mac_weighted:
            costs = component_macs(gated)
            per = [costs[layer][role] for layer, roles in gates(gated).items() for role in roles]
            total = sum(p * g.numel() for p, g in zip(per, self.gate_list))
            mean = total / max(1, sum(g.numel() for g in self.gate_list))
            self.scales = [p / mean if mean > 0 else 1.0 for p in per]
        self.full_macs = predict_macs(gated, 0.0, round_to, relative=relative)
        self.zeros_macs = self._zeros_macs()
        self.c_follows_budget = c_follows_budget and target_macs is not None
        self.cut: Optional[float] = self.budget_threshold() if self.c_follows_budget else None

    def budget_threshold(self) -> float:
        return threshold_for_budget(self.gated, self.target, relative=self.relative, round_to=self.round_to)

    def path(self, epoch: int, step: int) -> float:
        """The MACs the zeroed gates should leave at this point of step 3."""
        done = float(epoch)
        if self.steps_per_epoch:
            done = max(done, min(epoch + 1.0, step / self.steps_per_epoch))
        frac = min(1.0, done / max(self.reach, 1e-9))
        return self.full_macs - (self.full_macs - self.target) * frac

    def steer(self, epoch: int, step: int) -> None:
        span = max(1, self.full_macs - self.target)
        gap = (self.zeros_macs - self.path(epoch, step)) / span
        factor = min(self.MAX_CHANGE, max(1 / self.MAX_CHANGE, math.exp(self.GAIN * gap)))
        self.weight = min(self.start * self.RANGE, max(self.start / self.RANGE, self.weight * factor))
        if self.lr:  # at most MAX_SHRINK of a vector's mean per step at slope 1: BatchNorm keeps up
            self.weight = min(self.weight, self.MAX_SHRINK / self.lr)
        if self.c_follows_budget:
            self.cut = self.budget_threshold()

    def c(self, epoch: int) -> float:
        """The funnel's c: the schedule's, or with ``c_follows_budget`` the gate size at which the
        budget would cut now (never below the schedule's end value)."""
        if self.cut is not None:
            return max(self.cut, self.schedule(10**9))
        return self.schedule(epoch)

    def _value(self, g: torch.Tensor, c: float, scale: float = 1.0) -> torch.Tensor:
        a = g.abs()
        if self.relative:
            # The mean is a unit, not a target: through it, the pull on the small gates would be
            # cancelled by a push on the large ones, and a vector of equal gates would not move.
            a = a / a.detach().mean().clamp_min(1e-12)
        return scale * (self.fn(a, c) if self.uses_c else self.fn(a)).sum()

    def __call__(self, _model: nn.Module, epoch: int, step: int) -> torch.Tensor:
        if self.target is not None and step > 0 and step % self.every == 0:
            self.steer(epoch, step)
        c = self.c(epoch)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.proximal):  # proximal: only logged
            return self.weight * torch.stack([self._value(g, c, k) for g, k in zip(self.gate_list, self.scales)]).sum()

    def after_step(self, _model: nn.Module, epoch: int, _step: int, lr: float) -> None:
        """With ``proximal``: shrink every gate towards 0 by lr x lambda x the penalty's slope at it,
        stopping at exactly 0 (soft thresholding of the penalty linearized at the gate); with
        ``relative``, each gate vector then gets its mean magnitude back."""
        self.lr = lr
        if not self.proximal:
            return
        c = self.c(epoch)
        with torch.no_grad():
            flat = torch.cat([g.detach().flatten() for g in self.gate_list])
            sizes = [g.numel() for g in self.gate_list]
            a = flat.abs()
            means = torch.stack([v.mean() for v in a.split(sizes)]) if self.relative else torch.ones(len(sizes))
            means = means.clamp_min(1e-12)
            unit = torch.repeat_interleave(means, torch.tensor(sizes)) if self.relative else torch.ones_like(a)
            scale = torch.repeat_interleave(torch.tensor(self.scales, dtype=a.dtype), torch.tensor(sizes))
        with torch.enable_grad():
            u = (a / unit).requires_grad_(True)
            value = (self.fn(u, c) if self.uses_c else self.fn(u)).mul(scale).sum()
            (slope,) = torch.autograd.grad(value, u)
        with torch.no_grad():
            new = (a - lr * self.weight * slope / unit).clamp_min(0)
            if self.relative:
                # Relative gates: shrink the small ones against the large ones, not the vector.
                # Unchecked, the step shrinks a whole vector, which a BatchNorm after the layer
                # undoes in training mode while its running statistics fall behind.
                new_means = torch.stack([v.mean() for v in new.split(sizes)])
                ratio = torch.where(new_means > 0, means / new_means.clamp_min(1e-30), torch.ones_like(means))
                new = new * torch.repeat_interleave(ratio, torch.tensor(sizes))
            # Gates at 0 after the last proximal step that the optimizer step moved off 0 are not
            # new zeros: the proximal step decides again whether they stay.
            was_zero = self.zero_mask if self.zero_mask is not None and self.zero_mask.numel() == a.numel() else (a == 0)
            fresh = (new == 0) & ~was_zero
            if self.target is not None and bool(fresh.any()):
                # Never zero past the budget: if the gates at 0 would leave fewer MACs than the
                # budget, this step zeroes no new gate (they keep their values), and the budget
                # threshold chooses among the small gates at the end.
                self._write(flat.sign() * new, sizes)
                if self._zeros_macs() < self.target:
                    new = torch.where(fresh, a, new)
            self._write(flat.sign() * new, sizes)
            self.zero_mask = new == 0
            if self.target is not None and not torch.equal(self.zero_mask, was_zero):
                self.zeros_macs = self._zeros_macs()

    def _write(self, flat: torch.Tensor, sizes: list[int]) -> None:
        for g, v in zip(self.gate_list, flat.split(sizes)):
            g.copy_(v.view_as(g))

    def _zeros_macs(self) -> int:
        """MACs left by cutting exactly the gates that are 0."""
        return predict_macs(self.gated, math.nextafter(0.0, 1.0), self.round_to, relative=self.relative)

    def state_dict(self) -> dict:
        return {"weight": self.weight}

    def load_state_dict(self, state: dict) -> None:
        self.weight = float(state["weight"])
        self.zeros_macs = self._zeros_macs()


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
    if not isinstance(example_inputs, (torch.Tensor, tuple, list)):
        raise TypeError(f"example_inputs must be a tensor or a tuple of tensors (one batch of the model's inputs), "
                        f"got {type(example_inputs).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors (one batch of the model's inputs)")
    torch.manual_seed(config.seed)
    original = copy.deepcopy(model).eval()
    gm = cost_model(trace(copy.deepcopy(model)), *inputs)
    macs_before = sum(n.meta["macs"] for n in gm.graph.nodes)
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

        record_run(out_dir, {"config": rep["config"]}, resume=resume, name="compress.json")
    history: list[dict] = []

    # 1. decompose at full rank and gate every component
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decomposed = decompose_conv(gm, ranks=config.ranks, linear=config.linear, method=config.method)
    rep["skipped_layers"] = [str(w.message) for w in caught]
    if not layer_nodes(decomposed):  # nothing could be decomposed: the model comes back as it is, with the reasons
        warnings.warn(f"compress: no layer of the model can be decomposed, so it is returned unchanged and untrained"
                      f"{' (the MAC budget cannot be met)' if target is not None and target < macs_before else ''}: "
                      f"{'; '.join(rep['skipped_layers']) or 'it has no conv layer'}", stacklevel=2)
        final = decomposed.eval()
        rep.update(macs_after=macs_before, params_after=_params(final), accuracy_after=rep["accuracy_before"],
                   target_macs=target, threshold=None, layers=report(final).to_dict()["layers"])
        return CompressResult(model=final, report=rep, history=history)
    gated = cost_model(insert_gates(decomposed), *inputs)
    if target is not None:  # an impossible budget fails now, not after hours of training
        threshold_for_budget(gated, target, relative=config.relative_gates, round_to=config.round_to)
    rep["stages"]["decomposed"] = {"accuracy": acc(gated), "macs": sum(n.meta["macs"] for n in gated.graph.nodes),
                                   "gate_histogram": gate_histogram(gated, relative=config.relative_gates)}

    # 2. train the decomposed model on the classification loss alone
    # Training runs each layer as one conv composed from its factors and gates: the same function
    # and gradients as the gated chain, at about the original model's cost (compose_factors).
    view = compose_factors(gated) if config.compose else gated
    if config.train_epochs:
        history += train(view, train_data, config.stage_config(config.train_epochs, config.train_lr),
                         stage="decomposed", **kw)
        rep["stages"]["trained"] = {"accuracy": acc(gated), "gate_histogram": gate_histogram(gated, relative=config.relative_gates)}

    # 3. the funnel (or other) penalty on all gates of all layers at once
    rep["reg_weight_start"] = auto_reg_weight(config, _len(train_data))
    penalty = GatePenalty(gated, config.reg, rep["reg_weight_start"], config.c_schedule_fn(),
                          target_macs=target if config.steer else None, threshold=config.threshold,
                          epochs=config.reg_epochs, every=config.steer_every, relative=config.relative_gates,
                          proximal=config.proximal, round_to=config.round_to, mac_weighted=config.mac_weighted,
                          steps_per_epoch=_len(train_data), c_follows_budget=config.c_follows_budget)
    rel = config.relative_gates
    threshold_fn = ((lambda g: threshold_for_budget(g, target, relative=rel, round_to=config.round_to)) if target is not None
                    else (lambda g: config.threshold))
    history += train(view, train_data, config.stage_config(config.reg_epochs, config.reg_lr), penalty=penalty,
                     epoch_stats=_gate_stats(threshold_fn, penalty, gated), stage="regularize", **kw)
    threshold = threshold_fn(gated)
    rep["threshold"], rep["reg_weight_end"] = threshold, penalty.weight
    rep["stages"]["regularized"] = {"accuracy": acc(gated), "gate_histogram": gate_histogram(gated, relative=config.relative_gates),
                                    "pruning_ratio": float((_magnitudes(gated, rel) < threshold).double().mean())}

    # strip, then keep each decomposition only where it is cheaper (gates folded into weights)
    final = fold_or_restore(strip_gates(gated, threshold, config.round_to, relative=rel), *inputs)
    rep["stages"]["pruned"] = {"accuracy": acc(final), "macs": sum(n.meta["macs"] for n in final.graph.nodes)}

    # 4. fine-tune the compressed model
    if config.finetune_epochs:
        history += train(final, train_data, config.stage_config(config.finetune_epochs, config.finetune_lr),
                         extra_loss=_distillation(original, config) if config.distill else None,
                         stage="finetune", **kw)
    final.eval()
    macs_after = sum(n.meta["macs"] for n in cost_model(final, *inputs).graph.nodes)
    rep.update(macs_after=macs_after, params_after=_params(final), accuracy_after=acc(final),
               target_macs=target, layers=report(final).to_dict()["layers"])
    rep["stages"]["finetuned"] = {"accuracy": rep["accuracy_after"]}
    return CompressResult(model=final, report=rep, history=history)
