"""The forms of a decomposed layer: each a chain of plain modules that computes the layer's function,
the MACs rule that picks one, and the rewrite that gives a layer its form.

- ``"dense"``: the original layer, its kernel the factors multiplied back out;
- ``"tucker2"``: first, core, last as they are (``"svd"`` for an SVD pair: first and last);
- ``"merge_first"``: first multiplied into the core (Tucker-1: a kxk conv C_in -> R2, then last);
- ``"merge_last"``: last multiplied into the core (Tucker-1: first, then a kxk conv R1 -> C_out);
- each with ``"+linear"`` where it has pointwise convs (1x1, stride 1, no padding, groups 1): those
  run as ``nn.Linear`` over the channel dimension between two permutes (:func:`pointwise_as_linear`).

fold_or_restore applies a form plan with :func:`give_form`; time_forms times the chains of
:func:`candidate_forms`. The kernel maths is :func:`fxtucker.tucker.compose` and
:func:`fxtucker.tucker.merge`.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from fxtucker import tucker
from fxtucker.meta import CORE, FIRST, GATE_ROLES, KEY, LAST, MACS, TENSOR_META, ConvSpec, graph_record
from fxtucker.passes._common import (CONV_TYPES, factor_nodes, layer_nodes, nothing_decomposed, set_submodule,
                                     standard_strides)
from fxtucker.passes.cost_model import conv_macs

__all__ = ["DENSE", "TUCKER2", "MERGE_FIRST", "MERGE_LAST", "SVD", "FORMS", "LINEAR", "dense_module",
           "merged_module", "base_forms", "build_form", "candidate_forms", "with_linear", "is_pointwise",
           "ChannelsLinear", "pointwise_as_linear", "give_form", "decomposed_layers", "layer_specs",
           "original_macs", "in_features", "macs_plan", "check_factors", "batched"]

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
    if isinstance(first, nn.Linear):
        dense = nn.Linear(first.in_features, last.out_features, bias=last.bias is not None)
        weight = tucker.compose(first.weight, last.weight)
    else:
        weight = tucker.compose(first.weight, last.weight, None if core is None else core.weight, spec.groups)
        weight = weight.reshape(spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size)
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


def merged_module(core: nn.Module, factor: nn.Module, into: str) -> nn.Module:
    """One kxk conv equal to ``core(first(x))`` (``into="first"``: a grouped 1x1 ``first`` without
    bias) or ``last(core(x))`` (``into="last"``: a grouped 1x1 ``last``)."""
    g = core.groups
    weight, bias = tucker.merge(core.weight, factor.weight, into, g, None if core.bias is None else core.bias,
                                None if into == "first" else factor.bias)
    in_ch = factor.in_channels if into == "first" else core.in_channels
    out_ch = core.out_channels if into == "first" else factor.out_channels
    merged = type(core)(in_ch, out_ch, core.kernel_size, stride=core.stride, padding=core.padding,
                        dilation=core.dilation, groups=g, bias=bias is not None, padding_mode=core.padding_mode)
    merged = merged.to(device=core.weight.device, dtype=core.weight.dtype)
    merged.weight.data = standard_strides(weight.reshape(out_ch, in_ch // g, *core.kernel_size).to(core.weight.dtype))
    if bias is not None:
        merged.bias.data = bias.detach().clone() if into == "first" else bias.to(core.weight.dtype)
    return merged


def base_forms(container: nn.Module) -> tuple[str, ...]:
    """The forms (without "+linear") a decomposed layer's factors can take."""
    if CORE not in container:
        return (DENSE, SVD)
    # A bias on first, before the core's zero padding, would not commute with merging.
    return (DENSE, TUCKER2) + ((MERGE_FIRST,) if container[FIRST].bias is None else ()) + (MERGE_LAST,)


