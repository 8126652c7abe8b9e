"""Every ``node.meta`` / ``gm.meta`` key fxtucker uses, and the typed records stored there.

Records are frozen dataclasses of ints, strings and tuples: never tensors or modules, so a
GraphModule deep-copies and pickles as it did before fxtucker touched it.

Public keys on ``node.meta``:

- ``"macs"``: multiply-accumulates of the node for the example batch (bias excluded), an int.
- ``"params"``: parameters owned by the node's module (call_module) or read by it (get_attr).
- ``"tensor_meta"``: shape and dtype of the output, as :class:`torch.fx.passes.shape_prop.ShapeProp`
  writes it.

Everything else lives under ``node.meta["fxtucker"]`` (a :class:`FactorRecord` or a
:class:`LayerPlan`) and ``gm.meta["fxtucker"]`` (a :class:`GraphRecord`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch.fx as fx

__all__ = [
    "MACS",
    "PARAMS",
    "TENSOR_META",
    "KEY",
    "ConvSpec",
    "LayerPlan",
    "FactorRecord",
    "FoldRecord",
    "LayerRecord",
    "BatchNormRecord",
    "GraphRecord",
    "graph_record",
    "set_graph_record",
    "update_layer",
    "RECORDS",
    "RecordError",
    "to_json",
    "from_json",
]

MACS = "macs"
PARAMS = "params"
TENSOR_META = "tensor_meta"
KEY = "fxtucker"

# Roles of the nodes that decompose_conv and insert_gates create.
FIRST, CORE, LAST = "first", "core", "last"
GATE_IN, GATE_CORE, GATE_OUT = "gate_in", "gate_core", "gate_out"
FACTOR_ROLES = (FIRST, CORE, LAST)
GATE_ROLES = (GATE_IN, GATE_CORE, GATE_OUT)

# Decisions a layer can carry.
DECOMPOSED, RESTORED, SKIPPED = "decomposed", "restored", "skipped"
Padding = Union[str, tuple[int, ...]]
# The ``op`` of a functional conv's LayerRecord: the name of the function called.
CONV_FUNCTIONS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})


@dataclass(frozen=True)
class ConvSpec:
    """Everything needed to rebuild the original convolution module."""

    cls_name: str  # "Conv1d", "Conv2d" or "Conv3d"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Padding
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str

    @property
    def dims(self) -> int:
        return len(self.kernel_size)


@dataclass(frozen=True)
class LayerPlan:
    """decompose_conv's decision for one conv node, written before anything is rewritten.

    ``kind`` is ``"tucker2"`` (first/core/last), ``"svd"`` (first/last, for 1x1 kernels and
    Linear layers, and for kxk kernels with ``method="svd"``: then ``first`` is kxk) or
    ``"skip"`` with ``reason`` saying why. ``ranks`` are (R1, R2) for tucker2 and (R,) for svd;
    a user may edit a plan (``dataclasses.replace``) before the rewrite runs.
    """

    source: str
    kind: str
    full_ranks: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class FactorRecord:
    """Stored on every node that fxtucker creates: where it came from and what it is."""

    source: str  # qualified name of the replaced module
    role: str  # one of FACTOR_ROLES or GATE_ROLES
    ranks: tuple[int, ...]
    replaces: str = ""  # name of the graph node it replaces (restore puts it back)
    decision: str = ""  # set by fold_or_restore
    macs_original: Optional[int] = None
    macs_decomposed: Optional[int] = None


@dataclass(frozen=True)
class FoldRecord:
    """Stored on a layer that fold_or_restore put back as one dense module."""

    source: str
    decision: str
    macs_original: Optional[int]  # None where fold_or_restore gave a plan's forms without example inputs
    macs_decomposed: Optional[int]
    # Set by fold_or_restore from a form plan (cost="latency", or plan=): the form kept ("dense", "tucker2",
    # "merge_first", "merge_last" or "svd", each possibly with "+linear"), where it was timed
    # ("eager/cpu/2 threads") and each form's time (by plan_forms).
    form: str = ""
    timed_on: str = ""
    timings_ms: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class LayerRecord:
    """One row of the report: a conv or linear layer that decompose_conv looked at."""

    # qualified module name; a functional conv's: "<module holding its weight>.<node name>" (see
    # decompose_conv), or the node name where its weight is computed in forward
    name: str
    node: str  # graph node name of the original call
    op: str  # "Conv2d", "Linear", ...
    kind: str  # "tucker2", "svd" (first/last; first is kxk for a kxk conv) or "skip"
    spec: Optional[ConvSpec] = None  # None for Linear and skipped layers
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    full_ranks: tuple[int, ...] = ()
    ranks: tuple[int, ...] = ()
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    decision: str = SKIPPED
    reason: str = ""
    call_sites: int = 1
    # Set by plan_forms(cost="latency") and fold_or_restore, as in FoldRecord: the form kept, where
    # each candidate form was timed, and its time (ms, summed over the call sites).
    form: str = ""
    timed_on: str = ""
    timings_ms: tuple[tuple[str, float], ...] = ()

    @property
    def functional(self) -> bool:
        """Whether the layer is a functional ``F.conv*`` call (``op`` is then the function's name;
        once decomposed, ``spec.cls_name`` is the module its dense form is), not a module."""
        return self.op in CONV_FUNCTIONS


@dataclass(frozen=True)
class BatchNormRecord:
    """fold_bn's decision for one BatchNorm call: folded into ``conv`` or skipped with ``reason``."""

    name: str  # qualified name of the BatchNorm module
    node: str  # graph node name of the BatchNorm call (gone from the graph once folded)
    conv: str = ""  # qualified name of the conv it was folded into ("" when skipped)
    folded: bool = False
    reason: str = ""


