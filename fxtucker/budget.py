"""The MAC budget of step 3: gate magnitudes, what each component costs, the threshold that meets a
budget, and :class:`GatePenalty`, the funnel penalty whose lambda is steered toward the budget."""

from __future__ import annotations

import bisect
import functools
import math
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker import regularizers
from fxtucker.io import is_real
from fxtucker.meta import CORE, FIRST, GATE_CORE, GATE_IN, GATE_OUT, LAST, MACS
from fxtucker.passes import gates, layer_nodes, predict_macs
from fxtucker.passes.strip_gates import floor_masks, kept_ranks, relative_gates

__all__ = ["gate_stats", "gate_magnitudes", "floor_mask", "pruned_share", "component_macs", "threshold_for_budget",
           "floor_for_budget", "gate_histogram", "GatePenalty"]


def _all_gates(gm: fx.GraphModule) -> list[torch.Tensor]:
    return [g for layer in gates(gm).values() for g in layer.values()]


def _gate_shares(gm: fx.GraphModule) -> list[float]:
    """Per gate vector (in :func:`_all_gates`' order), its gates' share of their component's pull:
    1 for a Tucker-2 layer's ``gate_in``, 1/2 for the two gates of every other component (a Tucker-2
    layer's ``gate_core`` and ``gate_out``, an SVD pair's ``gate_in`` and ``gate_out``)."""
    return [1.0 if role == GATE_IN and GATE_CORE in layer else 0.5
            for layer in gates(gm).values() for role in layer]


def gate_magnitudes(gm: fx.GraphModule, relative: bool) -> torch.Tensor:
    """Every gate's magnitude in float64, divided by its vector's mean magnitude when ``relative``."""
    return torch.cat([(relative_gates(g.detach().double()) if relative else g.detach().abs().double()).flatten()
                      for g in _all_gates(gm)])


def floor_mask(gm: fx.GraphModule, rank_floor: float) -> torch.Tensor:
    """Over every gate in :func:`gate_magnitudes`' order, which components ``rank_floor`` keeps
    whatever the threshold (:func:`~fxtucker.passes.strip_gates.floor_masks`)."""
    return torch.cat([floor_masks(gm.get_submodule(layer), rank_floor)[role].flatten()
                      for layer, roles in gates(gm).items() for role in roles])


def _cut(gm: fx.GraphModule, magnitudes: torch.Tensor, threshold: float, rank_floor: float) -> torch.Tensor:
    """Over every gate (``magnitudes``: :func:`gate_magnitudes`), which ones a cut at ``threshold``
    removes: below it and not kept by ``rank_floor``."""
    below = magnitudes < threshold
    if rank_floor:
        below &= ~floor_mask(gm, rank_floor).to(below.device)
    return below


def pruned_share(gm: fx.GraphModule, threshold: float, *, relative: bool, rank_floor: float = 0.0) -> float:
    """The share of all gates that a cut at ``threshold`` removes: below it and not kept by ``rank_floor``."""
    return float(_cut(gm, gate_magnitudes(gm, relative), threshold, rank_floor).double().mean())


