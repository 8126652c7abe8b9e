"""fold_or_restore: give each decomposed layer its form; by default keep the factors only where they
cost fewer MACs than the original layer."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import torch.fx as fx
import torch.nn as nn

from fxtucker.meta import (
    CORE,
    DECOMPOSED,
    FIRST,
    KEY,
    LAST,
    MACS,
    RESTORED,
    FoldRecord,
    LayerRecord,
    graph_record,
    set_graph_record,
)
from fxtucker.passes._common import finish, layer_nodes, prepare
from fxtucker.passes.cost_model import cost_model
from fxtucker.passes.forms import (DENSE, FORMS, LINEAR, base_forms, batched, build_form, check_factors,
                                   decomposed_layers, dense_module, give_form, in_features, is_pointwise, layer_specs,
                                   macs_plan, original_macs, pointwise_as_linear)
from fxtucker.passes.memory_format import keep_memory_format
from fxtucker.passes.strip_gates import kept_ranks
from fxtucker.passes.time_forms import COSTS, SEARCHES, check_options, plan_forms

__all__ = ["fold_or_restore", "dense_module", "predict_macs", "pointwise_as_linear", "recorded_forms", "COSTS",
           "FORMS", "SEARCHES", "LINEAR"]


def predict_macs(gm: fx.GraphModule, threshold: float, round_to: Optional[int] = None, *,
                 relative: bool = False, rank_floor: float = 0.0) -> int:
    """Total MACs of ``fold_or_restore(strip_gates(gm, threshold, round_to), x)``, without rewriting anything.

    ``gm`` is a gated GraphModule annotated by :func:`cost_model` (run once; training changes no
    shape). Each factor's MACs scale with its kept channels (first: outputs; core: inputs times
    outputs; last: inputs), and each layer then costs the smaller of factors and original, as
    fold_or_restore decides. Used to choose the threshold that meets a MAC budget; ``round_to``
    counts the ranks rounded up as :func:`strip_gates` rounds them, and ``relative`` and
    ``rank_floor`` select components as it does.
    """
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if any(MACS not in n.meta for n in nodes):
        raise ValueError("predict_macs needs cost-model annotations: run cost_model(gm, *example_inputs) first")
    total = sum(n.meta[MACS] for n in nodes)
    by_source = layer_nodes(gm)
    specs = layer_specs(gm, by_source)
    for source, (_, built) in kept_ranks(gm, threshold, round_to, relative=relative, rank_floor=rank_floor).items():
        roles, c = by_source[source], gm.get_submodule(source)
        groups = getattr(c[FIRST], "groups", 1)
        r_in, r_out = c[FIRST].weight.shape[0] // groups, c[LAST].weight.shape[1]
        n_in, n_out = (built[0], built[-1])
        full = sum(n.meta[MACS] for role in (FIRST, CORE, LAST) for n in roles.get(role, []))
        after = (sum(n.meta[MACS] * n_in // r_in for n in roles[FIRST])
                 + sum(n.meta[MACS] * n_in * n_out // (r_in * r_out) for n in roles.get(CORE, []))
                 + sum(n.meta[MACS] * n_out // r_out for n in roles[LAST]))
        before = sum(original_macs(roles[LAST], specs.get(source), in_features(c)))
        total += min(after, before) - full
    return total


def recorded_forms(layers: Iterable[LayerRecord]) -> dict[str, str]:
    """The form plan that layer records describe (to replay fold_or_restore): each decided layer's
    recorded ``form``, or where cost="macs" decided (no form recorded) "dense" for a restored layer
    and its factors' kind ("tucker2" or "svd") for a kept one."""
    return {r.name: r.form or (DENSE if r.decision == RESTORED else r.kind)
            for r in layers if r.decision in (DECOMPOSED, RESTORED) and r.kind != "skip"}


