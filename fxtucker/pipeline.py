"""The pass chain, composed in one place.

A :class:`Pipeline` is a named sequence of passes, each a ``GraphModule -> GraphModule`` callable
run in place on the pipeline's own copy, in the spirit of ``torch.fx.passes.infra.PassManager``.
The builders below are the only places fxtucker writes its chain out:

- :func:`decomposition` and :func:`pruning`: steps 1 and 4 of :func:`fxtucker.compress` (the
  gated model is trained between them);
- :func:`deployment`: :func:`fxtucker.optimize_for_inference`;
- :func:`replay`: loading a manifest (:func:`fxtucker.load`) replays the recorded plan.

``print(pipeline)`` shows the steps::

    >>> print(decomposition(torch.randn(1, 1, 28, 28), ranks=1.0))
    Pipeline(cost_model -> decompose_conv -> insert_gates -> cost_model)
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Iterator, Optional, Sequence

import torch.fx as fx
import torch.nn as nn

from fxtucker.meta import KEY, LayerPlan, LayerRecord, graph_record
from fxtucker.passes.cost_model import cost_model
from fxtucker.passes.decompose_conv import RanksArg, decompose_conv, plan_decomposition
from fxtucker.passes.fold_bn import fold_bn
from fxtucker.passes.fold_or_restore import fold_or_restore, recorded_forms
from fxtucker.passes.insert_gates import insert_gates
from fxtucker.passes.memory_format import MEMORY_FORMATS, choose_memory_format, set_memory_format
from fxtucker.passes.strip_gates import built_ranks, strip_gates

__all__ = ["Step", "Pipeline", "decomposition", "pruning", "deployment", "replay"]

Pass = Callable[[fx.GraphModule], fx.GraphModule]


@dataclass(frozen=True)
class Step:
    """One pass of a pipeline: its name (for ``print``) and the callable, which works in place."""

    name: str
    run: Pass


class Pipeline:
    """Passes applied in order: ``pipeline(gm)`` returns the last pass's GraphModule.

    The first pass gets ``gm`` itself, so the caller hands over a GraphModule it owns (every
    builder here uses the passes with ``inplace=True``: one graph is rewritten step by step).
    """

    def __init__(self, steps: Iterable[Step]):
        self.steps: tuple[Step, ...] = tuple(steps)
        for s in self.steps:
            if not isinstance(s, Step):
                raise TypeError(f"a Pipeline holds Step(name, run) items, got {type(s).__name__}")

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        if not isinstance(gm, fx.GraphModule):
            raise TypeError(f"a Pipeline runs on a torch.fx.GraphModule (see fxtucker.trace), got {type(gm).__name__}")
        for step in self.steps:
            out = step.run(gm)
            if not isinstance(out, fx.GraphModule):
                raise TypeError(f"pipeline step {step.name!r} returned {type(out).__name__}, not a GraphModule")
            gm = out
        return gm

    def __add__(self, other: "Pipeline") -> "Pipeline":
        return Pipeline(self.steps + other.steps)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def __repr__(self) -> str:
        return f"Pipeline({' -> '.join(self.names) or 'nothing'})"


def _step(fn: Callable[..., fx.GraphModule], *args: Any, **kwargs: Any) -> Step:
    """``fn(gm, *args, **kwargs)`` as a step named after ``fn``."""
    return Step(fn.__name__, functools.partial(_call, fn, args, kwargs))


def _call(fn: Callable[..., fx.GraphModule], args: tuple, kwargs: dict, gm: fx.GraphModule) -> fx.GraphModule:
    return fn(gm, *args, **kwargs)


def _measure(inputs: Sequence[Any]) -> Step:
    return _step(cost_model, *inputs)


def decomposition(example_inputs: Sequence[Any], *, ranks: RanksArg = 1.0, method: str = "tucker2",
                  linear: bool = False, round_to: Optional[int] = None, gated: bool = True,
                  pointwise: bool = True) -> Pipeline:
    """Step 1 of the flow: annotate MACs, decompose every layer it can at ``ranks`` (1x1 convs only
    with ``pointwise``), and (``gated``) write each component as gate x unit direction, MACs
    annotated again for the budget."""
    steps = [_measure(example_inputs),
             _step(decompose_conv, ranks, method=method, linear=linear, round_to=round_to, pointwise=pointwise,
                   inplace=True)]
    if gated:
        steps += [_step(insert_gates, inplace=True), _measure(example_inputs)]
    return Pipeline(steps)


def pruning(example_inputs: Sequence[Any], threshold: float, *, round_to: Optional[int] = None,
            relative: bool = False, rank_floor: float = 0.0) -> Pipeline:
    """After step 3: drop the components whose gate is below ``threshold`` (keeping ``rank_floor``
    of each mode, see :func:`strip_gates`), fold the surviving gates into the weights, and keep
    each decomposition only where it costs fewer MACs."""
    return Pipeline([_step(strip_gates, threshold, round_to, relative=relative, rank_floor=rank_floor, inplace=True),
                     _step(fold_or_restore, *example_inputs, inplace=True)])


def deployment(example_inputs: Sequence[Any], *, ranks: RanksArg = None, decomposed: bool = False,
               method: str = "tucker2", linear: bool = False, round_to: Optional[int] = None,
               backend: str = "eager", device: str = "cpu", threads: Optional[int] = None,
               max_macs: Optional[int] = None, search: str = "layer", memory_format: str = "auto",
               pointwise: bool = True) -> Pipeline:
    """:func:`fxtucker.optimize_for_inference`'s chain: fold BatchNorm, annotate MACs, decompose at
    ``ranks`` (None: nothing), give each decomposed layer (new, or ``decomposed`` already) the
    form that runs fastest on ``backend``, and store the weights in ``memory_format`` ("auto": the
    faster format by timing on the eager back end, the default one on the others)."""
    steps = [_step(fold_bn, inplace=True), _measure(example_inputs)]
    if ranks is not None:
        steps.append(_step(decompose_conv, ranks, method=method, linear=linear, round_to=round_to, pointwise=pointwise,
                           inplace=True))
    if memory_format not in ("auto", *MEMORY_FORMATS):
        raise ValueError(f"memory_format {memory_format!r} is not known; valid: {['auto', *MEMORY_FORMATS]}")
    timed = memory_format == "auto" and backend == "eager"
    if timed:
        fmt = [_step(choose_memory_format, *example_inputs, backend=backend, device=device, threads=threads,
                     inplace=True)]
    elif memory_format == "auto":  # inductor lays tensors out itself; an exported graph does not see strides
        fmt = [_step(set_memory_format, "contiguous", inplace=True, reason=f"auto: the default format on {backend}")]
    else:  # channels-last is refused where the model does not run in it
        fmt = [_step(set_memory_format, memory_format, *example_inputs, inplace=True)]
    if ranks is not None or decomposed:
        # The forms are timed in the format the weights are in (chosen on the factors' model); fold_or_restore
        # keeps it for the modules it builds, and a timed format is timed again on the model with its forms.
        steps += fmt + [_step(fold_or_restore, *example_inputs, cost="latency", backend=backend, device=device,
                              threads=threads, max_macs=max_macs, search=search, inplace=True)] + (fmt if timed else [])
    else:
        steps += fmt
    return Pipeline(steps)


def replay(layers: Sequence[LayerRecord], nodes: Collection[str]) -> Pipeline:
    """Loading a manifest (:func:`fxtucker.load`): the passes again, on a fresh trace of the original
    architecture, with the plan the records of the exported model hold.

    ``layers`` are its layer records, ``nodes`` its graph's node names. Every layer fold_or_restore
    decided (or decompose_conv decomposed) is decomposed with its recorded kind and ranks (a whole
    dead rank built as one component, :func:`fxtucker.passes.strip_gates.built_ranks`), the
    BatchNorm calls the exported graph no longer has are folded (``fold_bn(nodes=...)``: before the
    forms, as a "+linear" form's permute would stand between a conv and its BatchNorm), and each
    layer gets its recorded form (``fold_or_restore(plan=...)``). Shapes only: the weights come later.
    """
    forms = recorded_forms(layers)
    plans = {r.name: LayerPlan(source=r.name, kind=r.kind, full_ranks=r.full_ranks, ranks=built_ranks(r.ranks))
             for r in layers if r.name in forms}
    linear = any(r.op == "Linear" for r in layers if r.name in plans)
    exported = frozenset(nodes)

    def decompose(gm: fx.GraphModule) -> fx.GraphModule:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the summary of layers left alone; the records say which
            gm = plan_decomposition(gm, lambda name, m: None, linear=linear, inplace=True)
            # A plan's source is the layer name: a module's target, or the name plan_decomposition
            # gives a functional conv (the same on this trace as on the exported model's).
            planned = [n for n in gm.graph.nodes if isinstance(n.meta.get(KEY), LayerPlan)]
            sites = {n.meta[KEY].source for n in planned}
            unknown = sorted(set(plans) - sites)
            if unknown:
                raise ValueError(f"ranks names {unknown}, which are not {'conv or Linear' if linear else 'conv'} "
                                 f"modules called in the graph; known: {sorted(sites)}")
            for n in planned:
                if n.meta[KEY].source in plans:
                    n.meta[KEY] = plans[n.meta[KEY].source]
            return decompose_conv(gm, use_plan=True, inplace=True)

    def fold_batchnorms(gm: fx.GraphModule) -> fx.GraphModule:
        # The exported graph's node list says which BatchNorm calls fold_bn folded, whichever pass ran
        # after it.
        gone = [n.name for n in gm.graph.nodes if n.op == "call_module" and n.name not in exported
                and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]
        if not gone:
            return gm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = fold_bn(gm, nodes=gone, inplace=True)
        left = [b for b in graph_record(gm).batchnorms if b.node in gone and not b.folded]
        if left:
            raise ValueError(f"the exported graph has no BatchNorm node {left[0].node!r}, but here it cannot be "
                             f"folded ({left[0].reason})")
        return gm

    steps = [Step("decompose_conv", decompose)] if plans else []
    steps.append(Step("fold_bn", fold_batchnorms))
    if forms:
        steps.append(_step(fold_or_restore, plan=forms, inplace=True))
    return Pipeline(steps)
