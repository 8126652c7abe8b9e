"""decompose_conv: replace each eligible conv by Tucker-2 factors (first, core, last), or by an SVD pair.

The decisions (which layers, their kind and ranks, why one is skipped) are plan_decomposition's,
in :mod:`fxtucker.passes.plan_decomposition`; this pass applies them: it builds the factor
modules and rewrites the graph.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker import tucker
from fxtucker.tucker import compute_dtype  # noqa: F401 - importable from here as before the split
from fxtucker.meta import (
    CORE,
    DECOMPOSED,
    FIRST,
    KEY,
    LAST,
    SKIPPED,
    FactorRecord,
    GraphRecord,
    LayerPlan,
    graph_record,
    set_graph_record,
)
from fxtucker.passes._common import (
    CONV_TYPES,
    check_graph_module,
    finish,
    new_node,
    prepare,
    set_submodule,
    split_name,
    standard_strides,
)
from fxtucker.passes.memory_format import keep_memory_format
from fxtucker.passes.plan_decomposition import (  # noqa: F401 - METHODS, Ranks: importable from here as before
    METHODS,
    NOT_POINTWISE,
    NOT_SELECTED,
    Ranks,
    RanksArg,
    check_method,
    find_attr,
    full_ranks,
    functional_conv,
    group_weights,
    kinds,
    normalise_ranks,
    parameter_uses,
    plan_decomposition,
    unsupported_reason,
)

__all__ = ["decompose_conv", "plan_decomposition", "RanksArg", "METHODS"]



def _factor_modules(m: nn.Module, kind: str, ranks: tuple[int, ...]) -> dict[str, nn.Module]:
    """first/core/last modules that compose to ``m``, truncated to ``ranks``."""
    groups = 1 if isinstance(m, nn.Linear) else m.groups
    weights = group_weights(m, kind)
    bias = None if m.bias is None else m.bias.detach()
    if isinstance(m, nn.Linear):
        left, right = tucker.svd_pair(weights[0], ranks[0])
        first, last = nn.Linear(m.in_features, ranks[0], bias=False), nn.Linear(ranks[0], m.out_features, bias=bias is not None)
        mods = {FIRST: first, LAST: last}
        first.weight.data, last.weight.data = right, left
    else:
        conv = type(m) if type(m) in CONV_TYPES else next(c for c in CONV_TYPES if isinstance(m, c))
        ones = (1,) * len(m.kernel_size)
        if kind == "svd":
            r = ranks[0]
            pairs = [tucker.svd_pair(w, r) for w in weights]
            # The input factor is the kernel's rows (kxk, or 1x1 for a 1x1 conv) and takes stride,
            # padding and dilation; a 1x1 second factor commutes with them, and runs on the output.
            first = conv(m.in_channels, groups * r, m.kernel_size, stride=m.stride, padding=m.padding,
                         dilation=m.dilation, groups=groups, bias=False, padding_mode=m.padding_mode)
            last = conv(groups * r, m.out_channels, ones, groups=groups, bias=bias is not None)
            first.weight.data = standard_strides(
                torch.cat([p[1] for p in pairs]).reshape(groups * r, -1, *m.kernel_size))
            last.weight.data = standard_strides(torch.cat([p[0] for p in pairs]).reshape(m.out_channels, r, *ones))
            mods = {FIRST: first, LAST: last}
        else:
            r1, r2 = ranks
            parts = [tucker.tucker2(w, (r1, r2)) for w in weights]
            first = conv(m.in_channels, groups * r1, ones, groups=groups, bias=False)
            core = conv(groups * r1, groups * r2, m.kernel_size, stride=m.stride, padding=m.padding,
                        dilation=m.dilation, groups=groups, bias=False, padding_mode=m.padding_mode)
            last = conv(groups * r2, m.out_channels, ones, groups=groups, bias=bias is not None)
            # the HOSVD core comes out permuted: see standard_strides
            first.weight.data = standard_strides(
                torch.cat([u_in.T for _, _, u_in in parts]).reshape(groups * r1, -1, *ones))
            core.weight.data = standard_strides(torch.cat([c for c, _, _ in parts]))
            last.weight.data = standard_strides(
                torch.cat([u_out for _, u_out, _ in parts]).reshape(m.out_channels, r2, *ones))
            mods = {FIRST: first, CORE: core, LAST: last}
    mods = {k: v.to(device=m.weight.device, dtype=m.weight.dtype).train(m.training) for k, v in mods.items()}
    if bias is not None:
        mods[LAST].bias.data = bias.clone()
        mods[LAST].bias.requires_grad_(m.bias.requires_grad)
    for mod in mods.values():
        mod.weight.requires_grad_(m.weight.requires_grad)  # a frozen layer stays frozen
    return mods


def _factors(m: nn.Module, name: str, plan: LayerPlan, nodes: list[fx.Node],
             done: dict[str, LayerPlan]) -> dict[str, nn.Module]:
    """The factor modules of layer ``name`` (module ``m``) by ``plan``, each call in ``nodes`` rewired
    through their new call_module nodes (the caller puts the modules at ``name``); ``done`` gets the plan."""
    if plan.kind not in kinds(m) or plan.full_ranks != full_ranks(m, plan.kind):
        valid = " or ".join(f"kind {k!r} with full_ranks {full_ranks(m, k)}" for k in kinds(m))
        raise ValueError(f"the plan for {name!r} ({plan}) does not fit {type(m).__name__}: it must have {valid}")
    ranks_ = normalise_ranks(plan.ranks, m, name, plan.kind)
    factors = _factor_modules(m, plan.kind, ranks_)
    for node in nodes:
        x = node.args[0] if node.args else node.kwargs["input"]
        graph = node.graph
        with graph.inserting_before(node):
            for role in factors:
                x = new_node(graph, "call_module", f"{name}.{role}", (x,), node,
                             FactorRecord(source=name, role=role, ranks=ranks_, replaces=node.name))
        node.replace_all_uses_with(x)
        graph.erase_node(node)
    done[name] = dataclasses.replace(plan, ranks=ranks_)
    return factors


def decompose_conv(
    gm: fx.GraphModule,
    ranks: RanksArg = None,
    *,
    method: str = "tucker2",
    linear: bool = False,
    use_plan: bool = False,
    round_to: Optional[int] = None,
    pointwise: bool = True,
    inplace: bool = False,
) -> fx.GraphModule:
    """Replace each eligible conv node by Tucker-2 factors ``first``, ``core`` and ``last``, or an SVD pair.

    A conv ``W: (C_out, C_in/g, *k)`` becomes a 1x1 conv ``first`` (C_in -> R1), a kxk conv
    ``core`` (R1 -> R2, with the original stride, padding, dilation and padding_mode) and a 1x1
    conv ``last`` (R2 -> C_out, with the original bias), from HOSVD over the output- and
    input-channel modes; grouped convs are decomposed per group. 1x1 convs (and Linear layers
    when ``linear=True``) become SVD pairs ``first``/``last``. With ``method="svd"`` a kxk conv
    becomes an SVD pair too: its kernel reshaped to ``(C_out, C_in/g * k)`` and factored by
    truncated SVD, ``first`` a kxk conv (C_in -> R, with the original stride, padding, dilation
    and padding_mode) and ``last`` a 1x1 conv (R -> C_out, with the original bias). At full
    rank the function is unchanged; truncated, each kernel is its HOSVD (or SVD) truncation.

    A functional ``F.conv1d/2d/3d`` call is a layer like a module when its weight (and bias)
    are ``nn.Parameter``s, each read by one get_attr node that feeds only this call, and its
    stride, padding, dilation and groups are constants. Its layer name is
    ``<module holding the weight>.<node name>`` (``block.conv2d`` for ``F.conv2d(x,
    self.block.weight)``; just the node name for a parameter of the root), with ``_1``, ``_2``,
    ... appended while that attribute exists; the factors live there as for a module
    (``block.conv2d.first``, ...), the call's get_attr nodes and parameters are removed, and a
    dense restore (:func:`fold_or_restore`) rebuilds an ``nn.Conv*d`` under that name. Its
    record has ``op`` the function's name (``"conv2d"``) and ``node`` the call's node name.

    Depthwise and transposed convs, functional convs on computed weights or on parameters
    read elsewhere too, convs with tied weights, hooks, parametrizations or a custom forward
    are skipped with the reason recorded (see :func:`fxtucker.report`) and one summary warning.

    Args:
        gm: the traced model (``fxtucker.trace`` or ``torch.fx.symbolic_trace``).
        ranks: ``None`` for full rank; a float in (0, 1] for that fraction of each mode; a dict
            qualified name -> ``(R1, R2)`` (or ``R`` for SVD pairs), decomposing only those;
            a callable ``(name, module) -> ranks or None``; or ``"vbmf"`` for EVBMF ranks of
            the two unfoldings (Kim et al. 2015; of the reshaped kernel for SVD pairs). Ranks
            are per group.
        method: ``"tucker2"`` (the default) or ``"svd"``: how convs with a kernel larger than
            1x1 are decomposed (the paper's Table 4 compares the two).
        linear: also decompose ``nn.Linear`` layers into SVD pairs.
        use_plan: apply the plans already in ``node.meta`` (from :func:`plan_decomposition`,
            possibly edited) instead of ``ranks`` and ``method``.
        round_to: with a fractional ``ranks``, round each rank up to a multiple of ``round_to``
            (e.g. 8 or 16), never above the full rank; None (or full rank) rounds nothing.
        pointwise: also decompose 1x1 convs (into SVD pairs); ``False`` leaves every conv whose
            kernel is 1 in each dimension whole (strided, padded, grouped, Conv1d/3d and functional
            ones too), recorded as not selected, without a warning; a callable ``ranks`` is not asked
            about them, and a dict that names one is an error. A ResNet's 1x1 shortcuts carry
            about 1% of its MACs.
        inplace: rewrite ``gm`` itself instead of a deep copy.

    Before::

        %layer1_0_conv1 : call_module[target=layer1.0.conv1](args = (%maxpool,))

    After::

        %layer1_0_conv1_first : call_module[target=layer1.0.conv1.first](args = (%maxpool,))
        %layer1_0_conv1_core : call_module[target=layer1.0.conv1.core](args = (%layer1_0_conv1_first,))
        %layer1_0_conv1_last : call_module[target=layer1.0.conv1.last](args = (%layer1_0_conv1_core,))

    With ``method="svd"`` a kxk conv becomes ``first`` (kxk) and ``last`` (1x1) alone::

        %layer1_0_conv1_first : call_module[target=layer1.0.conv1.first](args = (%maxpool,))
        %layer1_0_conv1_last : call_module[target=layer1.0.conv1.last](args = (%layer1_0_conv1_first,))

    Example::

        >>> gm = decompose_conv(fxtucker.trace(resnet18()), ranks=0.5)
        >>> svd = decompose_conv(fxtucker.trace(resnet18()), ranks=0.5, method="svd")
    """
    check_graph_module(gm, "decompose_conv")
    check_method(method, "decompose_conv")
    if use_plan:
        if round_to is not None:
            raise ValueError("decompose_conv(use_plan=True) applies the plans as they are: pass round_to to "
                             "plan_decomposition(gm, ranks, round_to=...) instead")
        given = {name: value for name, value, default in (("method", method, "tucker2"), ("pointwise", pointwise, True))
                 if type(value) is not type(default) or value != default}
        if given:
            raise ValueError(f"decompose_conv(use_plan=True) applies the plans as they are: pass "
                             f"{', '.join(f'{k}={v!r}' for k, v in given.items())} to plan_decomposition(gm, ranks, "
                             f"{', '.join(f'{k}=...' for k in given)}) instead")
        gm = prepare(gm, inplace, "decompose_conv")
        if not isinstance(gm.meta.get(KEY), GraphRecord) or gm.meta[KEY].stage != "plan_decomposition":
            raise ValueError("decompose_conv(use_plan=True) needs plans: run plan_decomposition(gm, ranks) first")
    else:
        gm = plan_decomposition(gm, ranks, method=method, linear=linear, round_to=round_to, pointwise=pointwise,
                                inplace=inplace)
    modules = dict(gm.named_modules())
    sites: dict[str, list[fx.Node]] = defaultdict(list)
    functional: list[fx.Node] = []
    for node in gm.graph.nodes:
        plan = node.meta.get(KEY)
        if isinstance(plan, LayerPlan) and plan.kind != "skip":
            if node.op == "call_module":
                sites[node.target].append(node)
            elif node.op == "call_function":
                functional.append(node)
    rec = graph_record(gm)
    uses = parameter_uses(gm)
    shared = uses.names
    read = frozenset(n.target for n in gm.graph.nodes if n.op == "get_attr")
    all_sites = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in sites:
            all_sites[node.target].append(node)
    done: dict[str, LayerPlan] = {}  # the plan applied, with normalised ranks
    notes: dict[str, str] = {}  # the record's reason for a decomposed functional conv
    for name, nodes in sites.items():
        plan, m = nodes[0].meta[KEY], modules[name]
        # An edited plan gets the same checks as a computed one.
        if len(all_sites[name]) != len(nodes) or any(n.meta.get(KEY) != plan for n in all_sites[name]):
            raise ValueError(f"the call sites of {name!r} ({[n.name for n in all_sites[name]]}) carry different plans; "
                             f"a module is decomposed at all its call sites or at none")
        reason = unsupported_reason(m, name, shared, read)
        if reason:
            raise ValueError(f"the plan asks to decompose {name!r}, which cannot be: {reason}")
        set_submodule(gm, name, nn.ModuleDict(_factors(m, name, plan, nodes, done)).train(m.training))
    for node in functional:
        plan, fc = node.meta[KEY], functional_conv(gm, node, uses)
        name, what = plan.source, f"the functional {node.target.__name__}() call {node.name!r}"
        if fc.reason:
            raise ValueError(f"the plan asks to decompose {what} as {name!r}, which cannot be: {fc.reason}")
        parent, leaf = split_name(name)
        owner = find_attr(gm, parent) if parent else gm
        if name in done or not isinstance(owner, nn.Module) or hasattr(owner, leaf):
            raise ValueError(f"the plan names {what} {name!r}, which is taken or has no parent module; give it a "
                             f"free name under an existing module (plan_decomposition's names are free)")
        factors = _factors(fc.module, name, plan, [node], done)
        setattr(owner, leaf, nn.ModuleDict(factors).train(fc.module.training))
        # The parameters now live in the factors: their reads and the parameters themselves go.
        for attr in fc.reads:
            gm.graph.erase_node(attr)
        for target in fc.params:
            holder, pname = split_name(target)
            delattr(gm.get_submodule(holder), pname)
        notes[name] = (f"{what} on {', '.join(map(repr, fc.params))} became module {name!r} (its parameters are "
                       f"removed); a dense restore rebuilds it as nn.{type(fc.module).__name__} {name!r}")
    for node in gm.graph.nodes:
        if isinstance(node.meta.get(KEY), LayerPlan):
            del node.meta[KEY]
    layers = tuple(
        dataclasses.replace(r, kind=done[r.name].kind, full_ranks=done[r.name].full_ranks, ranks=done[r.name].ranks,
                            decision=DECOMPOSED, reason=notes.get(r.name, "")) if r.name in done else r
        for r in rec.layers
    )
    set_graph_record(gm, dataclasses.replace(rec, layers=layers, stage="decompose_conv"))
    unsupported = [r for r in layers if r.decision == SKIPPED and r.reason not in (NOT_SELECTED, NOT_POINTWISE)]
    if unsupported:
        reasons = defaultdict(list)
        for r in unsupported:
            reasons[r.reason.split(";")[0].split(":")[0].split(" (")[0]].append(r.name)
        summary = "; ".join(f"{len(v)} x {k} (e.g. {v[0]!r})" for k, v in reasons.items())
        warnings.warn(f"decompose_conv left {len(unsupported)} layer(s) as they are: {summary}. "
                      f"fxtucker.report(gm) lists each with its reason.", stacklevel=2)
    return keep_memory_format(finish(gm))