def fold_or_restore(
    gm: fx.GraphModule,
    *example_inputs: Any,
    plan: Optional[dict[str, str]] = None,
    cost: str = "macs",
    backend: Optional[str] = None,
    device: Optional[str] = None,
    threads: Optional[int] = None,
    max_macs: Optional[int] = None,
    search: Optional[str] = None,
    inplace: bool = False,
) -> fx.GraphModule:
    """Give each decomposed layer a form: by default its factors only where they cost fewer MACs.

    The cost model runs on ``example_inputs``; for each layer the MACs of ``first + core +
    last`` are compared with those of the original layer at the same output shape (paper
    section 3.4, eq. 10-11). Where the factors are not cheaper, their product is put back as
    one dense layer under the original target and node name. Either way the decision and both
    costs go into the layer's record (``fxtucker.report``) and onto the nodes' metadata, so the
    model's MACs never go up.

    ``plan`` applies the forms given (layer name -> form, as :func:`plan_forms` returns them,
    possibly edited) and decides nothing: ``"dense"``, ``"tucker2"`` (``"svd"`` for an SVD pair),
    ``"merge_first"`` (first multiplied into the core), ``"merge_last"`` (last into the core),
    each possibly with ``"+linear"`` (its pointwise convs as ``nn.Linear`` between permutes,
    :func:`pointwise_as_linear`). Every form computes the same function up to float rounding.
    Without ``example_inputs`` the forms are given to the structure alone (no MACs recorded).

    With ``cost="latency"`` the plan is :func:`plan_forms`'s on the back end: each layer's forms
    are timed at its real input shape(s) on ``backend`` / ``device`` / ``threads`` and the fastest
    kept (traded for fewer MACs under ``max_macs``; ``search="model"`` also times whole models
    with candidate form sets). Timings are cached (``fxtucker.latency.cache_dir() /
    "latency.json"``); the form, where it was timed and every candidate's time go into the
    layer's record (``form``, ``timed_on``, ``timings_ms``) and the reason column of
    :func:`fxtucker.report`.

    Args:
        gm: output of :func:`strip_gates` (or of :func:`decompose_conv`); no gates may remain.
        example_inputs: one batch of ``gm``'s positional inputs, for the cost model.
        plan: the form of every decomposed layer; None decides by ``cost``.
        cost: ``"macs"`` (the paper's rule, the default) or ``"latency"``.
        backend: for ``cost="latency"``: ``"eager"`` (default), ``"compile"``, ``"compile-freezing"`` or ``"onnxruntime"``.
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
        >>> mine = fold_or_restore(decomposed, x, plan={"conv1": "merge_last", "fc": "dense"})
    """
    if plan is not None:
        given = {k: v for k, v in dict(backend=backend, device=device, threads=threads, max_macs=max_macs,
                                       search=search).items() if v is not None}
        if cost != "macs" or given:
            raise ValueError(f"fold_or_restore: plan= applies the forms given and decides nothing, so "
                             f"{sorted(given) or ['cost']} cannot apply; pass them to plan_forms(gm, x, ...) instead")
        if not isinstance(plan, dict):
            raise TypeError(f"fold_or_restore: plan must be a dict layer name -> form, got {type(plan).__name__}")
    else:
        check_options("fold_or_restore", cost, backend, device, threads, max_macs, search)
        if not example_inputs:
            raise TypeError("fold_or_restore needs example_inputs (one batch of the model's inputs) for the cost "
                            "model; only plan= applies forms without them")
    gm = prepare(gm, inplace, "fold_or_restore")
    by_source = decomposed_layers(gm, "fold_or_restore")
    check_factors(by_source, "fold_or_restore(cost='latency')" if cost == "latency" else "fold_or_restore")
    specs = layer_specs(gm, by_source)
    if example_inputs:
        cost_model(gm, *example_inputs)
    if plan is None and cost == "macs":
        plan = {s: form for s, (form, _, _) in macs_plan(gm, by_source, specs).items()}
        return _apply(gm, by_source, specs, plan, example_inputs, by_macs=True)
    if plan is None:
        plan = plan_forms(gm, *example_inputs, cost="latency", backend=backend, device=device, threads=threads,
                          max_macs=max_macs, search=search)
    return _apply(gm, by_source, specs, dict(plan), example_inputs, by_macs=False)


def _chains(gm: fx.GraphModule, by_source: dict, specs: dict, plan: dict[str, str],
            measured: bool) -> dict[str, list[nn.Module]]:
    """Each layer's chain of modules for its form in ``plan``; an error for a plan that does not fit."""
    unknown, missing = sorted(set(plan) - set(by_source)), sorted(set(by_source) - set(plan))
    if unknown:
        raise ValueError(f"the plan names {unknown}, which are not decomposed layers of the model; the decomposed "
                         f"ones are {sorted(by_source)}")
    if missing:
        raise ValueError(f"the plan has no form for {missing}: give every decomposed layer a form "
                         f"(plan_forms(gm, x) returns a whole plan)")
    chains = {}
    for source, form in plan.items():
        container = gm.get_submodule(source)
        valid = base_forms(container)
        base = form.removesuffix(LINEAR) if isinstance(form, str) else None
        if base not in valid:
            raise ValueError(f"the plan gives {source!r} the form {form!r}, which its factors do not have; valid: "
                             f"{list(valid)}, each with '+linear' where it has a pointwise conv")
        chains[source] = build_form(container, specs.get(source), base)
        if form.endswith(LINEAR):
            if not any(is_pointwise(m) for m in chains[source]):
                raise ValueError(f"the plan gives {source!r} the form {form!r}, but its {base} form has no pointwise "
                                 f"conv (1x1, stride 1, no padding, groups 1) to run as nn.Linear; use {base!r}")
            if measured and not batched(gm, by_source[source], specs.get(source)):
                raise ValueError(f"the plan gives {source!r} the form {form!r}, but the layer gets an unbatched input "
                                 f"and the '+linear' permutes need a batch dimension; use {base!r}")
    return chains