@dataclass(frozen=True)
class GraphRecord:
    """``gm.meta["fxtucker"]``: the per-layer history of a GraphModule through the chain."""

    layers: tuple[LayerRecord, ...] = ()
    stage: str = ""  # the last pass that ran
    batchnorms: tuple[BatchNormRecord, ...] = ()  # written by fold_bn
    # Written by choose_memory_format / set_memory_format: the format the 4-D weights are stored in
    # ("contiguous" or "channels_last"), and why.
    memory_format: str = "contiguous"
    memory_format_reason: str = ""

    def layer(self, name: str) -> LayerRecord:
        for rec in self.layers:
            if rec.name == name:
                return rec
        raise KeyError(f"no layer {name!r} in the fxtucker record; known: {[r.name for r in self.layers]}")


def graph_record(gm: fx.GraphModule) -> GraphRecord:
    """The GraphRecord of ``gm`` (an empty one if no fxtucker pass ran)."""
    rec = getattr(gm, "meta", {}).get(KEY)
    return rec if isinstance(rec, GraphRecord) else GraphRecord()


def set_graph_record(gm: fx.GraphModule, rec: GraphRecord) -> None:
    gm.meta[KEY] = rec


def update_layer(gm: fx.GraphModule, name: str, **changes) -> None:
    """Replace fields of one LayerRecord in ``gm.meta``."""
    rec = graph_record(gm)
    layers = tuple(dataclasses.replace(r, **changes) if r.name == name else r for r in rec.layers)
    set_graph_record(gm, dataclasses.replace(rec, layers=layers))


def factor_record(node: fx.Node) -> Optional[FactorRecord]:
    """The FactorRecord of ``node``, or None for nodes fxtucker did not create."""
    rec = node.meta.get(KEY)
    return rec if isinstance(rec, FactorRecord) else None


# --- records as JSON: derived from the dataclasses' own fields and types ---

#: Every record type fxtucker stores, by class name (the ``"type"`` of a record written as JSON).
RECORDS: dict[str, type] = {cls.__name__: cls for cls in (ConvSpec, LayerPlan, FactorRecord, FoldRecord, LayerRecord,
                                                           BatchNormRecord, GraphRecord)}


class RecordError(ValueError):
    """A JSON value that is not the record it should be; the message names where (``layers[1].ranks``)."""


def to_json(value: Any) -> Any:
    """A record (any dataclass), tuple, list or dict as JSON values: fields in declaration order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value


def _expect(value: Any, types: tuple, where: str) -> Any:
    """``value`` if it is one of ``types`` (a bool is no int here), else RecordError."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # True is an int
        names = " or ".join(t.__name__ for t in types)
        raise RecordError(f"{where} must be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _typed(hint: Any, value: Any, where: str) -> Any:
    """``value`` read as type ``hint`` (a field's annotation): ints >= 0 inside tuples (ranks, shapes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _typed(options[0], value, where)
        if isinstance(value, str) and str in options:  # Padding: "same" or a tuple
            return value
        return _typed(next(a for a in options if a is not str), value, where)
    if origin is tuple:
        _expect(value, (list,), where)
        if len(args) == 2 and args[1] is Ellipsis:
            out = tuple(_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
            if args[0] is int:
                for i, v in enumerate(out):
                    if v < 0:
                        raise RecordError(f"{where}[{i}] is {v}; it must be >= 0 (a rank or size cannot be negative)")
            return out
        if len(value) != len(args):
            raise RecordError(f"{where} must have {len(args)} items, got {len(value)}")
        return tuple(_typed(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(hint):
        return from_json(hint, value, where)
    if hint is float:
        return float(_expect(value, (int, float), where))
    if hint in (int, str, bool):
        return _expect(value, (hint,), where)
    raise TypeError(f"{where}: no JSON form for a field of type {hint!r}")  # a record type this module lacks


def from_json(cls: type, value: Any, where: str = "the record") -> Any:
    """The record ``cls`` from its JSON form (:func:`to_json`), every field checked against its type.

    Unknown keys and missing required keys are refused; RecordError names the first problem.
    """
    _expect(value, (dict,), where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise RecordError(f"{where} has unknown key(s) {unknown}; a {cls.__name__} has {sorted(fields)}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = sorted(set(required) - set(value))
    if missing:
        raise RecordError(f"{where} lacks the key(s) {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _typed(hints[k], v, f"{where}.{k}") for k, v in value.items()})
