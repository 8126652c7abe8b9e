"""fold_or_restore: keep a decomposition only where it costs fewer MACs than the original layer."""

from __future__ import annotations

import dataclasses
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
from fxtucker.passes._common import CONV_TYPES, factor_nodes, layer_nodes, finish, prepare, set_submodule
from fxtucker.passes.cost_model import conv_macs, cost_model
from fxtucker.passes.strip_gates import kept_ranks

__all__ = ["fold_or_restore", "dense_module", "predict_macs"]


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
        f = f.reshape(g, f.shape[0] // g, f.shape[1])  # (g, R1, C_in/g)
        l_ = l_.reshape(g, l_.shape[0] // g, l_.shape[1])  # (g, C_out/g, R2)
        if core is None:
            weight = torch.einsum("gor,gri->goi", l_, f)
        else:
            c = core.weight.detach().to(dtype)
            c = c.reshape(g, c.shape[0] // g, *c.shape[1:])  # (g, R2, R1, *k)
            weight = torch.einsum("gos,gsr...,gri->goi...", l_, c, f)
        weight = weight.reshape(spec.out_channels, spec.in_channels // g, *spec.kernel_size)
        dense = getattr(nn, spec.cls_name)(
            spec.in_channels, spec.out_channels, spec.kernel_size, stride=spec.stride, padding=spec.padding,
            dilation=spec.dilation, groups=spec.groups, bias=spec.bias, padding_mode=spec.padding_mode,
        )
    dense = dense.to(device=first.weight.device, dtype=first.weight.dtype)
    dense.weight.data = weight.to(first.weight.dtype)
    if last.bias is not None:
        dense.bias.data = last.bias.detach().clone()
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


def predict_macs(gm: fx.GraphModule, threshold: float, round_to: Optional[int] = None) -> int:
    """Total MACs of ``fold_or_restore(strip_gates(gm, threshold, round_to), x)``, without rewriting anything.

    ``gm`` is a gated GraphModule annotated by :func:`cost_model` (run once; training changes no
    shape). Each factor's MACs scale with its kept channels (first: outputs; core: inputs times
    outputs; last: inputs), and each layer then costs the smaller of factors and original, as
    fold_or_restore decides. Used to choose the threshold that meets a MAC budget; ``round_to``
    counts the ranks rounded up as :func:`strip_gates` rounds them.
    """
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if any(MACS not in n.meta for n in nodes):
        raise ValueError("predict_macs needs cost-model annotations: run cost_model(gm, *example_inputs) first")
    total = sum(n.meta[MACS] for n in nodes)
    by_source = layer_nodes(gm)
    specs = _layer_specs(gm, by_source)
    for source, (_, built) in kept_ranks(gm, threshold, round_to).items():
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


def fold_or_restore(gm: fx.GraphModule, *example_inputs: Any, inplace: bool = False) -> fx.GraphModule:
    """Per decomposed layer, keep the factors only where they cost fewer MACs than the original.

    The cost model runs on ``example_inputs``; for each layer the MACs of ``first + core +
    last`` are compared with those of the original layer at the same output shape (paper
    section 3.4, eq. 10-11). Where the factors are not cheaper, their product is put back as
    one dense layer under the original target and node name. Either way the decision and both
    costs go into the layer's record (``fxtucker.report``) and onto the nodes' metadata, so the
    model's MACs never go up.

    Args:
        gm: output of :func:`strip_gates` (or of :func:`decompose_conv`); no gates may remain.
        example_inputs: one batch of ``gm``'s positional inputs, for the cost model.
        inplace: rewrite ``gm`` itself instead of a deep copy.

    Before (a layer whose factors cost more than the conv)::

        %l_first = call_module[target=l.first](args = (%x,))
        %l_core = call_module[target=l.core](args = (%l_first,))
        %l_last = call_module[target=l.last](args = (%l_core,))

    After::

        %l = call_module[target=l](args = (%x,))

    Example::

        >>> final = fold_or_restore(strip_gates(gated, 0.01), torch.randn(1, 3, 224, 224))
    """
    gm = prepare(gm, inplace, "fold_or_restore")
    for node, rec in factor_nodes(gm):
        if rec.role in GATE_ROLES:
            raise ValueError(f"{rec.source!r} still has gate node {node.name!r}: run strip_gates(gm, threshold) "
                             f"before fold_or_restore")
    by_source = layer_nodes(gm)
    if not by_source:
        raise ValueError("fold_or_restore found no decomposed layers: run decompose_conv(gm) first")
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
        set_submodule(gm, source, dense_mod)
        for first, last, macs in zip(roles[FIRST], roles[LAST], site_macs):
            with gm.graph.inserting_before(first):
                dense = gm.graph.create_node("call_module", source, (first.args[0],), {})
            dense.name = last.meta[KEY].replaces  # the original node name comes back
            if first.stack_trace:
                dense.stack_trace = first.stack_trace
            dense.meta[KEY] = FoldRecord(source=source, decision=RESTORED, macs_original=before, macs_decomposed=after)
            # What the cost model would write, known without running the model again.
            dense.meta.update({MACS: macs, PARAMS: sum(p.numel() for p in dense_mod.parameters()),
                               TENSOR_META: last.meta[TENSOR_META]})
            last.replace_all_uses_with(dense)
        for role in (LAST, CORE, FIRST):
            for node in roles.get(role, []):
                gm.graph.erase_node(node)
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