def _apply(gm: fx.GraphModule, by_source: dict, specs: dict, plan: dict[str, str], example_inputs: tuple, *,
           by_macs: bool) -> fx.GraphModule:
    """Rewrite each decomposed layer of ``gm`` (in place) to its form in ``plan``; records on the nodes
    and layers (``by_macs``: the reasons and records of the MACs rule, no form recorded)."""
    measured = bool(example_inputs)
    chains = _chains(gm, by_source, specs, plan, measured)
    before, factors, after = {}, {}, {}
    if measured:
        for source, roles in by_source.items():
            factors[source] = sum(n.meta[MACS] for role in (FIRST, CORE, LAST) for n in roles.get(role, []))
            before[source] = sum(original_macs(roles[LAST], specs.get(source), in_features(gm.get_submodule(source))))
    kept = {source: give_form(gm, source, roles, plan[source], chains[source]) for source, roles in by_source.items()}
    gm = finish(gm)
    if measured:
        cost_model(gm, *example_inputs)  # merged forms have new shapes: annotate the model afresh
        after = {source: sum(n.meta[MACS] for n in nodes) for source, nodes in kept.items()}
    record = graph_record(gm)
    layers = {r.name: r for r in record.layers}
    planned = record.stage == "plan_forms"  # plan_forms wrote each layer's timing reason
    for source, nodes in kept.items():
        form, rec = plan[source], layers[source]
        if form.removesuffix(LINEAR) == DENSE:
            fold = FoldRecord(source=source, decision=RESTORED, macs_original=before.get(source),
                              macs_decomposed=factors.get(source))
            if not by_macs:
                fold = dataclasses.replace(fold, form=form, timed_on=rec.timed_on, timings_ms=rec.timings_ms)
            for node in nodes:
                node.meta[KEY] = fold
        else:
            for node in nodes:
                node.meta[KEY] = dataclasses.replace(node.meta[KEY], decision=DECOMPOSED, macs_original=before.get(source),
                                                     macs_decomposed=after.get(source))
    out = []
    for r in record.layers:
        if r.name in plan:
            form = plan[r.name]
            decision = RESTORED if form.removesuffix(LINEAR) == DENSE else DECOMPOSED
            changes: dict[str, Any] = dict(decision=decision, reason=_reason(r, form, planned, by_macs, before.get(r.name),
                                                                             factors.get(r.name), after.get(r.name)))
            if measured:
                changes.update(macs_before=before[r.name], macs_after=after[r.name])
            if not by_macs:
                changes.update(form=form)
            r = dataclasses.replace(r, **changes)
        out.append(r)
    set_graph_record(gm, dataclasses.replace(record, layers=tuple(out), stage="fold_or_restore"))
    return keep_memory_format(gm)  # the forms' new modules in the model's format too


def _reason(r: LayerRecord, form: str, planned: bool, by_macs: bool, before: Optional[int], factors: Optional[int],
            after: Optional[int]) -> str:
    """The report's reason for giving layer ``r`` its ``form``."""
    reason = _form_reason(r, form, planned, by_macs, before, factors, after)
    if r.functional and form.removesuffix(LINEAR) == DENSE:
        reason += (f"; the functional {r.op}() call (node {r.node!r}) is now nn.{r.spec.cls_name} module {r.name!r} "
                   f"with that kernel")
    return reason


def _form_reason(r: LayerRecord, form: str, planned: bool, by_macs: bool, before: Optional[int],
                 factors: Optional[int], after: Optional[int]) -> str:
    if by_macs:
        if form == DENSE:
            return f"factors would cost {factors:,} MACs >= {before:,} of the original; dense kernel rebuilt"
        return f"factors cost {after:,} MACs < {before:,} of the original"
    macs = "" if before is None else f"; {after:,} MACs vs {before:,} of the original"
    if planned and r.form == form and r.timed_on:
        return f"{r.reason}{macs}"
    timings = dict(r.timings_ms)
    if form in timings:
        others = ", ".join(f"{f} {ms:.3f}" for f, ms in timings.items() if f != form)
        return f"given by the plan on {r.timed_on}: {form} {timings[form]:.3f} ms ({others}){macs}"
    return f"given by the plan{macs}"