def build_form(container: nn.Module, spec: ConvSpec | None, form: str) -> list[nn.Module]:
    """The chain of modules of one base form of a decomposed layer (the factors themselves where kept)."""
    first, last = container[FIRST], container[LAST]
    if form == DENSE:
        return [dense_module(container, spec)]
    if form == SVD:
        return [first, last]
    core = container[CORE]
    if form == TUCKER2:
        return [first, core, last]
    if form == MERGE_FIRST:
        return [merged_module(core, first, "first"), last]
    return [first, merged_module(core, last, "last")]


def candidate_forms(container: nn.Module, spec: ConvSpec | None) -> dict[str, list[nn.Module]]:
    """Every base form of one decomposed layer, each a chain of modules that computes the same function."""
    return {form: build_form(container, spec, form) for form in base_forms(container)}


def with_linear(forms: dict[str, list[nn.Module]], batched: bool) -> dict[str, list[nn.Module]]:
    """``forms`` and, for each form with a pointwise conv, its "+linear" variant (for batched
    inputs: the permutes assume a batch dimension)."""
    out = dict(forms)
    if not batched:
        return out
    for name, chain in forms.items():
        if any(is_pointwise(m) for m in chain):
            out[name + LINEAR] = [ChannelsLinear(_as_linear(m), m.weight.dim() - 2) if is_pointwise(m) else m
                                  for m in chain]
    return out


def is_pointwise(m: nn.Module) -> bool:
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


class ChannelsLinear(nn.Module):
    """A "+linear" form's pointwise conv as one module (while it is timed): the graph code that
    :func:`pointwise_as_linear` writes, an nn.Linear over channels between two permutes."""

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
    if not is_pointwise(conv):
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


def give_form(gm: fx.GraphModule, source: str, roles: dict[str, list[fx.Node]], form: str,
              chain: list[nn.Module]) -> list[fx.Node]:
    """Rewrite decomposed layer ``source`` (its factor nodes by role) of ``gm`` to ``form``, in place.

    ``chain`` is the form's modules without "+linear" (:func:`build_form`). "dense" puts the
    original module back at ``source``, one call per call site under the original node name (its
    ``tensor_meta`` carried over); the merges drop the merged factor's node and module. Returns the
    layer's call nodes afterwards (dense calls, or the factors kept); records are the caller's.
    """
    base, linear = form.removesuffix(LINEAR), form.endswith(LINEAR)
    if base == DENSE:
        set_submodule(gm, source, chain[0])
        kept = []
        for first, last in zip(roles[FIRST], roles[LAST]):
            with gm.graph.inserting_before(first):
                dense = gm.graph.create_node("call_module", source, (first.args[0],), {})
            dense.name = last.meta[KEY].replaces  # the original node name comes back
            if first.stack_trace:
                dense.stack_trace = first.stack_trace
            if TENSOR_META in last.meta:
                dense.meta[TENSOR_META] = last.meta[TENSOR_META]
            last.replace_all_uses_with(dense)
            kept.append(dense)
        for role in (LAST, CORE, FIRST):
            for node in roles.get(role, []):
                gm.graph.erase_node(node)
        if linear:
            pointwise_as_linear(gm, source, kept)
        return kept
    container = gm.get_submodule(source)
    if base == MERGE_FIRST:
        container[CORE] = chain[0]
        for first, core in zip(roles[FIRST], roles[CORE]):
            core.args = (first.args[0],)
            gm.graph.erase_node(first)
        del container[FIRST]
    elif base == MERGE_LAST:
        container[CORE] = chain[1]
        for core, last in zip(roles[CORE], roles[LAST]):
            last.replace_all_uses_with(core)
            gm.graph.erase_node(last)
        del container[LAST]
    kept_roles = {MERGE_FIRST: (CORE, LAST), MERGE_LAST: (FIRST, CORE)}.get(base, (FIRST, CORE, LAST))
    if linear:
        for role in kept_roles:
            if role in container and is_pointwise(container[role]):
                pointwise_as_linear(gm, f"{source}.{role}", roles[role])
    return [n for role in kept_roles for n in roles.get(role, [])]


