"""strip_gates: drop components whose gate is below a threshold, fold the rest into the weights."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker.meta import (
    CORE,
    FIRST,
    GATE_CORE,
    GATE_IN,
    GATE_OUT,
    GATE_ROLES,
    KEY,
    LAST,
    MACS,
    PARAMS,
    TENSOR_META,
    graph_record,
    set_graph_record,
)
from fxtucker.passes._common import (CONV_TYPES, check_round_to, factor_nodes, finish, layer_nodes,
                                     nothing_decomposed, prepare, round_rank)
from fxtucker.passes.memory_format import keep_memory_format

__all__ = ["strip_gates", "kept_ranks", "built_ranks", "relative_gates", "round_rank", "floor_masks",
           "check_rank_floor"]


def _plain(m: nn.Module, in_ch: int, out_ch: int, weight: torch.Tensor) -> nn.Module:
    """A plain (unparametrized) copy of conv or linear ``m`` with new channel counts and weight."""
    if isinstance(m, nn.Linear):
        new = nn.Linear(in_ch, out_ch, bias=m.bias is not None)
    else:
        cls = next(c for c in CONV_TYPES if isinstance(m, c))
        new = cls(in_ch, out_ch, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                  groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
    new = new.to(device=weight.device, dtype=weight.dtype)
    new.weight.data = weight.detach().clone()
    # A frozen factor stays frozen: the parametrized weight's trainable tensor is its "original".
    parametrized = getattr(getattr(m, "parametrizations", None), "weight", None)
    new.weight.requires_grad_((parametrized.original if parametrized is not None else m.weight).requires_grad)
    if m.bias is not None:
        new.bias.data = m.bias.detach().clone()
        new.bias.requires_grad_(m.bias.requires_grad)
    return new


def _select(score: torch.Tensor, keep: torch.Tensor, groups: int,
            round_to: Optional[int] = None) -> tuple[list[torch.Tensor], bool, int, bool, bool]:
    """Per group, the local indices to keep (as many in every group); whether they are all to be
    zeroed; the rank kept; whether components below the threshold filled in to even out groups;
    whether they filled in to round the rank up to a multiple of ``round_to``."""
    score, keep = score.view(groups, -1), keep.view(groups, -1)
    counts = keep.sum(dim=1)
    k_max = int(counts.max())
    if k_max == 0:
        # Nothing survives: keep one component, zeroed, so the layer outputs exactly its bias.
        return [torch.zeros(1, dtype=torch.long, device=score.device)] * groups, True, 0, False, False
    k = round_rank(k_max, round_to, score.shape[1])
    chosen = []
    for s, kp in zip(score, keep):
        # Components above the threshold first, then the largest below it to even out the groups
        # and to round the rank up.
        order = torch.argsort(torch.where(kp, s + s.max() + 1, s), descending=True)[:k]
        chosen.append(order.sort().values)
    return chosen, False, k, bool((counts < k_max).any()), k > k_max


@dataclasses.dataclass(frozen=True)
class _Selection:
    """Which components of one gated layer survive a threshold."""

    groups: int
    idx_in: list  # per group, local indices kept of first's outputs
    idx_out: list  # per group, local indices kept of core's outputs / last's inputs
    zero_in: bool  # all of first's components die: keep one, zeroed
    zero_out: bool
    ranks: tuple[int, ...]  # real kept ranks per group (0 when a whole rank dies)
    filled: bool  # components below the threshold kept to even out groups
    rounded: bool = False  # components below the threshold kept to round a rank up to round_to
    floored: bool = False  # components below the threshold kept by rank_floor


def built_ranks(ranks: tuple[int, ...]) -> tuple[int, ...]:
    """The widths strip_gates builds for kept ``ranks``: a whole dead rank (0) keeps one zeroed component."""
    return tuple(max(1, r) for r in ranks)


def _check_threshold(threshold: object) -> None:
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold)
            or threshold < 0):
        raise ValueError(f"threshold must be a finite number >= 0 (the paper uses 0.01 to 0.02), got {threshold!r}")


def check_rank_floor(rank_floor: object) -> None:
    """A ValueError unless ``rank_floor`` is a number in [0, 1)."""
    if (isinstance(rank_floor, bool) or not isinstance(rank_floor, numbers.Real) or not math.isfinite(rank_floor)
            or not 0 <= rank_floor < 1):
        raise ValueError(f"rank_floor must be a number in [0, 1) (the share of each mode's rank that is always kept; "
                         f"0: none), got {rank_floor!r}")


def _floor_count(n: int, rank_floor: float) -> int:
    """Components per group the floor keeps of a mode with ``n`` per group: ceil(rank_floor x n)."""
    return min(n, math.ceil(rank_floor * n - 1e-9)) if rank_floor > 0 else 0


def _top(score: torch.Tensor, groups: int, k: int) -> torch.Tensor:
    """A mask of the ``k`` largest scores in each group (the earlier index first among ties)."""
    s = score.view(groups, -1)
    mask = torch.zeros_like(s, dtype=torch.bool)
    if k > 0:
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask.view(-1)


def floor_masks(c: nn.Module, rank_floor: float) -> dict[str, torch.Tensor]:
    """Per gate role of gated layer ``c``, which components ``rank_floor`` keeps whatever their gate:
    in each mode and group, the ``ceil(rank_floor x rank)`` with the largest scores, scored as
    :func:`strip_gates` scores them (``|gate_in|`` and ``|gate_core x gate_out|``, or for an SVD
    pair ``|gate_in x gate_out|``). Relative gates rank the same within a vector. All False for 0."""
    g_in, g_out = c[GATE_IN].weight.detach(), c[GATE_OUT].weight.detach()
    if not rank_floor:
        none_in, none_out = torch.zeros_like(g_in, dtype=torch.bool), torch.zeros_like(g_out, dtype=torch.bool)
        return {GATE_IN: none_in, GATE_OUT: none_out, **({GATE_CORE: none_out} if GATE_CORE in c else {})}
    groups = getattr(c[FIRST], "groups", 1)
    if GATE_CORE in c:
        g_core = c[GATE_CORE].weight.detach()
        m_in = _top(g_in.abs(), groups, _floor_count(g_in.numel() // groups, rank_floor))
        m_out = _top((g_out * g_core).abs(), groups, _floor_count(g_out.numel() // groups, rank_floor))
        return {GATE_IN: m_in, GATE_CORE: m_out, GATE_OUT: m_out}
    m = _top((g_in * g_out).abs(), groups, _floor_count(g_in.numel() // groups, rank_floor))
    return {GATE_IN: m, GATE_OUT: m}


def _gated_layers(gm: fx.GraphModule) -> dict[str, dict[str, list[fx.Node]]]:
    """Factor and gate nodes by layer, for the layers that have gates."""
    by_source = layer_nodes(gm)
    gated = {s: r for s, r in by_source.items() if GATE_IN in r}
    if not gated:
        raise ValueError("strip_gates found no gates: run insert_gates(gm) first")
    return gated


def relative_gates(g: torch.Tensor) -> torch.Tensor:
    """``|g|`` divided by its mean: gate magnitudes on a scale that a BatchNorm after the layer
    cannot shift (all zeros stay zeros)."""
    a = g.abs()
    mean = a.mean()
    return a / mean if mean > 0 else a


def _selection(c: nn.Module, source: str, threshold: float, round_to: Optional[int] = None,
               relative: bool = False, rank_floor: float = 0.0) -> _Selection:
    """The components of layer ``source`` (container ``c``) that survive ``threshold`` (or ``rank_floor``)."""
    # Compared in float64: against a float32 tensor, torch would round the threshold to float32.
    g_in, g_out = c[GATE_IN].weight.detach().double(), c[GATE_OUT].weight.detach().double()
    g_core = c[GATE_CORE].weight.detach().double() if GATE_CORE in c else None
    for name, g in ((GATE_IN, g_in), (GATE_CORE, g_core), (GATE_OUT, g_out)):
        if g is not None and not torch.isfinite(g).all():
            raise ValueError(f"gates {source}.{name} hold NaN or Inf; the training diverged, nothing can be stripped")
    if relative:
        g_in, g_out = relative_gates(g_in), relative_gates(g_out)
        g_core = relative_gates(g_core) if g_core is not None else None
    groups = getattr(c[FIRST], "groups", 1)
    floor = floor_masks(c, rank_floor)
    if g_core is not None:
        above = {GATE_IN: g_in.abs() >= threshold, GATE_OUT: (g_out.abs() >= threshold) & (g_core.abs() >= threshold)}
        keep_in, keep_out = above[GATE_IN] | floor[GATE_IN], above[GATE_OUT] | floor[GATE_OUT]
        idx_in, zero_in, k_in, fill_in, round_in = _select(g_in.abs(), keep_in, groups, round_to)
        idx_out, zero_out, k_out, fill_out, round_out = _select((g_out * g_core).abs(), keep_out, groups, round_to)
        ranks = (k_in, k_out)
    else:
        above = {GATE_IN: (g_in.abs() >= threshold) & (g_out.abs() >= threshold)}
        idx_in, zero_in, k_in, fill_in, round_in = _select((g_in * g_out).abs(), above[GATE_IN] | floor[GATE_IN],
                                                           groups, round_to)
        idx_out, zero_out, fill_out, round_out = idx_in, zero_in, fill_in, round_in
        ranks = (k_in,)
    floored = bool(rank_floor) and any(bool((floor[role] & ~keep).any()) for role, keep in above.items())
    return _Selection(groups, idx_in, idx_out, zero_in, zero_out, ranks, fill_in or fill_out, round_in or round_out,
                      floored)


def kept_ranks(gm: fx.GraphModule, threshold: float, round_to: Optional[int] = None, *,
               relative: bool = False, rank_floor: float = 0.0) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """What :func:`strip_gates` would keep, without rewriting: per gated layer, the ranks per group
    that survive (rounded up as ``strip_gates(gm, threshold, round_to=round_to)`` rounds them) and
    the channel counts per group the stripped modules get (a whole dead rank still builds one
    zeroed channel)."""
    _check_threshold(threshold)
    check_round_to(round_to)
    check_rank_floor(rank_floor)
    out = {}
    for source in _gated_layers(gm):
        sel = _selection(gm.get_submodule(source), source, threshold, round_to, relative, rank_floor)
        built = (len(sel.idx_in[0]), len(sel.idx_out[0])) if len(sel.ranks) == 2 else (len(sel.idx_in[0]),)
        out[source] = (sel.ranks, built)
    return out


def strip_gates(gm: fx.GraphModule, threshold: float = 0.0, round_to: Optional[int] = None, *,
                relative: bool = False, rank_floor: float = 0.0, inplace: bool = False) -> fx.GraphModule:
    """Remove gated components below ``threshold`` and fold the surviving gates into the weights.

    A component whose gate magnitude is below ``threshold`` is dropped together with what it
    feeds: a row of ``first`` and the matching input slice of ``core``; an output slice of
    ``core`` (or column of ``last``) and the matching column of ``last`` (or slice of ``core``).
    Surviving gates multiply their unit directions; gate nodes, Gate modules and the unit-norm
    parametrizations are all removed, leaving plain ``nn.Conv*`` / ``nn.Linear`` modules.
    Grouped convs keep the same rank in every group (the largest gates below the threshold fill
    in). A layer that loses a whole rank keeps one zeroed component: its output is its bias.

    Args:
        gm: output of :func:`insert_gates` (after training).
        threshold: gates with ``|g| < threshold`` are dropped; 0 keeps every component, which
            leaves the function unchanged. The paper uses 0.01 to 0.02.
        round_to: round each kept rank (per group) up to a multiple of ``round_to`` (e.g. 8 or
            16, sizes that vector units and GEMM kernels like), never above the full rank: the
            largest gates below the threshold are kept to fill in. A rank that died entirely
            stays 0. None keeps the ranks as the threshold leaves them.
        relative: compare each gate with ``threshold`` times the mean magnitude of its gate
            vector (one per layer and role; :func:`relative_gates`) instead of with ``threshold``:
            a BatchNorm after a layer makes the scale of its gates arbitrary, and training can
            shrink or grow it at no cost. compress() prunes this way.
        rank_floor: a share in [0, 1) of each mode's rank (per group) that is kept whatever the
            threshold: the ``ceil(rank_floor x rank)`` components with the largest gates
            (:func:`floor_masks`). 0 (the default) lets the threshold cut a layer to rank 0.
        inplace: rewrite ``gm`` itself instead of a deep copy.

    Before::

        %l_first = call_module[target=l.first](args = (%x,))
        %l_gate_in = call_module[target=l.gate_in](args = (%l_first,))
        %l_core = call_module[target=l.core](args = (%l_gate_in,))

    After::

        %l_first = call_module[target=l.first](args = (%x,))
        %l_core = call_module[target=l.core](args = (%l_first,))

    Example::

        >>> pruned = strip_gates(trained_gated_gm, threshold=0.01)
    """
    _check_threshold(threshold)
    check_round_to(round_to)
    check_rank_floor(rank_floor)
    gm = prepare(gm, inplace, "strip_gates")
    if nothing_decomposed(gm):  # every layer skipped, with its reason: no gate to strip
        set_graph_record(gm, dataclasses.replace(graph_record(gm), stage="strip_gates"))
        return finish(gm)
    gated = _gated_layers(gm)
    kept: dict[str, tuple[tuple[int, ...], str]] = {}
    for source, roles in gated.items():
        c = gm.get_submodule(source)
        sel = _selection(c, source, threshold, round_to, relative, rank_floor)
        groups, idx_in, idx_out = sel.groups, sel.idx_in, sel.idx_out
        first, last = c[FIRST], c[LAST]
        core = c[CORE] if CORE in c else None
        # Effective weights: unit directions times gates.
        g_in, g_out = c[GATE_IN].weight.detach(), c[GATE_OUT].weight.detach()
        w_first = first.weight.detach() * g_in.view(-1, *([1] * (first.weight.dim() - 1)))
        lw = last.weight.detach()
        lw = lw.reshape(groups, lw.shape[0] // groups, lw.shape[1], -1) * g_out.view(groups, 1, -1, 1)
        w_last = lw.reshape(last.weight.shape)
        if core is not None:
            g_core = c[GATE_CORE].weight.detach()
            w_core = core.weight.detach() * g_core.view(-1, *([1] * (core.weight.dim() - 1)))
        r_in, r_out = first.weight.shape[0] // groups, last.weight.shape[1]
        n_in, n_out = len(idx_in[0]), len(idx_out[0])
        glob_in = torch.cat([i + gi * r_in for gi, i in enumerate(idx_in)])
        glob_out = torch.cat([i + gi * r_out for gi, i in enumerate(idx_out)])
        new_first = w_first[glob_in] * (0.0 if sel.zero_in else 1.0)
        new_last = torch.cat([w_last.reshape(groups, -1, *w_last.shape[1:])[gi][:, i] for gi, i in enumerate(idx_out)])
        new_last = new_last * (0.0 if sel.zero_out else 1.0)
        in_features = first.in_features if isinstance(first, nn.Linear) else first.in_channels
        out_features = last.out_features if isinstance(last, nn.Linear) else last.out_channels
        c[FIRST] = _plain(first, in_features, groups * n_in, new_first)
        c[LAST] = _plain(last, groups * n_out, out_features, new_last)
        if core is not None:
            new_core = torch.cat([w_core[glob_out[gi * n_out:(gi + 1) * n_out]][:, idx_in[gi]] for gi in range(groups)])
            c[CORE] = _plain(core, groups * n_in, groups * n_out, new_core)
        ranks = sel.ranks
        notes = []
        if sel.filled:
            notes.append(f"kept gates below the threshold so that all {groups} groups have the same rank")
        if sel.rounded:
            notes.append(f"kept the largest gates below the threshold to round ranks up to a multiple of {round_to}")
        if sel.floored:
            notes.append(f"kept the largest gates below the threshold to keep rank_floor={rank_floor:g} of each mode's rank")
        note = "; ".join(notes)
        kept[source] = (ranks, note)
        for role in GATE_ROLES:
            for node in roles.get(role, []):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            if role in c:
                del c[role]
        for role in (FIRST, CORE, LAST):
            for node in roles.get(role, []):
                node.meta[KEY] = dataclasses.replace(node.meta[KEY], ranks=ranks)
                # The cost model's figures described the full-rank factors: drop, never lie.
                for key in (MACS, PARAMS, TENSOR_META):
                    node.meta.pop(key, None)
    rec = graph_record(gm)
    layers = tuple(
        dataclasses.replace(r, ranks=kept[r.name][0], reason=kept[r.name][1]) if r.name in kept else r
        for r in rec.layers
    )
    set_graph_record(gm, dataclasses.replace(rec, layers=layers, stage="strip_gates"))
    return keep_memory_format(finish(gm))
