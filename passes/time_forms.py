"""plan_forms: decide each decomposed layer's form, by MACs or by timing its forms on a back end.

An analysis pass: it rewrites nothing. It returns the form plan (layer name -> form string such as
``"dense"``, ``"tucker2"``, ``"merge_first+linear"``), which a user may read and edit before
``fold_or_restore(gm, x, plan=...)`` applies it, and with ``cost="latency"`` writes where and how
fast every candidate form ran into the layer records (``form``, ``timed_on``, ``timings_ms``,
``reason``).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker.latency import TimingCache, check_backend, check_device, measure_latency
from fxtucker.meta import CORE, FIRST, LAST, MACS, TENSOR_META, graph_record, set_graph_record
from fxtucker.passes._common import finish, layer_nodes, model_digest
from fxtucker.passes.cost_model import conv_macs, cost_model
from fxtucker.passes.memory_format import CHANNELS_LAST, CONTIGUOUS, model_to_channels_last
from fxtucker.passes.forms import (DENSE, LINEAR, ChannelsLinear, batched, build_form, candidate_forms,
                                   check_factors, decomposed_layers, give_form, is_pointwise, layer_specs, macs_plan,
                                   with_linear)

__all__ = ["plan_forms", "check_options", "time_chain", "COSTS", "SEARCHES"]

COSTS = ("macs", "latency")
SEARCHES = ("layer", "model")


def check_options(who: str, cost: str, backend: Optional[str], device: Optional[str], threads: Optional[int],
                  max_macs: Optional[int], search: Optional[str]) -> None:
    """The errors for a form-planning call's arguments, naming ``who`` was called."""
    if cost not in COSTS:
        raise ValueError(f"cost {cost!r} is not known to {who}; valid: {list(COSTS)}")
    if cost == "macs":
        given = {k: v for k, v in dict(backend=backend, device=device, threads=threads, max_macs=max_macs,
                                       search=search).items() if v is not None}
        if given:
            raise ValueError(f"{who}: {sorted(given)} apply to cost='latency' only; cost='macs' decides by "
                             f"MACs alone")
        return
    check_backend(backend or "eager", who)
    check_device(device or "cpu", who)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None (torch's current setting), got {threads!r}")
    if max_macs is not None and (isinstance(max_macs, bool) or not isinstance(max_macs, int) or max_macs <= 0):
        raise ValueError(f"max_macs must be a positive int (the whole model's MACs) or None, got {max_macs!r}")
    if search is not None and search not in SEARCHES:
        raise ValueError(f"search {search!r} is not known to {who}; valid: {list(SEARCHES)} (each layer's "
                         f"fastest form, or also whole models timed with candidate form sets)")


def plan_forms(
    gm: fx.GraphModule,
    *example_inputs: Any,
    cost: str = "macs",
    backend: Optional[str] = None,
    device: Optional[str] = None,
    threads: Optional[int] = None,
    max_macs: Optional[int] = None,
    search: Optional[str] = None,
    linear: Optional[bool] = None,
) -> dict[str, str]:
    """The form each decomposed layer of ``gm`` should take: a plan to read, edit and apply.

    ``cost="macs"`` (the default) is the paper's rule (section 3.4): the factors' form
    (``"tucker2"`` or ``"svd"``) where they cost fewer MACs than the original layer, else
    ``"dense"``. ``cost="latency"`` times each layer's candidate forms (``"dense"``, ``"tucker2"``
    or ``"svd"``, ``"merge_first"``, ``"merge_last"``, each with ``"+linear"`` where it has
    pointwise convs) at the layer's real input shape(s) on ``backend`` / ``device`` / ``threads``
    (:func:`fxtucker.latency.measure_latency`) and keeps the fastest; with ``max_macs`` the
    fastest forms are traded, least time lost per MAC saved first, for forms with fewer MACs until
    the whole model fits; with ``search="model"`` a few whole models with candidate form sets are
    also timed (side by side, 3 rounds) and the fastest set kept. Timings are cached in
    ``fxtucker.latency.cache_dir() / "latency.json"``, so a second run times nothing.

    ``gm`` is annotated in place: the cost model's ``node.meta`` and, for ``cost="latency"``,
    each layer record's ``form``, ``timed_on``, ``timings_ms`` and ``reason`` (stage
    ``"plan_forms"``). Nothing is rewritten.

    Args:
        gm: output of :func:`strip_gates` (or of :func:`decompose_conv`); no gates may remain.
        example_inputs: one batch of ``gm``'s positional inputs.
        cost: ``"macs"`` or ``"latency"``.
        backend, device, threads, max_macs, search: for ``cost="latency"``, as in
            :func:`fold_or_restore`.
        linear: offer the ``"+linear"`` forms (default: for ``cost="latency"`` only; with
            ``cost="macs"``, True gives each form with a pointwise conv its ``"+linear"`` variant,
            at the same MACs).

    Returns:
        ``{layer name: form}`` for every decomposed layer, for ``fold_or_restore(gm, x, plan=...)``.

    Example::

        >>> plan = plan_forms(stripped, x, cost="latency", backend="compile")
        >>> plan["layer1.0.conv1"] = "dense"
        >>> final = fold_or_restore(stripped, x, plan=plan)
    """
    check_options("plan_forms", cost, backend, device, threads, max_macs, search)
    if linear is not None and not isinstance(linear, bool):
        raise TypeError(f"plan_forms: linear must be True, False or None, got {linear!r}")
    by_source = decomposed_layers(gm, "plan_forms")
    check_factors(by_source, "plan_forms")
    specs = layer_specs(gm, by_source)
    cost_model(gm, *example_inputs)
    if cost == "macs":
        plan = {s: form for s, (form, _, _) in macs_plan(gm, by_source, specs).items()}
        if linear:
            for s, form in plan.items():
                container = gm.get_submodule(s)
                if batched(gm, by_source[s], specs.get(s)) and any(
                        is_pointwise(m) for m in build_form(container, specs.get(s), form)):
                    plan[s] = form + LINEAR
        return plan
    total_macs = sum(n.meta[MACS] for n in gm.graph.nodes if n.op != "output")
    timed = _Timed(gm, {}, {}, total_macs, backend or "eager", device or "cpu", threads, TimingCache())
    return _by_latency(timed, example_inputs, by_source, specs, max_macs, search or "layer", linear is not False)


@dataclasses.dataclass
class _Timed:
    """The model, where its forms are timed, and what was timed so far: ``forms[layer][form]`` a chain,
    ``costs[layer][form]`` (ms, MACs); ``other_macs`` counts every node but the layers' factors."""

    gm: fx.GraphModule
    forms: dict[str, dict[str, list[nn.Module]]]
    costs: dict[str, dict[str, tuple[float, int]]]
    other_macs: int
    backend: str
    device: str
    threads: Optional[int]
    cache: TimingCache
    memory_format: str = CONTIGUOUS  # the model's (GraphRecord.memory_format): forms are timed in it

    def trial(self, choice: dict[str, str]) -> fx.GraphModule:
        """A copy of the model with every layer in its form in ``choice`` (the model is left as it is),
        its weights in the model's memory format (the forms' new modules come in the default one)."""
        trial = copy.deepcopy(self.gm)
        for source, roles in layer_nodes(trial).items():
            give_form(trial, source, roles, choice[source], self.forms[source][choice[source].removesuffix(LINEAR)])
        if self.memory_format == CHANNELS_LAST:
            model_to_channels_last(trial)
        return finish(trial)


def _by_latency(t: _Timed, example_inputs: tuple, by_source: dict, specs: dict, max_macs: Optional[int],
                search: str, linear: bool) -> dict[str, str]:
    """plan_forms(cost="latency"), with ``t`` holding the model and where to time: see its docstring."""
    gm, backend, device, threads = t.gm, t.backend, t.device, t.threads
    t.memory_format = graph_record(gm).memory_format
    threads_used = threads if threads is not None else torch.get_num_threads()
    timed_on = (f"{backend}/{device}/{threads_used} thread{'s' if threads_used != 1 else ''}"
                + (", channels-last" if t.memory_format == CHANNELS_LAST else ""))
    for source, roles in by_source.items():
        container = gm.get_submodule(source)
        forms = with_linear(candidate_forms(container, specs.get(source)),
                            linear and batched(gm, roles, specs.get(source)))
        t.forms[source] = forms
        t.other_macs -= sum(n.meta[MACS] for role in (FIRST, CORE, LAST) for n in roles.get(role, []))
        t.costs[source] = {f: (0.0, 0) for f in forms}
        for first in roles[FIRST]:
            meta = first.args[0].meta[TENSOR_META]
            x = torch.randn(tuple(meta.shape), dtype=meta.dtype, device=container[FIRST].weight.device)
            for f, chain in forms.items():
                ms, macs = t.costs[source][f]
                t.costs[source][f] = (ms + time_chain(chain, x, backend, device, threads, t.cache, t.memory_format),
                                      macs + _chain_macs(chain, x))
    broken = _linear_breaks(t, example_inputs)
    if broken:
        warnings.warn(f"plan_forms: the '+linear' forms are not used: the model does not run with them "
                      f"({broken}); each of them leaves a channels-last tensor, which a later .view() cannot take",
                      stacklevel=3)
        t.costs = {s: {f: c for f, c in fs.items() if not f.endswith(LINEAR)} for s, fs in t.costs.items()}
        t.forms = {s: {f: c for f, c in fs.items() if not f.endswith(LINEAR)} for s, fs in t.forms.items()}
    choice, forced = _choose(t.costs, t.other_macs, max_macs)
    whys = {s: "fastest within max_macs" if s in forced else "fastest" for s in choice}
    if search == "model":
        kept, why = _search_model(t, example_inputs, choice, max_macs)
        whys.update({s: why for s in choice if kept[s] != choice[s]})
        choice = kept
    record = graph_record(gm)
    layers = []
    for r in record.layers:
        if r.name in choice:
            form = choice[r.name]
            timings = tuple((f, round(ms, 4)) for f, (ms, _) in t.costs[r.name].items())
            others = ", ".join(f"{f} {ms:.3f}" for f, ms in timings if f != form)
            reason = f"{whys[r.name]} on {timed_on}: {form} {dict(timings)[form]:.3f} ms ({others})"
            r = dataclasses.replace(r, form=form, timed_on=timed_on, timings_ms=timings, reason=reason)
        layers.append(r)
    set_graph_record(gm, dataclasses.replace(record, layers=tuple(layers), stage="plan_forms"))
    return choice


def _linear_breaks(t: _Timed, example_inputs: tuple) -> str:
    """Why the model does not run with every layer in a "+linear" form ("" if it does, or none has one).

    The output permute leaves a channels-last tensor; an op that needs a contiguous one (``.view``)
    fails. One trial run with each layer's fastest "+linear" form tells."""
    trial_choice = {}
    for s, fs in t.costs.items():
        linear = [f for f in fs if f.endswith(LINEAR)]
        trial_choice[s] = min(linear or fs, key=lambda f: fs[f])
    if not any(f.endswith(LINEAR) for f in trial_choice.values()):
        return ""
    trial = t.trial(trial_choice)
    try:
        with torch.no_grad():
            trial(*(x.clone() if isinstance(x, torch.Tensor) else x for x in example_inputs))
    except Exception as exc:  # noqa: BLE001 - any failure means: not with these forms
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return ""


def _module_key(m: nn.Module) -> list:
    """What a module's speed depends on (its class and shape, not its weights), for the timing cache."""
    if isinstance(m, ChannelsLinear):
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
            if isinstance(m, (nn.Linear, ChannelsLinear)):
                macs += x.numel() * getattr(m, "linear", m).in_features
            else:
                macs += conv_macs(x.numel(), m.in_channels // m.groups, m.kernel_size)
    return macs


def time_chain(chain: list[nn.Module], x: torch.Tensor, backend: str, device: str, threads: Optional[int],
               cache: TimingCache, memory_format: str = CONTIGUOUS) -> float:
    """Latency of running ``chain`` on ``x`` in ms, from ``cache`` when this shape was timed before;
    with ``memory_format="channels_last"`` the chain's 4-D weights and ``x`` are in that format, as
    they are inside a model whose weights are (:func:`~fxtucker.passes.choose_memory_format`)."""
    extra = {"memory_format": memory_format} if memory_format != CONTIGUOUS else {}  # the older keys stay valid
    key = TimingCache.key(backend, device, threads if threads is not None else torch.get_num_threads(),
                          what="fold_or_restore", input=list(x.shape), dtype=str(x.dtype),
                          modules=[_module_key(m) for m in chain], **extra)
    ms = cache.get(key)
    if ms is None:
        # A fresh GraphModule has its own generated forward: torch.compile caches per code object.
        module = fx.symbolic_trace(nn.Sequential(*[copy.deepcopy(m) for m in chain]).eval())
        if memory_format == CHANNELS_LAST and x.dim() == 4:
            model_to_channels_last(module)
            x = x.contiguous(memory_format=torch.channels_last)
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
            raise ValueError(f"max_macs={max_macs:,} cannot be met: the cheapest form of every layer still leaves "
                             f"{least:,} MACs; raise max_macs or decompose at lower ranks")
        _, s, f = min(moves)
        choice[s] = f
        forced.add(s)
    return choice, forced


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


def _search_model(t: _Timed, example_inputs: tuple, choice: dict[str, str], max_macs: Optional[int],
                  rounds: int = 3) -> tuple[dict, str]:
    """The fastest whole model among the candidate form sets, timed side by side (``rounds`` rounds,
    alternating, the median kept; cached by the model's code and modules). Returns its form per
    layer and the reason for the layers where it differs from ``choice``."""
    trials, keys = {}, {}
    threads = t.threads if t.threads is not None else torch.get_num_threads()
    for name, c in _candidates(t.costs, choice, t.other_macs, max_macs).items():
        trials[name] = (c, t.trial(c))
        keys[name] = TimingCache.key(t.backend, t.device, threads, what="fold_or_restore/model",
                                     model=model_digest(trials[name][1]),
                                     inputs=[[list(x.shape), str(x.dtype)] if isinstance(x, torch.Tensor) else repr(x)
                                             for x in example_inputs],
                                     **({"memory_format": t.memory_format} if t.memory_format != CONTIGUOUS else {}))
    times = {name: t.cache.get(key) for name, key in keys.items()}
    # Timings of one sitting only are compared: if any is missing, every candidate is timed again.
    pending = list(keys) if any(ms is None for ms in times.values()) else []
    runs: dict[str, list[float]] = {name: [] for name in pending}
    for _ in range(rounds if pending else 0):
        for name in pending:
            runs[name].append(measure_latency(trials[name][1], example_inputs, backend=t.backend, device=t.device,
                                              threads=t.threads))
    for name in pending:
        times[name] = statistics.median(runs[name])
        t.cache.put(keys[name], times[name])
    best = min(times, key=times.get)
    timed = ", ".join(f"{name} {ms:.3f}" for name, ms in times.items() if name != best)
    why = f"in the fastest whole model, form set '{best}' {times[best]:.3f} ms ({timed})"
    return trials[best][0], why