def decomposed_layers(gm: fx.GraphModule, who: str) -> dict[str, dict[str, list[fx.Node]]]:
    """The factor nodes of ``gm``'s decomposed layers by layer and role; an error if gates remain,
    if no layer is decomposed, or if a layer already has a "+linear" form (``who`` ran before)."""
    for node, rec in factor_nodes(gm):
        if rec.role in GATE_ROLES:
            raise ValueError(f"{rec.source!r} still has gate node {node.name!r}: run strip_gates(gm, threshold) "
                             f"before {who}")
    by_source = layer_nodes(gm)
    if not by_source and not nothing_decomposed(gm):
        raise ValueError(f"{who} found no decomposed layers: run decompose_conv(gm) first")
    convs = {r.name for r in graph_record(gm).layers if r.spec is not None}
    for source in by_source:
        if source in convs and any(isinstance(m, nn.Linear) for m in gm.get_submodule(source).children()):
            raise ValueError(f"layer {source!r} already has a '+linear' form (its pointwise convs run as nn.Linear): "
                             f"{who} ran on this model before; run it on the model from before that call")
    return by_source


def layer_specs(gm: fx.GraphModule, sources) -> dict:
    """The recorded ConvSpec (None for Linear) of each decomposed layer; an error if a record is missing."""
    specs = {r.name: r.spec for r in graph_record(gm).layers}
    missing = sorted(set(sources) - set(specs))
    if missing:
        raise ValueError(
            f"no fxtucker layer record for {missing}: gm.meta['fxtucker'] is missing or stale (rebuilding a "
            f"GraphModule, or saving and loading it, drops it); run the chain from decompose_conv on one GraphModule"
        )
    return specs


def original_macs(last_nodes: list[fx.Node], spec: ConvSpec | None, in_features: int) -> list[int]:
    """MACs of the original layer at each call site, from the output shape the cost model recorded."""
    macs = []
    for last in last_nodes:
        out_numel = last.meta[TENSOR_META].shape.numel()
        if spec is None:  # Linear
            macs.append(out_numel * in_features)
        else:
            macs.append(conv_macs(out_numel, spec.in_channels // spec.groups, spec.kernel_size))
    return macs


def in_features(container: nn.Module) -> int:
    """A decomposed Linear layer's input features (0 for a conv)."""
    return container[FIRST].in_features if isinstance(container[FIRST], nn.Linear) else 0


def macs_plan(gm: fx.GraphModule, by_source: dict, specs: dict) -> dict[str, tuple[str, int, int]]:
    """The MACs rule (paper section 3.4, eq. 10-11) on a ``gm`` the cost model annotated: per layer
    its factors' form ("tucker2" or "svd") where they cost fewer MACs than the original layer,
    else "dense"; with both costs, ``(form, macs_original, macs_factors)``."""
    plan = {}
    for source, roles in by_source.items():
        container = gm.get_submodule(source)
        factors = sum(n.meta[MACS] for role in (FIRST, CORE, LAST) for n in roles.get(role, []))
        before = sum(original_macs(roles[LAST], specs.get(source), in_features(container)))
        plan[source] = (TUCKER2 if CORE in container else SVD) if factors < before else DENSE, before, factors
    return plan


def check_factors(by_source: dict, who: str) -> None:
    """An error unless every layer still has its first and last factors (no merge was applied)."""
    for source, roles in by_source.items():
        if FIRST not in roles or LAST not in roles:
            raise ValueError(f"layer {source!r} was already folded to {sorted(roles)}; {who} "
                             f"needs the first/core/last factors of decompose_conv or strip_gates")


def batched(gm: fx.GraphModule, roles: dict[str, list[fx.Node]], spec: Optional[ConvSpec]) -> bool:
    """Whether every call of a decomposed conv gets a batched input (the "+linear" permutes need one)."""
    first = roles[FIRST]
    dims = gm.get_submodule(first[0].target).weight.dim()
    return spec is not None and all(len(n.args[0].meta[TENSOR_META].shape) == dims for n in first)