def component_macs(gated: fx.GraphModule, *, alive: bool = False,
                   rank_floor: float = 0.0) -> dict[str, dict[str, float]]:
    """MACs per component of every gate vector: ``{layer: {gate role: MACs}}``.

    An input-mode component (``gate_in``) costs its share of ``first`` and ``core``; an
    output-mode one (``gate_core``, ``gate_out``) its share of ``core`` and ``last``; an SVD
    pair's component its share of both factors. Needs cost-model annotations.

    ``alive``: what removing one more component saves on the factors at the ranks still alive
    (gates not at 0) instead of at full rank: a ``core`` share only counts the other mode's live
    components, so once a layer's output rank is mostly cut, its input components cost little
    more than their row of ``first`` (and the other way round). A grouped layer counts the
    fullest group's live rank, which :func:`strip_gates` keeps in every group. Not counted: a
    layer whose factors cost more than its original conv saves nothing until the original is
    the dearer (``predict_macs`` keeps the cheaper), and ``round_to``. ``rank_floor`` counts the
    components it keeps as alive.
    """
    out: dict[str, dict[str, float]] = {}
    # the ranks per group that cutting exactly the gates at 0 keeps, as strip_gates keeps them
    live = kept_ranks(gated, math.nextafter(0.0, 1.0), rank_floor=rank_floor) if alive else {}
    for source, roles in layer_nodes(gated).items():
        if GATE_IN not in roles:
            continue
        macs = {r: sum(n.meta.get(MACS, 0) for n in roles.get(r, [])) for r in (FIRST, CORE, LAST)}
        c = gated.get_submodule(source)
        r_in, r_out = c[GATE_IN].weight.numel(), c[GATE_OUT].weight.numel()
        if CORE in roles:
            live_in = live_out = 1.0
            if source in live:
                (k_in, k_out), groups = live[source][0], getattr(c[FIRST], "groups", 1)
                live_in, live_out = k_in * groups / r_in, k_out * groups / r_out
            per_in = (macs[FIRST] + macs[CORE] * live_out) / r_in
            per_out = (macs[CORE] * live_in + macs[LAST]) / r_out
            out[source] = {GATE_IN: per_in, GATE_CORE: per_out, GATE_OUT: per_out}
        else:
            per = (macs[FIRST] + macs[LAST]) / r_in
            out[source] = {GATE_IN: per, GATE_OUT: per}
    return out


def threshold_for_budget(gated: fx.GraphModule, target_macs: int, *, relative: bool = False,
                         round_to: Optional[int] = None, rank_floor: float = 0.0) -> float:
    """The smallest gate threshold whose stripped, folded model has at most ``target_macs`` MACs.

    ``gated`` must carry cost-model annotations (see :func:`fxtucker.passes.predict_macs`, which
    is exact). ``relative``, ``round_to`` and ``rank_floor`` mean what they mean for :func:`strip_gates`. Raises
    ValueError when even pruning every gate cannot meet the budget.
    """
    values = gate_magnitudes(gated, relative).unique().tolist()
    # Thresholds just above each gate magnitude: every distinct pruning set, smallest first.
    candidates = [0.0] + [math.nextafter(v, math.inf) for v in values]
    macs = lambda i: predict_macs(gated, candidates[i], round_to, relative=relative,  # noqa: E731 - non-increasing in i
                                  rank_floor=rank_floor)
    if macs(len(candidates) - 1) > target_macs:
        raise ValueError(
            f"the MAC budget {target_macs:,} cannot be met: pruning every gate still leaves "
            f"{macs(len(candidates) - 1):,} MACs (layers that are not decomposed, and one component per "
            f"decomposed layer" + (f", or rank_floor={rank_floor:g} of each mode's rank" if rank_floor else "")
            + "); raise target_macs or lower target_speedup" + (" or rank_floor" if rank_floor else "")
        )
    i = bisect.bisect_left(range(len(candidates)), True, key=lambda i: macs(i) <= target_macs)
    return candidates[i]


def floor_for_budget(gated: fx.GraphModule, macs: float, *, relative: bool = False,
                     round_to: Optional[int] = None) -> float:
    """The largest ``rank_floor`` whose floor alone leaves at most ``macs`` MACs: the whole model
    with every gate cut but the floor's, after fold-or-restore (layers that are not decomposed at
    their full cost); 0.0 when not even one component per mode fits.

    The candidates are the shares where a mode's floor count ``ceil(rank_floor x rank)`` steps up
    (k / rank for every mode's rank per group, below 1), so the floor returned is the largest that
    fits exactly; when every one fits, the largest candidate. ``gated`` must carry cost-model
    annotations; ``relative`` and ``round_to`` mean what they mean for :func:`threshold_for_budget`.
    """
    if not is_real(macs) or macs <= 0:
        raise ValueError(f"floor_for_budget: macs must be a finite number > 0, got {macs!r}")
    sizes = {layer.numel() // getattr(gated.get_submodule(source)[FIRST], "groups", 1)
             for source, roles in gates(gated).items() for layer in roles.values()}
    if not sizes:
        raise ValueError("floor_for_budget found no gates: run insert_gates(gm) first")
    shares = sorted({k / n for n in sizes for k in range(1, n)})
    everything = math.nextafter(float(gate_magnitudes(gated, relative).max()), math.inf)  # cuts every gate
    fits = lambda f: predict_macs(gated, everything, round_to, relative=relative, rank_floor=f) <= macs  # noqa: E731
    i = bisect.bisect_left(shares, True, key=lambda f: not fits(f))  # fits is True, then False, as f grows
    return shares[i - 1] if i else 0.0


