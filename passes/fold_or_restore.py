"""fold_or_restore: keep a decomposition only where it costs fewer MACs than the original layer."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import operator
import statistics
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker.meta import (
    CORE,
    DECOMPOSED,
    FIRST,
    GATE_ROLES,
    KEY,
    LAST,
    MACS,
    PARAMS,
    TENSOR_META,
    RESTORED,
    ConvSpec,
    FoldRecord,
    graph_record,
    set_graph_record,
)
from fxtucker.latency import TimingCache, check_backend, check_device, measure_latency
from fxtucker.passes._common import (CONV_TYPES, factor_nodes, finish, layer_nodes, nothing_decomposed, prepare,
                                     set_submodule, standard_strides)
from fxtucker.passes.cost_model import conv_macs, cost_model
from fxtucker.passes.strip_gates import kept_ranks

__all__ = ["fold_or_restore", "dense_module", "predict_macs", "pointwise_as_linear", "COSTS", "FORMS", "SEARCHES",
           "LINEAR"]

COSTS = ("macs", "latency")
SEARCHES = ("layer", "model")
DENSE, TUCKER2, MERGE_FIRST, MERGE_LAST, SVD = "dense", "tucker2", "merge_first", "merge_last", "svd"
FORMS = (DENSE, TUCKER2, MERGE_FIRST, MERGE_LAST, SVD)
# A form's suffix: its pointwise convs (1x1, stride 1, no padding, ungrouped) run as nn.Linear over
# the channel dimension, between two permutes ("tucker2+linear"). Under torch.compile the permutes
# are free (inductor keeps convs' activations channels-last) and the Linear is a plain GEMM, which
# beats a oneDNN 1x1 convolution call on small batches.
LINEAR = "+linear"


def dense_module(container: nn.Module, spec: ConvSpec | None) -> nn.Module:
    """Rebuild the original conv (from ``spec``) or Linear whose kernel is first, core, last composed."""
    first, last = container[FIRST], container[LAST]
    core = container[CORE] if CORE in container else None
    dtype = torch.float64 if first.weight.dtype == torch.float64 else torch.float32
    f, l_ = first.weight.detach().to(dtype), last.weight.detach().to(dtype)
    if isinstance(first, nn.Linear):
        dense = nn.Linear(first.in_features, last.out_features, bias=last.bias is not None)
        weight = l_ @ f
    else:
        g = spec.groups
        # first is 1x1 (Tucker-2, or a 1x1 conv's SVD pair) or kxk (a kxk conv's SVD pair): (g, R1, C_in/g, *k_first)
        f = f.reshape(g, f.shape[0] // g, *f.shape[1:])
        l_ = l_.reshape(g, l_.shape[0] // g, l_.shape[1])  # (g, C_out/g, R2)
        if core is None:
            weight = torch.einsum("gor,gri...->goi...", l_, f)
        else:
            c = core.weight.detach().to(dtype)
            c = c.reshape(g, c.shape[0] // g, *c.shape[1:])  # (g, R2, R1, *k)
            weight = torch.einsum("gos,gsr...,gri->goi...", l_, c, f.reshape(*f.shape[:3]))
        weight = weight.reshape(spec.out_channels, spec.in_channels // g, *spec.kernel_size)
        dense = getattr(nn, spec.cls_name)(
            spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride, padding=spec.padding,
            dilation=spec.dilation, groups=spec.groups, bias=spec.bias, padding_mode=spec.padding_mode,
        )
    dense = dense.to(device=first.weight.device, dtype=first.weight.dtype)
    dense.weight.data = standard_strides(weight.to(first.weight.dtype))
    # Frozen factors give a frozen layer (strip_gates and decompose_conv keep requires_grad too).
    dense.weight.requires_grad_(any(m.weight.requires_grad for m in (first, core, last) if m is not None))
    if last.bias is not None:
        dense.bias.data = last.bias.detach().clone()
        dense.bias.requires_grad_(last.bias.requires_grad)
    return dense


def _layer_specs(gm: fx.GraphModule, sources) -> dict:
    """The recorded ConvSpec (None for Linear) of each decomposed layer; an error if a record is missing."""
    specs = {r.name: r.spec for r in graph_record(gm).layers}
    missing = sorted(set(sources) - set(specs))
    if missing:
        raise ValueError(
            f"no fxtucker layer record for {missing}: gm.meta['fxtucker'] is missing or stale (rebuilding a "
            f"GraphModule, or saving and loading it, drops it); run the chain from decompose_conv on one GraphModule"
        )
    return specs


def _original_macs(last_nodes: list[fx.Node], spec: ConvSpec | None, in_features: int) -> list[int]:
    """MACs of the original layer at each call site, from the output shape the cost model recorded."""
    macs = []
    for last in last_nodes:
        out_numel = last.meta[TENSOR_META].shape.numel()
        if spec is None:  # Linear
            macs.append(out_numel * in_features)
        else:
            macs.append(conv_macs(out_numel, spec.in_channels // spec.groups, spec.kernel_size))
    return macs


def predict_macs(gm: fx.GraphModule, threshold: float, round_to: Optional[int] = None, *,
                 relative: bool = False) -> int:
    """Total MACs of ``fold_or_restore(strip_gates(gm, threshold, round_to), x)``, without rewriting anything.

    ``gm`` is a gated GraphModule annotated by :func:`cost_model` (run once; training changes no
    shape). Each factor's MACs scale with its kept channels (first: outputs; core: inputs times
    outputs; last: inputs), and each layer then costs the smaller of factors and original, as
    fold_or_restore decides. Used to choose the threshold that meets a MAC budget; ``round_to``
    counts the ranks rounded up as :func:`strip_gates` rounds them, and ``relative`` compares
    gates as it does.
    """
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if any(MACS not in n.meta for n in nodes):
        raise ValueError("predict_macs needs cost-model annotations: run cost_model(gm, *example_inputs) first")
    total = sum(n.meta[MACS] for n in nodes)
    by_source = layer_nodes(gm)
    specs = _layer_specs(gm, by_source)
    for source, (_, built) in kept_ranks(gm, threshold, round_to, relative=relative).items():
        roles, c = by_source[source], gm.get_submodule(source)
        groups = getattr(c[FIRST], "groups", 1)
        r_in, r_out = c[FIRST].weight.shape[0] // groups, c[LAST].weight.shape[1]
        n_in, n_out = (built[0], built[-1])
        full = sum(n.meta[MACS] for role in (FIRST, CORE, LAST) for n in roles.get(role, []))
        after = (sum(n.meta[MACS] * n_in // r_in for n in roles[FIRST])
                 + sum(n.meta[MACS] * n_in * n_out // (r_in * r_out) for n in roles.get(CORE, []))
                 + sum(n.meta[MACS] * n_out // r_out for n in roles[LAST]))
        in_features = c[FIRST].in_features if isinstance(c[FIRST], nn.Linear) else 0
        before = sum(_original_macs(roles[LAST], specs.get(source), in_features))
        total += min(after, before) - full
    return total


def _restore(gm: fx.GraphModule, source: str, roles: dict[str, list[fx.Node]], dense_mod: nn.Module,
             site_macs: list[int], record: FoldRecord) -> None:
    """Put ``dense_mod`` back at ``source`` and one call of it, under the original node name, per call site."""
    set_submodule(gm, source, dense_mod)
    for first, last, macs in zip(roles[FIRST], roles[LAST], site_macs):
        with gm.graph.inserting_before(first):
            dense = gm.graph.create_node("call_module", source, (first.args[0],), {})
        dense.name = last.meta[KEY].replaces  # the original node name comes back
        if first.stack_trace:
            dense.stack_trace = first.stack_trace
        dense.meta[KEY] = record
        # What the cost model would write, known without running the model again.
        dense.meta.update({MACS: macs, PARAMS: sum(p.numel() for p in dense_mod.parameters()),
                           TENSOR_META: last.meta[TENSOR_META]})
        last.replace_all_uses_with(dense)
    for role in (LAST, CORE, FIRST):
        for node in roles.get(role, []):
            gm.graph.erase_node(node)


def _prepare_layers(gm: fx.GraphModule, inplace: bool) -> tuple[fx.GraphModule, dict]:
    """The copy (or ``gm``) to rewrite and its decomposed layers; an error if gates remain or no layer does."""
    gm = prepare(gm, inplace, "fold_or_restore")
    for node, rec in factor_nodes(gm):
        if rec.role in GATE_ROLES:
            raise ValueError(f"{rec.source!r} still has gate node {node.name!r}: run strip_gates(gm, threshold) "
                             f"before fold_or_restore")
    by_source = layer_nodes(gm)
    if not by_source and not nothing_decomposed(gm):
        raise ValueError("fold_or_restore found no decomposed layers: run decompose_conv(gm) first")
    convs = {r.name for r in graph_record(gm).layers if r.spec is not None}
    for source in by_source:
        if source in convs and any(isinstance(m, nn.Linear) for m in gm.get_submodule(source).children()):
            raise ValueError(f"layer {source!r} already has a '+linear' form (its pointwise convs run as nn.Linear): "
                             f"fold_or_restore ran on this model before; run it on the model from before that call")
    return gm, by_source


def fold_or_restore(
    gm: fx.GraphModule,
    *example_inputs: Any,
    cost: str = "macs",
    backend: Optional[str] = None,
    device: Optional[str] = None,
    threads: Optional[int] = None,
    max_macs: Optional[int] = None,
    search: Optional[str] = None,
    inplace: bool = False,
) -> fx.GraphModule:
    """Per decomposed layer, keep the factors only where they cost fewer MACs than the original.

    The cost model runs on ``example_inputs``; for each layer the MACs of ``first + core +
    last`` are compared with those of the original layer at the same output shape (paper
    section 3.4, eq. 10-11). Where the factors are not cheaper, their product is put back as
    one dense layer under the original target and node name. Either way the decision and both
    costs go into the layer's record (``fxtucker.report``) and onto the nodes' metadata, so the
    model's MACs never go up.

    With ``cost="latency"`` the decision is the back end's instead: each layer's candidate forms
    are timed at the layer's real input shape(s) on ``backend`` / ``device`` / ``threads``
    (:func:`fxtucker.latency.measure_latency`) and the fastest is kept:

    - ``"dense"``: the original layer (the factors multiplied back out, as above);
    - ``"tucker2"``: first, core, last as they are (``"svd"`` for an SVD pair: a 1x1 conv, a
      Linear layer, or a kxk conv decomposed with ``method="svd"``);
    - ``"merge_first"``: first multiplied into the core (Tucker-1: a kxk conv C_in -> R2, then last);
    - ``"merge_last"``: last multiplied into the core (Tucker-1: first, then a kxk conv R1 -> C_out);
    - each of these with ``"+linear"`` (``"tucker2+linear"``, ...) where it has pointwise convs
      (1x1, stride 1, no padding, groups 1): those run as ``nn.Linear`` over the channel
      dimension between two permutes (:func:`pointwise_as_linear`), a plain GEMM that
      ``torch.compile`` runs without layout conversions.

    Every form computes the same function (up to float rounding). With ``max_macs``, the
    fastest forms are traded, least time lost per MAC saved first, for forms with fewer MACs
    until the whole model has at most ``max_macs`` MACs.

    Layers timed one by one miss what a back end does across layers (inductor's fusions and
    layout choices). With ``search="model"`` the whole model is also built and timed (side by
    side, 3 rounds) with a few candidate form sets: the per-layer choice, it without and with
    ``+linear`` everywhere, halfway to and at the fewest MACs (within ``max_macs``), and, where
    it fits ``max_macs``, every layer dense; the fastest set is kept. It costs a few whole-model
    compilations and timings on the first run.

    Timings are cached by back end, device, threads, torch version, layer (or whole model) and
    input shape in
    ``fxtucker.latency.cache_dir() / "latency.json"`` (``$FXTUCKER_CACHE_DIR`` overrides the
    directory), so a second run times nothing. The form, where it was timed and every
    candidate's time go into the layer's record (``form``, ``timed_on``, ``timings_ms``) and
    the reason column of :func:`fxtucker.report`.

    Args:
        gm: output of :func:`strip_gates` (or of :func:`decompose_conv`); no gates may remain.
        example_inputs: one batch of ``gm``'s positional inputs, for the cost model.
        cost: ``"macs"`` (the paper's rule, the default) or ``"latency"``.
        backend: for ``cost="latency"``: ``"eager"`` (default), ``"compile"`` or ``"onnxruntime"``.
        device: for ``cost="latency"``: ``"cpu"`` (default) or ``"cuda"``.
        threads: for ``cost="latency"``: CPU threads while timing (None: torch's current setting).
        max_macs: for ``cost="latency"``: an upper bound on the whole model's MACs.
        search: for ``cost="latency"``: ``"layer"`` (default: each layer's fastest form) or
            ``"model"`` (also whole models timed with candidate form sets, the fastest kept).
        inplace: rewrite ``gm`` itself instead of a deep copy.

    Before (a layer whose factors cost more than the conv)::

        %l_first = call_module[target=l.first](args = (%x,))
        %l_core = call_module[target=l.core](args = (%l_first,))
        %l_last = call_module[target=l.last](args = (%l_core,))

    After::

        %l = call_module[target=l](args = (%x,))

    Example::

        >>> final = fold_or_restore(strip_gates(gated, 0.01), torch.randn(1, 3, 224, 224))
        >>> fast = fold_or_restore(decomposed, x, cost="latency", backend="onnxruntime", threads=2)
    """
    if cost not in COSTS:
        raise ValueError(f"cost {cost!r} is not known to fold_or_restore; valid: {list(COSTS)}")
    if cost == "latency":
        return _fold_by_latency(gm, example_inputs, backend or "eager", device or "cpu", threads, max_macs,
                                "layer" if search is None else search, inplace)
    given = {k: v for k, v in dict(backend=backend, device=device, threads=threads, max_macs=max_macs,
                                   search=search).items()
             if v is not None}
    if given:
        raise ValueError(f"fold_or_restore: {sorted(given)} apply to cost='latency' only; cost='macs' decides by "
                         f"MACs alone")
    gm, by_source = _prepare_layers(gm, inplace)
    specs = _layer_specs(gm, by_source)
    record = graph_record(gm)
    cost_model(gm, *example_inputs)
    decisions: dict[str, tuple[str, int, int]] = {}
    for source, roles in by_source.items():
        container = gm.get_submodule(source)
        spec = specs.get(source)
        after = sum(n.meta[MACS] for role in (FIRST, CORE, LAST) for n in roles.get(role, []))
        in_features = container[FIRST].in_features if spec is None else 0
        site_macs = _original_macs(roles[LAST], spec, in_features)
        before = sum(site_macs)
        keep = after < before
        decisions[source] = (DECOMPOSED if keep else RESTORED, before, after)
        if keep:
            for role in (FIRST, CORE, LAST):
                for node in roles.get(role, []):
                    node.meta[KEY] = dataclasses.replace(node.meta[KEY], decision=DECOMPOSED,
                                                         macs_original=before, macs_decomposed=after)
            continue
        dense_mod = dense_module(container, spec)
        _restore(gm, source, roles, dense_mod, site_macs,
                 FoldRecord(source=source, decision=RESTORED, macs_original=before, macs_decomposed=after))
    layers = []
    for r in record.layers:
        if r.name in decisions:
            decision, before, after = decisions[r.name]
            reason = (f"factors cost {after:,} MACs < {before:,} of the original" if decision == DECOMPOSED
                      else f"factors would cost {after:,} MACs >= {before:,} of the original; dense kernel rebuilt")
            r = dataclasses.replace(r, decision=decision, macs_before=before,
                                    macs_after=after if decision == DECOMPOSED else before, reason=reason)
        layers.append(r)
    set_graph_record(gm, dataclasses.replace(record, layers=tuple(layers), stage="fold_or_restore"))
    return finish(gm)


# cost="latency": time each layer's forms on the target back end, keep the fastest.


def _merge_first(first: nn.Module, core: nn.Module) -> nn.Module:
    """One kxk conv equal to ``core(first(x))`` (first: a grouped 1x1 conv without bias)."""
    g = core.groups
    dtype = torch.float64 if core.weight.dtype == torch.float64 else torch.float32
    c = core.weight.detach().to(dtype)
    c = c.reshape(g, c.shape[0] // g, *c.shape[1:])  # (g, R2, R1, *k)
    f = first.weight.detach().to(dtype).reshape(g, first.out_channels // g, -1)  # (g, R1, C_in/g)
    weight = torch.einsum("gsr...,gri->gsi...", c, f).reshape(core.out_channels, first.in_channels // g, *core.kernel_size)
    merged = type(core)(first.in_channels, core.out_channels, core.kernel_size, stride=core.stride, padding=core.padding,
                        dilation=core.dilation, groups=g, bias=core.bias is not None, padding_mode=core.padding_mode)
    merged = merged.to(device=core.weight.device, dtype=core.weight.dtype)
    merged.weight.data = standard_strides(weight.to(core.weight.dtype))
    if core.bias is not None:
        merged.bias.data = core.bias.detach().clone()
    return merged


def _merge_last(core: nn.Module, last: nn.Module) -> nn.Module:
    """One kxk conv equal to ``last(core(x))`` (last: a grouped 1x1 conv)."""
    g = core.groups
    dtype = torch.float64 if core.weight.dtype == torch.float64 else torch.float32
    c = core.weight.detach().to(dtype)
    c = c.reshape(g, c.shape[0] // g, *c.shape[1:])  # (g, R2, R1, *k)
    l_ = last.weight.detach().to(dtype).reshape(g, last.out_channels // g, -1)  # (g, C_out/g, R2)
    weight = torch.einsum("gos,gsr...->gor...", l_, c).reshape(last.out_channels, core.in_channels // g, *core.kernel_size)
    has_bias = core.bias is not None or last.bias is not None
    merged = type(core)(core.in_channels, last.out_channels, core.kernel_size, stride=core.stride, padding=core.padding,
                        dilation=core.dilation, groups=g, bias=has_bias, padding_mode=core.padding_mode)
    merged = merged.to(device=core.weight.device, dtype=core.weight.dtype)
    merged.weight.data = standard_strides(weight.to(core.weight.dtype))
    if has_bias:
        bias = torch.zeros(last.out_channels, dtype=dtype, device=core.weight.device)
        if core.bias is not None:  # last(core(x) + b) = last(core(x)) + last's weight applied to b
            bias += torch.einsum("gos,gs->go", l_, core.bias.detach().to(dtype).reshape(g, -1)).reshape(-1)
        if last.bias is not None:
            bias += last.bias.detach().to(dtype)
        merged.bias.data = bias.to(core.weight.dtype)
    return merged


def _forms(container: nn.Module, spec: ConvSpec | None) -> dict[str, list[nn.Module]]:
    """Every form of one decomposed layer, each a chain of modules that computes the same function."""
    first, last = container[FIRST], container[LAST]
    forms = {DENSE: [dense_module(container, spec)]}
    if CORE not in container:
        forms[SVD] = [first, last]
        return forms
    core = container[CORE]
    forms[TUCKER2] = [first, core, last]
    if first.bias is None:  # a bias before the core's zero padding would not commute with merging
        forms[MERGE_FIRST] = [_merge_first(first, core), last]
    forms[MERGE_LAST] = [first, _merge_last(core, last)]
    return forms


def _with_linear(forms: dict[str, list[nn.Module]], batched: bool) -> dict[str, list[nn.Module]]:
    """``forms`` and, for each form with a pointwise conv, its "+linear" variant (for batched
    inputs: the permutes assume a batch dimension)."""
    out = dict(forms)
    if not batched:
        return out
    for name, chain in forms.items():
        if any(_pointwise(m) for m in chain):
            out[name + LINEAR] = [_ChannelsLinear(_as_linear(m), m.weight.dim() - 2) if _pointwise(m) else m
                                  for m in chain]
    return out


def _pointwise(m: nn.Module) -> bool:
    """A conv that is a matrix product over channels at each position: 1x1, stride 1, no padding, ungrouped."""
    return (isinstance(m, CONV_TYPES) and all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride)
            and m.groups == 1 and (isinstance(m.padding, str) or all(p == 0 for p in m.padding)))


def _as_linear(conv: nn.Module) -> nn.Linear:
    """The nn.Linear over channels with ``conv``'s (pointwise) weight and bias."""
    linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
    linear = linear.to(device=conv.weight.device, dtype=conv.weight.dtype)
    linear.weight.data = conv.weight.detach().reshape(conv.out_channels, conv.in_channels).clone()
    if conv.bias is not None:
        linear.bias.data = conv.bias.detach().clone()
    return linear


def _permutes(spatial: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channels first -> last, channels last -> first) dims for ``spatial`` spatial dimensions."""
    return (0, *range(2, spatial + 2), 1), (0, spatial + 1, *range(1, spatial + 1))


class _ChannelsLinear(nn.Module):
    """A "+linear" form's pointwise conv while it is timed: the graph code pointwise_as_linear writes."""

    def __init__(self, linear: nn.Linear, spatial: int):
        super().__init__()
        self.linear, self.spatial = linear, spatial

    def forward(self, x):
        last, first = _permutes(self.spatial)
        return self.linear(x.permute(*last)).permute(*first)


def pointwise_as_linear(gm: fx.GraphModule, target: str, nodes: list[fx.Node]) -> None:
    """Swap the pointwise conv at ``target`` for the equal nn.Linear over channels, and wrap each of
    its call ``nodes`` in permutes: ``x.permute(0, 2, 3, 1)`` before, ``.permute(0, 3, 1, 2)`` after
    (for Conv2d). The call node keeps its name, target and record; the permutes are named after it
    (``<node>_channels_last``, ``<node>_channels_first``). In place; ``gm.recompile()`` is the caller's."""
    conv = gm.get_submodule(target)
    if not _pointwise(conv):
        raise ValueError(f"{target!r} is not a pointwise conv (1x1, stride 1, no padding, groups 1): {conv}")
    to_last, to_first = _permutes(conv.weight.dim() - 2)
    set_submodule(gm, target, _as_linear(conv))
    for node in nodes:
        with gm.graph.inserting_before(node):
            before = gm.graph.create_node("call_method", "permute", (node.args[0], *to_last), {},
                                          name=f"{node.name}_channels_last")
        node.args = (before,)
        with gm.graph.inserting_after(node):
            after = gm.graph.create_node("call_method", "permute", (node, *to_first), {},
                                         name=f"{node.name}_channels_first")
        node.replace_all_uses_with(after, delete_user_cb=lambda user: user is not after)
        if node.stack_trace:  # a None stack trace in the meta breaks torch.compile's autograd tracing
            before.stack_trace = after.stack_trace = node.stack_trace


def _module_key(m: nn.Module) -> list:
    """What a module's speed depends on (its class and shape, not its weights), for the timing cache."""
    if isinstance(m, _ChannelsLinear):
        return ["ChannelsLinear", m.spatial, *_module_key(m.linear)[1:]]
    if isinstance(m, nn.Linear):
        return ["Linear", m.in_features, m.out_features, m.bias is not None]
    return [type(m).__name__, m.in_channels, m.out_channels, list(m.kernel_size), list(m.stride),
            m.padding if isinstance(m.padding, str) else list(m.padding), list(m.dilation), m.groups,
            m.bias is not None, m.padding_mode]


def _chain_macs(chain: list[nn.Module], x: torch.Tensor) -> int:
    """MACs of running ``chain`` on ``x``, counted as the cost model counts them (bias excluded)."""
    macs = 0
    with torch.no_grad():
        for m in chain:
            x = m(x)
            if isinstance(m, (nn.Linear, _ChannelsLinear)):
                macs += x.numel() * getattr(m, "linear", m).in_features
            else:
                macs += conv_macs(x.numel(), m.in_channels // m.groups, m.kernel_size)
    return macs


def _time_chain(chain: list[nn.Module], x: torch.Tensor, backend: str, device: str, threads: Optional[int],
                cache: TimingCache) -> float:
    """Latency of ``chain`` on ``x`` in ms, from the cache when this shape was timed before."""
    key = TimingCache.key(backend, device, threads if threads is not None else torch.get_num_threads(),
                          what="fold_or_restore", input=list(x.shape), dtype=str(x.dtype),
                          modules=[_module_key(m) for m in chain])
    ms = cache.get(key)
    if ms is None:
        # A fresh GraphModule has its own generated forward: torch.compile caches per code object.
        module = fx.symbolic_trace(nn.Sequential(*[copy.deepcopy(m) for m in chain]).eval())
        ms = measure_latency(module, x, backend=backend, device=device, threads=threads)
        cache.put(key, ms)
    return ms


def _choose(layers: dict[str, dict[str, tuple[float, int]]], other_macs: int,
            max_macs: Optional[int]) -> tuple[dict[str, str], set[str]]:
    """The fastest form per layer; with ``max_macs``, traded for forms with fewer MACs (least time
    lost per MAC saved first) until the model fits. Also the layers where the budget forced a trade."""
    choice = {s: min(forms, key=lambda f: (forms[f][0], forms[f][1])) for s, forms in layers.items()}
    forced: set[str] = set()
    if max_macs is None:
        return choice, forced
    total = lambda: other_macs + sum(layers[s][f][1] for s, f in choice.items())  # noqa: E731
    while total() > max_macs:
        moves = [((forms[f][0] - forms[choice[s]][0]) / (forms[choice[s]][1] - forms[f][1]), s, f)
                 for s, forms in layers.items() for f in forms if forms[f][1] < forms[choice[s]][1]]
        if not moves:
            least = other_macs + sum(min(m for _, m in forms.values()) for forms in layers.values())
            raise ValueError(f"fold_or_restore: max_macs={max_macs:,} cannot be met: the cheapest form of every "
                             f"layer still leaves {least:,} MACs; raise max_macs or decompose at lower ranks")
        _, s, f = min(moves)
        choice[s] = f
        forced.add(s)
    return choice, forced


def _fold_by_latency(gm: fx.GraphModule, example_inputs: tuple, backend: str, device: str, threads: Optional[int],
                     max_macs: Optional[int], search: str, inplace: bool) -> fx.GraphModule:
    """fold_or_restore(cost="latency"): see its docstring."""
    check_backend(backend, "fold_or_restore")
    check_device(device, "fold_or_restore")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None (torch's current setting), got {threads!r}")
    if max_macs is not None and (isinstance(max_macs, bool) or not isinstance(max_macs, int) or max_macs <= 0):
        raise ValueError(f"max_macs must be a positive int (the whole model's MACs) or None, got {max_macs!r}")
    if search not in SEARCHES:
        raise ValueError(f"search {search!r} is not known to fold_or_restore; valid: {list(SEARCHES)} (each layer's "
                         f"fastest form, or also whole models timed with candidate form sets)")
    gm, by_source = _prepare_layers(gm, inplace)
    for source, roles in by_source.items():
        if FIRST not in roles or LAST not in roles:
            raise ValueError(f"layer {source!r} was already folded to {sorted(roles)}; fold_or_restore(cost='latency') "
                             f"needs the first/core/last factors of decompose_conv or strip_gates")
    specs = _layer_specs(gm, by_source)
    record = graph_record(gm)
    cost_model(gm, *example_inputs)
    total_macs = sum(n.meta[MACS] for n in gm.graph.nodes if n.op != "output")
    threads_used = threads if threads is not None else torch.get_num_threads()
    timed_on = f"{backend}/{device}/{threads_used} thread{'s' if threads_used != 1 else ''}"
    cache = TimingCache()
    forms: dict[str, dict[str, list[nn.Module]]] = {}
    costs: dict[str, dict[str, tuple[float, int]]] = {}
    factor_macs = 0
    for source, roles in by_source.items():
        container = gm.get_submodule(source)
        batched = specs.get(source) is not None and all(
            len(n.args[0].meta[TENSOR_META].shape) == container[FIRST].weight.dim() for n in roles[FIRST])
        forms[source] = _with_linear(_forms(container, specs.get(source)), batched)
        factor_macs += sum(n.meta[MACS] for role in (FIRST, CORE, LAST) for n in roles.get(role, []))
        costs[source] = {f: (0.0, 0) for f in forms[source]}
        for first in roles[FIRST]:
            meta = first.args[0].meta[TENSOR_META]
            x = torch.randn(tuple(meta.shape), dtype=meta.dtype, device=container[FIRST].weight.device)
            for f, chain in forms[source].items():
                ms, macs = costs[source][f]
                costs[source][f] = (ms + _time_chain(chain, x, backend, device, threads, cache),
                                    macs + _chain_macs(chain, x))
    broken = _linear_breaks(gm, example_inputs, specs, forms, costs, timed_on)
    if broken:
        warnings.warn(f"fold_or_restore: the '+linear' forms are not used: the model does not run with them "
                      f"({broken}); each of them leaves a channels-last tensor, which a later .view() cannot take",
                      stacklevel=3)
        costs = {s: {f: c for f, c in fs.items() if not f.endswith(LINEAR)} for s, fs in costs.items()}
        forms = {s: {f: c for f, c in fs.items() if not f.endswith(LINEAR)} for s, fs in forms.items()}
    choice, forced = _choose(costs, total_macs - factor_macs, max_macs)
    whys = {s: "fastest within max_macs" if s in forced else "fastest" for s in choice}
    if search == "model":
        kept, why = _search_model(gm, example_inputs, specs, forms, costs, choice, total_macs - factor_macs, max_macs,
                                  backend, device, threads, timed_on, cache)
        whys.update({s: why for s in choice if kept[s] != choice[s]})
        choice = kept
    _apply(gm, by_source, specs, forms, costs, choice, timed_on)
    layers = []
    for r in record.layers:
        if r.name in choice:
            form, layer_costs = choice[r.name], costs[r.name]
            before, after = layer_costs[DENSE][1], layer_costs[form][1]
            timings = tuple((f, round(ms, 4)) for f, (ms, _) in layer_costs.items())
            others = ", ".join(f"{f} {ms:.3f}" for f, ms in timings if f != form)
            reason = (f"{whys[r.name]} on {timed_on}: {form} {dict(timings)[form]:.3f} ms ({others}); "
                      f"{after:,} MACs vs {before:,} of the original")
            decision = RESTORED if form.removesuffix(LINEAR) == DENSE else DECOMPOSED
            r = dataclasses.replace(r, decision=decision, macs_before=before, macs_after=after, reason=reason,
                                    form=form, timed_on=timed_on, timings_ms=timings)
        layers.append(r)
    set_graph_record(gm, dataclasses.replace(record, layers=tuple(layers), stage="fold_or_restore"))
    gm = finish(gm)
    cost_model(gm, *example_inputs)  # the merged forms have new shapes: annotate them afresh
    return gm


def _apply(gm: fx.GraphModule, by_source: dict, specs: dict, forms: dict, costs: dict, choice: dict[str, str],
           timed_on: str) -> None:
    """Rewrite each decomposed layer of ``gm`` (in place) to its form in ``choice``; records on the nodes."""
    for source, roles in by_source.items():
        form, container, layer_costs = choice[source], gm.get_submodule(source), costs[source]
        base, linear = form.removesuffix(LINEAR), form.endswith(LINEAR)
        before, after = layer_costs[DENSE][1], layer_costs[form][1]
        if base == DENSE:
            factors = layer_costs[TUCKER2 if TUCKER2 in layer_costs else SVD][1]
            timings = tuple((f, round(ms, 4)) for f, (ms, _) in layer_costs.items())
            site_macs = _original_macs(roles[LAST], specs.get(source),
                                       container[FIRST].in_features if isinstance(container[FIRST], nn.Linear) else 0)
            _restore(gm, source, roles, forms[source][DENSE][0], site_macs,
                     FoldRecord(source=source, decision=RESTORED, macs_original=before, macs_decomposed=factors,
                                form=form, timed_on=timed_on, timings_ms=timings))
            if linear:
                pointwise_as_linear(gm, source, [n for n in gm.graph.nodes
                                                 if n.op == "call_module" and n.target == source])
            continue
        if base == MERGE_FIRST:
            container[CORE] = forms[source][base][0]
            for first, core in zip(roles[FIRST], roles[CORE]):
                core.args = (first.args[0],)
                gm.graph.erase_node(first)
            del container[FIRST]
        elif base == MERGE_LAST:
            container[CORE] = forms[source][base][1]
            for core, last in zip(roles[CORE], roles[LAST]):
                last.replace_all_uses_with(core)
                gm.graph.erase_node(last)
            del container[LAST]
        kept = {MERGE_FIRST: (CORE, LAST), MERGE_LAST: (FIRST, CORE)}.get(base, (FIRST, CORE, LAST))
        for node in (n for role in kept for n in roles.get(role, [])):
            node.meta[KEY] = dataclasses.replace(node.meta[KEY], decision=DECOMPOSED, macs_original=before,
                                                 macs_decomposed=after)
        if linear:
            for role in kept:
                if role in container and _pointwise(container[role]):
                    pointwise_as_linear(gm, f"{source}.{role}", roles[role])


def _trial(gm: fx.GraphModule, specs: dict, forms: dict, costs: dict, choice: dict[str, str],
           timed_on: str) -> fx.GraphModule:
    """A copy of ``gm`` with every layer in its form in ``choice`` (``gm`` is left as it is)."""
    trial = copy.deepcopy(gm)
    _apply(trial, layer_nodes(trial), specs, forms, costs, choice, timed_on)
    return finish(trial)


def _linear_breaks(gm: fx.GraphModule, example_inputs: tuple, specs: dict, forms: dict, costs: dict,
                   timed_on: str) -> str:
    """Why the model does not run with every layer in a "+linear" form ("" if it does, or none has one).

    The output permute leaves a channels-last tensor; an op that needs a contiguous one (``.view``)
    fails. One trial run with each layer's fastest "+linear" form tells."""
    trial_choice = {}
    for s, fs in costs.items():
        linear = [f for f in fs if f.endswith(LINEAR)]
        trial_choice[s] = min(linear or fs, key=lambda f: fs[f])
    if not any(f.endswith(LINEAR) for f in trial_choice.values()):
        return ""
    trial = _trial(gm, specs, forms, costs, trial_choice, timed_on)
    try:
        with torch.no_grad():
            trial(*(t.clone() if isinstance(t, torch.Tensor) else t for t in example_inputs))
    except Exception as exc:  # noqa: BLE001 - any failure means: not with these forms
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return ""


def _candidates(costs: dict, choice: dict[str, str], other_macs: int,
                max_macs: Optional[int]) -> dict[str, dict[str, str]]:
    """Form sets to time as whole models: the per-layer choice first, then variations of it."""
    macs = lambda c: other_macs + sum(costs[s][f][1] for s, f in c.items())  # noqa: E731
    least = other_macs + sum(min(m for _, m in forms.values()) for forms in costs.values())
    linear = {s: f + LINEAR if f + LINEAR in costs[s] else f for s, f in choice.items()}
    found = {
        "per-layer choice": choice,
        "no +linear": {s: f.removesuffix(LINEAR) for s, f in choice.items()},
        "+linear wherever possible": linear,
        "halfway to the fewest MACs": _choose(costs, other_macs, (macs(choice) + least) // 2)[0],
        "fewest MACs": _choose(costs, other_macs, least)[0],
    }
    dense = {s: min((f for f in (DENSE, DENSE + LINEAR) if f in forms), key=lambda f: forms[f][0])
             for s, forms in costs.items()}
    if max_macs is None or macs(dense) <= max_macs:
        found["all dense"] = dense
    candidates: dict[str, dict[str, str]] = {}
    for name, c in found.items():
        if c not in candidates.values():
            candidates[name] = c
    return candidates


def _search_model(gm: fx.GraphModule, example_inputs: tuple, specs: dict, forms: dict, costs: dict,
                  choice: dict[str, str], other_macs: int, max_macs: Optional[int], backend: str, device: str,
                  threads: Optional[int], timed_on: str, cache: TimingCache, rounds: int = 3) -> tuple[dict, str]:
    """The fastest whole model among the candidate form sets, timed side by side (``rounds`` rounds,
    alternating, the median kept; cached by the model's code and modules). Returns its form per
    layer and the reason for the layers where it differs from ``choice``."""
    trials, keys = {}, {}
    for name, c in _candidates(costs, choice, other_macs, max_macs).items():
        trials[name] = (c, _trial(gm, specs, forms, costs, c, timed_on))
        keys[name] = TimingCache.key(backend, device, threads if threads is not None else torch.get_num_threads(),
                                     what="fold_or_restore/model", model=_model_digest(trials[name][1]),
                                     inputs=[[list(t.shape), str(t.dtype)] if isinstance(t, torch.Tensor) else repr(t)
                                             for t in example_inputs])
    times = {name: cache.get(key) for name, key in keys.items()}
    # Timings of one sitting only are compared: if any is missing, every candidate is timed again.
    pending = list(keys) if any(ms is None for ms in times.values()) else []
    runs: dict[str, list[float]] = {name: [] for name in pending}
    for _ in range(rounds if pending else 0):
        for name in pending:
            runs[name].append(measure_latency(trials[name][1], example_inputs, backend=backend, device=device,
                                              threads=threads))
    for name in pending:
        times[name] = statistics.median(runs[name])
        cache.put(keys[name], times[name])
    best = min(times, key=times.get)
    timed = ", ".join(f"{name} {ms:.3f}" for name, ms in times.items() if name != best)
    why = f"in the fastest whole model, form set '{best}' {times[best]:.3f} ms ({timed})"
    return trials[best][0], why


def _model_digest(gm: fx.GraphModule) -> str:
    """What a whole model's speed depends on: its graph code, each called module's class and
    settings (``extra_repr``: shapes, strides, ...) and each attribute read's shape and dtype."""
    parts = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            parts.append([n.target, type(m).__module__, type(m).__qualname__, m.extra_repr(),
                          [[k, list(p.shape), str(p.dtype)] for k, p in m.named_parameters()]])
        elif n.op == "get_attr":
            t = operator.attrgetter(n.target)(gm)
            parts.append([n.target, list(t.shape) if isinstance(t, torch.Tensor) else repr(type(t)),
                          str(getattr(t, "dtype", ""))])
    text = json.dumps([gm.code, parts], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