def gate_histogram(gm: fx.GraphModule, bins: int = 40, relative: bool = False) -> dict[str, list]:
    """Histogram of log10 |gate| over every gate (zeros counted apart), for plots like the paper's
    Fig. 4; ``relative`` divides each gate vector by its mean magnitude first."""
    flat = gate_magnitudes(gm, relative)
    nonzero = flat[flat > 0]
    counts = torch.histc(nonzero.log10().clamp(-6, 2), bins=bins, min=-6, max=2)
    edges = torch.linspace(-6, 2, bins + 1)
    return {"relative": relative, "log10_edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts],
            "zeros": int((flat == 0).sum()), "total": int(flat.numel())}


#: GatePenalty's default cap on lambda: a proximal step takes at most this share of a gate vector's
#: mean from a gate at slope 1 (lambda <= MAX_SHRINK / lr).
MAX_SHRINK = 0.05


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
    0 or close to it. lambda stays within [1/``RANGE``, ``RANGE``] times its start value and, from
    the first step, at most ``max_shrink`` / lr (a proximal step shrinks a gate by at most
    ``max_shrink`` of its vector's mean at slope 1, so that BatchNorm keeps up), depends
    only on the states so far, and is part of the training checkpoint (``state_dict``, with c
    when it follows the budget), so a resumed run repeats the uninterrupted one.

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
        live_macs: with ``mac_weighted``, weigh by what a component saves at the ranks still
            alive (``component_macs(alive=True)``; gates at 0 are dead), updated every ``every``
            steps, instead of at full rank. Full-rank weights keep pulling a layer's input
            components as hard after its output rank is cut, when each of them saves a fraction
            of that; the units stay the full-rank mean, so lambda means the same.
        steps_per_epoch: optimizer steps in one epoch (``len`` of the training data), so the
            path can move within an epoch; None: it moves once an epoch.
        reach: the epoch (a float) by whose end the zeros meet the budget; default
            ``max(epochs - 1, epochs / 2)``.
        rank_floor: the share of each mode's rank that :func:`strip_gates` keeps whatever the
            threshold (its ``rank_floor``): the budget counts it, and those components (the
            largest gates of each mode, :func:`floor_mask`, chosen again after every optimizer
            step) are not pulled, so the floor keeps live components instead of gates the funnel
            zeroed (with ``relative``, restoring a vector's mean still scales them with the rest).
        max_shrink: lambda's cap, as a share of a vector's mean that one proximal step may take
            from a gate at slope 1 (lambda <= max_shrink / lr), so that BatchNorm keeps up.
        c_per_step: ``schedule`` is indexed by step 3's optimizer step instead of its epoch, so c
            moves within an epoch (a schedule by epoch holds c for a whole epoch: with two epochs of
            step 3, the zeros meet the budget in the first while c is still at its start).
        scale_free: with ``relative``, every gate vector moves at one rate in units of its own mean:
            each gate's gradient is multiplied by its vector's mean squared (a hook, until
            :meth:`remove_hooks`) and the proximal step shrinks by lr x lambda x slope x the mean
            instead of / the mean. Without it both go as 1 / mean^2 in those units, so a layer
            whose gates happen to be small (a BatchNorm after it makes their scale arbitrary) is
            pulled, and trained, faster than the others.
        per_component: one pull per component instead of one per gate. An output-mode component
            of a Tucker-2 layer has two gates (``gate_core`` and ``gate_out``) and an SVD pair's
            component two (``gate_in`` and ``gate_out``), each pulled in full by default, while an
            input-mode component has one (``gate_in``); the cut keeps a two-gate component only
            while both gates are above the threshold. So by default the output mode is pulled
            about twice as hard as the input mode. With it, each gate of a two-gate component
            pays half (its ``scales`` entry, MAC-weighted or not, times 1/2).
    """

    GAIN, MAX_CHANGE, RANGE = 4.0, 2.0, 1e4

    def __init__(self, gated: fx.GraphModule, reg: str, weight: float, schedule: regularizers.CSchedule, *,
                 target_macs: Optional[int] = None, threshold: float = 0.01, epochs: int = 1, every: int = 10,
                 relative: bool = True, proximal: bool = True, round_to: Optional[int] = None,
                 mac_weighted: bool = True, steps_per_epoch: Optional[int] = None, reach: Optional[float] = None,
                 c_follows_budget: bool = False, live_macs: bool = False, rank_floor: float = 0.0,
                 max_shrink: float = MAX_SHRINK, c_per_step: bool = False, scale_free: bool = False,
                 per_component: bool = False):
        self.gated, self.gate_list = gated, _all_gates(gated)
        self.c_per_step = c_per_step
        if scale_free and not relative:
            raise ValueError("GatePenalty: scale_free needs relative gates (it measures each gate in units of its "
                             "vector's mean)")
        self.scale_free = scale_free
        self._hooks = [g.register_hook(functools.partial(_times_mean_squared, g)) for g in self.gate_list] if scale_free else []
        self.max_shrink = max_shrink
        self.rank_floor = rank_floor
        self.pulled: Optional[torch.Tensor] = None  # with rank_floor: the gates pulled, as of the last step
        self.proximal, self.round_to = proximal, round_to
        self.fn, self.uses_c = regularizers.get_regularizer(reg), reg in regularizers.FUNNEL_KINDS
        self.schedule, self.target, self.threshold = schedule, target_macs, threshold
        self.epochs, self.every, self.relative = epochs, every, relative
        self.steps_per_epoch = steps_per_epoch
        self.reach = max(epochs - 1, epochs / 2) if reach is None else float(reach)
        self.weight = self.start = float(weight)
        self.lr: Optional[float] = None  # the last step's learning rate (after_step), for max_shrink
        self.zero_mask: Optional[torch.Tensor] = None  # which gates the last proximal step left at 0
        self.scales = [1.0] * len(self.gate_list)
        # per_component: each gate's share of its component's one pull (1/2 for a two-gate component)
        self.shares = _gate_shares(gated) if per_component else None
        self.live_macs = mac_weighted and live_macs
        self.mac_unit = 0.0  # the mean full-rank MACs of a component, over all gates (mac_weighted)
        if mac_weighted:
            per = self._component_costs(alive=False)
            total = sum(p * g.numel() for p, g in zip(per, self.gate_list))
            self.mac_unit = total / max(1, sum(g.numel() for g in self.gate_list))
            self.scales = [p / self.mac_unit if self.mac_unit > 0 else 1.0 for p in per]
            if self.live_macs:
                self._update_scales()
        if self.shares is not None and not self.live_macs:  # _update_scales applies them itself
            self.scales = [k * s for k, s in zip(self.scales, self.shares)]
        self.full_macs = predict_macs(gated, 0.0, round_to, relative=relative, rank_floor=rank_floor)
        self.zeros_macs = self._zeros_macs()
        self.c_follows_budget = c_follows_budget and target_macs is not None
        self.cut: Optional[float] = self.budget_threshold() if self.c_follows_budget else None

    def _component_costs(self, alive: bool) -> list[float]:
        costs = component_macs(self.gated, alive=alive, rank_floor=self.rank_floor)
        return [costs[layer][role] for layer, roles in gates(self.gated).items() for role in roles]

    def _update_scales(self) -> None:
        per = self._component_costs(alive=self.live_macs)
        self.scales = [p / self.mac_unit if self.mac_unit > 0 else 1.0 for p in per]
        if self.shares is not None:
            self.scales = [k * s for k, s in zip(self.scales, self.shares)]

    def budget_threshold(self) -> float:
        return threshold_for_budget(self.gated, self.target, relative=self.relative, round_to=self.round_to,
                                    rank_floor=self.rank_floor)

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
        if self.lr:
            self._cap(self.lr)
        if self.c_follows_budget:
            self.cut = self.budget_threshold()

    def _cap(self, lr: float) -> None:
        """At most max_shrink of a vector's mean per proximal step at slope 1: BatchNorm keeps up."""
        self.weight = min(self.weight, self.max_shrink / lr)

    def c(self, epoch: int, step: Optional[int] = None) -> float:
        """The funnel's c: the schedule's at ``epoch`` (at ``step`` with ``c_per_step``), or with
        ``c_follows_budget`` the gate size at which the budget would cut now (never below the
        schedule's end value)."""
        if self.cut is not None:
            return max(self.cut, self.schedule(10**9))
        return self.schedule(step if self.c_per_step and step is not None else epoch)

    def _update_pulled(self) -> None:
        """With a rank floor: which gates the penalty pulls, all but those the floor keeps now."""
        self.pulled = ~floor_mask(self.gated, self.rank_floor) if self.rank_floor else None

    def _pulled(self) -> list[Optional[torch.Tensor]]:
        """Per gate vector, the gates the penalty pulls (None: all); computed at the first call,
        then after every proximal step (every call without ``proximal``)."""
        if not self.rank_floor:
            return [None] * len(self.gate_list)
        if self.pulled is None or not self.proximal:
            self._update_pulled()
        return [p.view_as(g) for p, g in zip(self.pulled.split([g.numel() for g in self.gate_list]), self.gate_list)]

    def _value(self, g: torch.Tensor, c: float, scale: float = 1.0,
               pulled: Optional[torch.Tensor] = None) -> torch.Tensor:
        a = g.abs()
        if self.relative:
            # The mean is a unit, not a target: through it, the pull on the small gates would be
            # cancelled by a push on the large ones, and a vector of equal gates would not move.
            a = a / a.detach().mean().clamp_min(1e-12)
        value = self.fn(a, c) if self.uses_c else self.fn(a)
        return scale * (value if pulled is None else value * pulled).sum()

    def __call__(self, _model: nn.Module, epoch: int, step: int) -> torch.Tensor:
        if step > 0 and step % self.every == 0:
            if self.target is not None:
                self.steer(epoch, step)
            if self.live_macs:
                self._update_scales()
        c = self.c(epoch, step)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.proximal):  # proximal: only logged
            return self.weight * torch.stack([self._value(g, c, k, p) for g, k, p
                                              in zip(self.gate_list, self.scales, self._pulled())]).sum()

    def after_step(self, _model: nn.Module, epoch: int, step: int, lr: float) -> None:
        """With ``proximal``: shrink every gate towards 0 by lr x lambda x the penalty's slope at it,
        stopping at exactly 0 (soft thresholding of the penalty linearized at the gate); with
        ``relative``, each gate vector then gets its mean magnitude back."""
        self.lr = lr
        if self.target is not None and lr > 0:
            # steer's cap from the very first step: lambda's start is calibrated over the whole of
            # step 3, and with few steps it would shrink a vector's mean many times over in one step
            # (mobilenet_v2 on 256 images: lr x lambda = 1, NaN by the third step).
            self._cap(lr)
        if not self.proximal:
            return
        c = self.c(epoch, step)
        with torch.no_grad():
            flat = torch.cat([g.detach().flatten() for g in self.gate_list])
            sizes = [g.numel() for g in self.gate_list]
            a = flat.abs()
            counts = torch.tensor(sizes, device=a.device)  # each vector's value, once per gate, on the gates' device
            means = torch.stack([v.mean() for v in a.split(sizes)]) if self.relative else torch.ones(len(sizes), device=a.device)
            means = means.clamp_min(1e-12)
            unit = torch.repeat_interleave(means, counts) if self.relative else torch.ones_like(a)
            scale = torch.repeat_interleave(torch.tensor(self.scales, dtype=a.dtype, device=a.device), counts)
        with torch.enable_grad():
            u = (a / unit).requires_grad_(True)
            value = (self.fn(u, c) if self.uses_c else self.fn(u)).mul(scale).sum()
            (slope,) = torch.autograd.grad(value, u)
        if self.rank_floor:
            self._update_pulled()
            slope = slope * self.pulled.to(slope.dtype)
        with torch.no_grad():
            shrink = lr * self.weight * slope * unit if self.scale_free else lr * self.weight * slope / unit
            new = (a - shrink).clamp_min(0)
            if self.relative:
                # Relative gates: shrink the small ones against the large ones, not the vector.
                # Unchecked, the step shrinks a whole vector, which a BatchNorm after the layer
                # undoes in training mode while its running statistics fall behind.
                new_means = torch.stack([v.mean() for v in new.split(sizes)])
                ratio = torch.where(new_means > 0, means / new_means.clamp_min(1e-30), torch.ones_like(means))
                new = new * torch.repeat_interleave(ratio, counts)
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

    def remove_hooks(self) -> None:
        """Take ``scale_free``'s gradient hooks off the gates (after step 3)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _write(self, flat: torch.Tensor, sizes: list[int]) -> None:
        for g, v in zip(self.gate_list, flat.split(sizes)):
            g.copy_(v.view_as(g))

    def _zeros_macs(self) -> int:
        """MACs left by cutting exactly the gates that are 0."""
        return predict_macs(self.gated, math.nextafter(0.0, 1.0), self.round_to, relative=self.relative,
                            rank_floor=self.rank_floor)

    def state_dict(self) -> dict:
        """What a resumed run needs to repeat this one: lambda, the last step's learning rate (the
        cap on lambda), which gates the last proximal step left at 0 (the budget guard), and with
        ``c_follows_budget`` the cut as of the last steering step (not the gates' cut of the moment),
        and with ``live_macs`` the weights as of the last update."""
        return {"weight": self.weight, "lr": self.lr, "zero_mask": self.zero_mask,
                **({"cut": self.cut} if self.cut is not None else {}),
                **({"scales": list(self.scales)} if self.live_macs else {})}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s state; the gates must be restored first. A checkpoint from
        before ``lr``, ``zero_mask``, ``cut`` and ``scales`` were saved resumes as it did then (the
        live weights then recomputed from the restored gates)."""
        self.weight = float(state["weight"])
        self.lr = float(state["lr"]) if state.get("lr") is not None else None
        mask, total = state.get("zero_mask"), sum(g.numel() for g in self.gate_list)
        self.zero_mask = None
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.numel() == total and self.gate_list:
            self.zero_mask = mask.reshape(-1).to(self.gate_list[0].device)
        if self.c_follows_budget:
            self.cut = float(state["cut"]) if state.get("cut") is not None else self.budget_threshold()
        if self.live_macs:
            scales = state.get("scales")
            if isinstance(scales, list) and len(scales) == len(self.gate_list):
                self.scales = [float(k) for k in scales]
            else:
                self._update_scales()
        self.zeros_macs = self._zeros_macs()


def _times_mean_squared(gate: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``scale_free``'s gradient hook: ``grad`` times the squared mean magnitude of ``gate``'s vector."""
    return grad * gate.detach().abs().mean().clamp_min(1e-12).square()


def gate_stats(threshold_fn, penalty: Optional["GatePenalty"] = None, gated: Optional[fx.GraphModule] = None) -> Any:
    """Step 3's ``epoch_stats`` for :func:`fxtucker.train.train`: per epoch, the gates below the threshold
    ``threshold_fn(gm)`` gives, the MACs if they were stripped now, the mean gate and lambda."""
    relative = penalty.relative if penalty is not None else False
    round_to = penalty.round_to if penalty is not None else None
    rank_floor = penalty.rank_floor if penalty is not None else 0.0

    def stats(model: nn.Module) -> dict:
        gm = gated if gated is not None else getattr(model, "module", model)
        flat = gate_magnitudes(gm, relative)
        th = threshold_fn(gm)
        out = {"gates": flat.numel(), "gates_below_threshold": int(_cut(gm, flat, th, rank_floor).sum()),
               "threshold": th,
               "gate_mean": float(flat.mean()), "macs_if_stripped": predict_macs(gm, th, round_to, relative=relative,
                                                                                  rank_floor=rank_floor)}
        if penalty is not None:
            out["reg_weight"] = penalty.weight
        return out
    return stats
