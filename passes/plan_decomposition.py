"""plan_decomposition: decide, without rewriting, how decompose_conv would decompose each conv.

For every conv (and Linear, with ``linear=True``) call, functional ``F.conv*d`` calls included, it
decides the kind (Tucker-2 or an SVD pair), the full and chosen ranks, or why the layer is
skipped, and writes that as a :class:`fxtucker.meta.LayerPlan` into ``node.meta``;
:func:`~fxtucker.passes.decompose_conv` applies the plans. The checks it makes (which modules and
functional convs can be decomposed, which ranks fit a layer) are public here, because
decompose_conv makes them again on an edited plan.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections import defaultdict
from typing import Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker import tucker
from fxtucker.meta import (
    CONV_FUNCTIONS,
    KEY,
    MACS,
    SKIPPED,
    TENSOR_META,
    ConvSpec,
    LayerPlan,
    LayerRecord,
    factor_record,
    graph_record,
    set_graph_record,
)
from fxtucker.passes._common import CONV_TYPES, check_round_to, prepare, round_rank, split_name
from fxtucker.tucker import compute_dtype

__all__ = ["plan_decomposition", "RanksArg", "Ranks", "METHODS", "check_method", "ParameterUses", "parameter_uses",
           "find_attr", "FunctionalConv", "functional_conv", "conv_spec", "unsupported_reason", "kinds", "full_ranks",
           "group_weights", "normalise_ranks", "NOT_SELECTED", "NOT_POINTWISE", "one_by_one"]

Ranks = Union[int, tuple[int, ...]]
RanksArg = Union[None, float, str, dict[str, Ranks], Callable[[str, nn.Module], Optional[Ranks]]]

# How a conv with a kernel larger than 1x1 is decomposed: Tucker-2 (first, core, last) or an SVD
# pair of the kernel reshaped to (C_out, C_in/g * k) (first: kxk, last: 1x1). 1x1 convs and
# Linear layers are SVD pairs under either.
METHODS = ("tucker2", "svd")

# F.conv1d/2d/3d's parameters in order, with their defaults (input and weight have none).
_CONV_ARGS = {"input": None, "weight": None, "bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@dataclasses.dataclass(frozen=True)
class ParameterUses:
    """Who uses each parameter of ``gm``: its names, the get_attr nodes that read it, the modules called."""

    names: dict[int, list[str]]  # id(parameter) -> every qualified name it has
    reads: dict[int, list[fx.Node]]  # id(parameter) -> the get_attr nodes that read it
    called: frozenset[str]  # targets of call_module nodes


def parameter_uses(gm: fx.GraphModule) -> ParameterUses:
    """The names, get_attr readers and calling modules of every parameter of ``gm``."""
    names: dict[int, list[str]] = defaultdict(list)
    for pname, p in gm.named_parameters(remove_duplicate=False):
        names[id(p)].append(pname)
    reads: dict[int, list[fx.Node]] = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            value = find_attr(gm, n.target)
            if isinstance(value, nn.Parameter):
                reads[id(value)].append(n)
    called = frozenset(n.target for n in gm.graph.nodes if n.op == "call_module")
    return ParameterUses(dict(names), dict(reads), called)


def find_attr(gm: nn.Module, target: str) -> object:
    """The attribute at qualified name ``target``, or None."""
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _conv_args(node: fx.Node) -> dict[str, object]:
    """A functional conv call's arguments by name, positional or keyword, defaults filled in."""
    values = dict(_CONV_ARGS)
    values.update(zip(_CONV_ARGS, node.args))
    values.update(node.kwargs)
    return values


def _functional_name(gm: fx.GraphModule, node: fx.Node, taken: set[str]) -> str:
    """The layer name of functional conv ``node``: ``<owner>.<node name>``, where owner is the module
    holding its weight (the root: just the node name), with ``_1``, ``_2``, ... appended while that
    attribute exists or another functional conv has the name. A computed weight: the node name."""
    weight = _conv_args(node)["weight"]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return node.name
    owner_name, _ = split_name(weight.target)
    owner = gm.get_submodule(owner_name)
    leaf, i = node.name, 0
    while hasattr(owner, leaf) or (f"{owner_name}.{leaf}" if owner_name else leaf) in taken:
        i += 1
        leaf = f"{node.name}_{i}"
    name = f"{owner_name}.{leaf}" if owner_name else leaf
    taken.add(name)
    return name


@dataclasses.dataclass(frozen=True)
class FunctionalConv:
    """A functional conv call seen as a conv layer: a conv module holding the call's own parameters."""

    module: Optional[nn.Module]  # None where ``reason`` says why it is not a layer
    reads: tuple[fx.Node, ...] = ()  # the get_attr nodes of its weight (and bias)
    params: tuple[str, ...] = ()  # the qualified names of its weight (and bias)
    reason: str = ""


def functional_conv(gm: fx.GraphModule, node: fx.Node, uses: ParameterUses) -> FunctionalConv:
    """Functional conv ``node`` as a conv module over its weight (and bias) parameters, or why it is not one.

    It is one when its weight and bias are ``nn.Parameter``s read by one get_attr node each that
    feeds only this call, used by no module call and registered under one name, and its stride,
    padding, dilation and groups are constants: then the function is the module's, and replacing
    the call removes the parameters with nothing else changed.
    """
    fname = node.target.__name__
    if fname.startswith("conv_transpose"):
        return FunctionalConv(None, reason=f"{fname}() is not decomposed (transposed convs are left as they are)")
    values = _conv_args(node)
    unknown = sorted(set(values) - set(_CONV_ARGS))
    if unknown:
        return FunctionalConv(None, reason=f"{fname}() is called with the unknown argument(s) {unknown}")
    reads, params, tensors = [], [], {}
    for role in ("weight", "bias"):
        arg = values[role]
        if arg is None and role == "bias":
            continue
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            what = f"node {arg.name!r}" if isinstance(arg, fx.Node) else repr(arg)
            return FunctionalConv(None, reason=f"its {role} is computed in forward ({what}), not read from a parameter; "
                                            f"only functional convs on nn.Parameters are decomposed")
        value = find_attr(gm, arg.target)
        if not isinstance(value, nn.Parameter):
            return FunctionalConv(None, reason=f"its {role} is not an nn.Parameter ({arg.target!r} is a "
                                            f"{type(value).__name__}: a buffer or constant); only functional convs on "
                                            f"parameters are decomposed")
        others = [n for n in uses.names.get(id(value), []) if n != arg.target]
        if others:
            return FunctionalConv(None, reason=f"its {role} is shared with another module ({arg.target!r} is also "
                                            f"{', '.join(map(repr, others))}); decomposing would untie them")
        modules = sorted(t for t in uses.called if arg.target.startswith(f"{t}."))
        if modules:
            return FunctionalConv(None, reason=f"its {role} is also used by a module call (module {modules[0]!r} "
                                            f"uses {arg.target!r}); decomposing would take it from that module")
        readers = [n.name for n in uses.reads.get(id(value), []) if n is not arg]
        users = [u.name for u in arg.users if u is not node]
        if readers or users or arg in reads:
            return FunctionalConv(None, reason=f"its {role} is also read by other nodes "
                                            f"({', '.join(readers + users) or node.name} read {arg.target!r}); "
                                            f"decomposing would take it from them")
        reads.append(arg)
        params.append(arg.target)
        tensors[role] = value
    for key in ("stride", "padding", "dilation", "groups"):
        found: list[fx.Node] = []
        fx.node.map_arg(values[key], found.append)
        if found:
            return FunctionalConv(None, reason=f"its {key} is computed in forward (node {found[0].name!r}); only constant "
                                            f"stride, padding, dilation and groups are decomposed")
    weight, dims = tensors["weight"], int(fname[-2])
    cls = CONV_TYPES[dims - 1]
    try:
        if weight.dim() != dims + 2:
            raise ValueError(f"a {dims + 2}-dimensional weight is needed, {tuple(weight.shape)} given")
        groups = values["groups"]
        m = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=values["stride"],
                padding=values["padding"], dilation=values["dilation"], groups=groups,
                bias="bias" in tensors, device="meta")
    except (ValueError, TypeError, RuntimeError) as exc:
        return FunctionalConv(None, reason=f"its arguments make no {cls.__name__} ({exc})")
    m.weight = weight  # the parameters themselves, so requires_grad, dtype and device are theirs
    if "bias" in tensors:
        m.bias = tensors["bias"]
    m.train(gm.get_submodule(split_name(reads[0].target)[0]).training)
    return FunctionalConv(m, tuple(reads), tuple(params), unsupported_reason(m, fname, {}, frozenset()))


def conv_spec(m: nn.modules.conv._ConvNd) -> ConvSpec:
    padding = m.padding if isinstance(m.padding, str) else tuple(m.padding)
    return ConvSpec(
        cls_name=type(m).__name__ if type(m) in CONV_TYPES else next(c.__name__ for c in CONV_TYPES if isinstance(m, c)),
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        kernel_size=tuple(m.kernel_size),
        stride=tuple(m.stride),
        padding=padding,
        dilation=tuple(m.dilation),
        groups=m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
    )


def unsupported_reason(m: nn.Module, name: str, shared: dict[int, list[str]], read: frozenset[str] = frozenset()) -> str:
    """Why module ``m`` cannot be decomposed without changing the function, or ''."""
    base = next((c for c in (*CONV_TYPES, nn.Linear) if isinstance(m, c)), None)
    if base is None:
        return f"{type(m).__name__} is not decomposed (only Conv1d/2d/3d and, with linear=True, Linear)"
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return f"{type(m).__name__} is uninitialised; run one forward pass before tracing"
    readers = sorted(t for t in read if t.startswith(f"{name}."))
    if readers:
        return f"its parameters are also read directly ({', '.join(readers)}); decomposing would remove them"
    if type(m).forward is not base.forward or (base is not nn.Linear and type(m)._conv_forward is not base._conv_forward):
        return f"{type(m).__name__} subclasses {base.__name__} with its own forward; its function is not the weight's"
    if nn.utils.parametrize.is_parametrized(m):
        return "its weight is parametrized (weight norm, spectral norm, ...); decomposing would drop the parametrization"
    if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None):
        return "it has hooks registered; decomposing would drop them"
    if not m.weight.is_floating_point() or m.weight.is_complex():
        return f"its weight has dtype {m.weight.dtype}; only real floating-point weights are decomposed"
    others = [o for o in shared.get(id(m.weight), []) if o != f"{name}.weight"]
    if others:
        return f"its weight is shared with another module ({', '.join(others)}); decomposing would untie them"
    if base is not nn.Linear and m.in_channels // m.groups == 1:
        return "one input channel per group (depthwise, or a single-channel input): there is no input-channel mode to decompose"
    return ""


def one_by_one(m: nn.Module) -> bool:
    """Whether ``m`` is a conv whose kernel is 1 in every dimension (whatever its stride, padding or
    groups): what ``pointwise=False`` leaves whole, and what becomes an SVD pair."""
    return isinstance(m, nn.modules.conv._ConvNd) and math.prod(m.kernel_size) == 1


def _kind(m: nn.Module, method: str = "tucker2") -> str:
    """How ``m`` is decomposed under ``method``: "svd" for Linear and 1x1 convs, else ``method``."""
    return "svd" if isinstance(m, nn.Linear) or one_by_one(m) else method


def kinds(m: nn.Module) -> tuple[str, ...]:
    """The kinds a plan for ``m`` may carry: either method for a kxk conv, "svd" otherwise."""
    return tuple(dict.fromkeys(_kind(m, method) for method in METHODS))


def _group_shape(m: nn.Module) -> tuple[int, ...]:
    """Shape of the kernel of one group: (C_out/g, C_in/g, *k), or (out, in) for Linear."""
    if isinstance(m, nn.Linear):
        return (m.out_features, m.in_features)
    return (m.out_channels // m.groups, m.in_channels // m.groups, *m.kernel_size)


def full_ranks(m: nn.Module, kind: Optional[str] = None) -> tuple[int, ...]:
    """The ranks at which decomposing ``m`` by ``kind`` (default: its kind under "tucker2") is exact."""
    shape = _group_shape(m)
    if (kind or _kind(m)) == "svd":
        return (min(shape[0], math.prod(shape[1:])),)
    return tucker.tucker2_full_ranks(shape)


def group_weights(m: nn.Module, kind: str) -> list[torch.Tensor]:
    """The kernel of each group in compute precision; for ``kind`` "svd" as matrices (C_out/g, C_in/g * k)."""
    w = m.weight.detach().to(compute_dtype(m.weight.dtype))
    if isinstance(m, nn.Linear):
        return [w]
    w = w.reshape(m.groups, m.out_channels // m.groups, *w.shape[1:])
    return [g.reshape(g.shape[0], -1) if kind == "svd" else g for g in w]


def _fraction_ranks(m: nn.Module, kind: str, frac: float, round_to: Optional[int] = None) -> tuple[int, ...]:
    shape, full = _group_shape(m), full_ranks(m, kind)
    modes = full if kind == "svd" else (shape[1], shape[0])
    return tuple(round_rank(min(f, max(1, round(frac * size))), round_to, f) for size, f in zip(modes, full))


def _vbmf_ranks(m: nn.Module, kind: str) -> tuple[int, ...]:
    per_group = [
        (max(1, tucker.evbmf(w)),) if kind == "svd" else tucker.vbmf_ranks(w) for w in group_weights(m, kind)
    ]
    return tuple(max(r) for r in zip(*per_group))


def normalise_ranks(value: Ranks, m: nn.Module, name: str, kind: str) -> tuple[int, ...]:
    """Check user-given ranks for module ``m`` decomposed by ``kind`` and return them as a tuple."""
    full = full_ranks(m, kind)
    want = "an int R or (R,)" if kind == "svd" else "a pair (R1, R2)"
    ranks = (value,) if isinstance(value, numbers.Integral) and kind == "svd" else value
    if not isinstance(ranks, (tuple, list)) or len(ranks) != len(full) or not all(
        isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in ranks
    ):
        one = isinstance(value, numbers.Integral) or (isinstance(value, (tuple, list)) and len(value) == 1)
        hint = "; or pass method='svd' to decompose kxk convs as SVD pairs of rank R" if kind == "tucker2" and one else ""
        raise ValueError(f"ranks for {name!r} ({type(m).__name__}, decomposed by {kind}) must be {want}, "
                         f"got {value!r}{hint}")
    ranks = tuple(int(r) for r in ranks)
    if any(not 1 <= r <= f for r, f in zip(ranks, full)):
        bounds = " and ".join(f"1 <= {n} <= {f}" for n, f in zip(("R1", "R2") if kind == "tucker2" else ("R",), full))
        raise ValueError(f"ranks {ranks} for {name!r} out of range: valid are {bounds} (full rank per group)")
    return ranks


def _choose_ranks(ranks: RanksArg, name: str, m: nn.Module, kind: str,
                  round_to: Optional[int] = None) -> Optional[tuple[int, ...]]:
    """The ranks for ``m`` decomposed by ``kind`` from the user's ``ranks`` argument, or None to skip it."""
    if ranks is None:
        return full_ranks(m, kind)
    if isinstance(ranks, str):
        return _vbmf_ranks(m, kind)
    if isinstance(ranks, numbers.Real) and not isinstance(ranks, bool):
        return _fraction_ranks(m, kind, float(ranks), round_to)
    if isinstance(ranks, dict):
        return normalise_ranks(ranks[name], m, name, kind) if name in ranks else None
    chosen = ranks(name, m)
    return None if chosen is None else normalise_ranks(chosen, m, name, kind)


def check_method(method: object, pass_name: str) -> None:
    """A ValueError unless ``method`` is one of METHODS; ``pass_name`` starts the message."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{pass_name}: method={method!r} is not known; valid: {', '.join(map(repr, METHODS))} "
                         f"(how a conv with a kernel larger than 1x1 is decomposed; 1x1 convs and Linear layers are "
                         f"SVD pairs under either)")


def _check_ranks_arg(ranks: RanksArg, round_to: Optional[int] = None) -> None:
    check_round_to(round_to)
    if round_to is not None and ranks is not None and (isinstance(ranks, (str, bool)) or not isinstance(ranks, numbers.Real)):
        raise ValueError(f"round_to={round_to!r} applies to fractional ranks only (a float in (0, 1]), not to "
                         f"ranks={ranks!r}; give the ranks you want directly, or round after strip_gates(..., round_to=...)")
    if ranks is None or callable(ranks) or isinstance(ranks, dict):
        return
    if isinstance(ranks, str):
        if ranks != "vbmf":
            raise ValueError(f"ranks={ranks!r} is not known: the only string accepted is 'vbmf'")
        return
    if isinstance(ranks, numbers.Real) and not isinstance(ranks, bool):
        if not 0.0 < float(ranks) <= 1.0:
            raise ValueError(f"ranks={ranks!r}: a fraction of each mode must be in (0, 1]")
        return
    raise TypeError(
        f"ranks must be None (full rank), a float in (0, 1], 'vbmf', a dict name -> ranks or a callable "
        f"(name, module) -> ranks or None; got {type(ranks).__name__}"
    )


def _shape(node: fx.Node) -> tuple[int, ...]:
    tm = node.meta.get(TENSOR_META)
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else ()


#: The reasons of layers left whole by choice, not because they cannot be decomposed (no warning).
NOT_SELECTED = "not selected by the ranks argument"
NOT_POINTWISE = "not selected: a 1x1 conv, left whole (pointwise=False)"


def plan_decomposition(gm: fx.GraphModule, ranks: RanksArg = None, *, method: str = "tucker2", linear: bool = False,
                       round_to: Optional[int] = None, pointwise: bool = True, inplace: bool = False) -> fx.GraphModule:
    """Decide, without rewriting, how each conv would be decomposed.

    Writes a :class:`fxtucker.meta.LayerPlan` into ``node.meta["fxtucker"]`` of every conv
    (and Linear, with ``linear=True``) call, functional ``F.conv*d`` calls included (``source``
    is the layer name they get, see :func:`~fxtucker.passes.decompose_conv`), and the layer table into
    ``gm.meta["fxtucker"]``.
    Edit a plan with ``dataclasses.replace`` and run ``decompose_conv(gm, use_plan=True)`` to
    apply it; a kxk conv's plan may switch ``kind`` between "tucker2" and "svd" when its
    ``full_ranks`` and ``ranks`` are changed to fit. Arguments as in :func:`~fxtucker.passes.decompose_conv`.
    """
    check_method(method, "plan_decomposition")
    gm = prepare(gm, inplace, "plan_decomposition")
    for flag, value in (("linear", linear), ("pointwise", pointwise)):
        if not isinstance(value, bool):
            raise TypeError(f"plan_decomposition: {flag} must be True or False, got {value!r}")
    _check_ranks_arg(ranks, round_to)
    modules = dict(gm.named_modules())
    uses = parameter_uses(gm)
    shared = uses.names
    sites: dict[str, list[fx.Node]] = defaultdict(list)
    functional: dict[str, tuple[fx.Node, FunctionalConv]] = {}  # layer name -> its call and what it is
    taken: set[str] = set()
    records: list[LayerRecord] = []
    # Factors of a layer decomposed by an earlier call are that layer's, not layers of their own:
    # they are left alone (decomposing them would nest factors) and the earlier records are kept.
    factors = {n.target: factor_record(n).source for n in gm.graph.nodes if factor_record(n) is not None}
    earlier = [r for r in graph_record(gm).layers if r.decision != SKIPPED] if factors else []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in factors:
            continue
        if node.op == "call_module" and isinstance(modules.get(node.target), (nn.modules.conv._ConvNd, nn.Linear)):
            if isinstance(modules[node.target], nn.Linear) and not linear:
                continue
            sites[node.target].append(node)
        elif node.op == "call_function" and getattr(node.target, "__name__", "") in CONV_FUNCTIONS:
            functional[_functional_name(gm, node, taken)] = (node, functional_conv(gm, node, uses))
    if isinstance(ranks, dict):
        known = set(sites) | set(functional)
        unknown = sorted(set(ranks) - known)
        done = [f"{k!r} (a factor of {factors[k]!r})" for k in unknown if k in factors]
        if done:
            raise ValueError(f"ranks names {', '.join(done)}, already decomposed by an earlier decompose_conv: "
                             f"a layer is decomposed once; give the ranks of the original layer to a "
                             f"decompose_conv of the model from before that call")
        if unknown:
            raise ValueError(f"ranks names {unknown}, which are not {'conv or Linear' if linear else 'conv'} "
                             f"modules called in the graph; known: {sorted(known)}")
    read = frozenset(n.target for n in gm.graph.nodes if n.op == "get_attr")
    layers = [(name, nodes, modules[name], unsupported_reason(modules[name], name, shared, read), type(modules[name]).__name__)
              for name, nodes in sites.items()]
    layers += [(name, [node], fc.module, fc.reason, node.target.__name__) for name, (node, fc) in functional.items()]
    for name, nodes, m, reason, op in layers:
        if not reason and all(not n.users for n in nodes):
            reason = "its output is never used"
        if isinstance(m, nn.modules.conv._ConvNd) and m.transposed:
            reason = f"{type(m).__name__} is not decomposed (transposed convs are left as they are)"
        if reason and isinstance(ranks, dict) and name in ranks:
            raise ValueError(f"ranks asks for {name!r}, which cannot be decomposed: {reason}")
        structural = m is None or reason.startswith(type(m).__name__)  # the module itself is why (transposed, ...)
        if not pointwise and one_by_one(m) and not structural:
            if isinstance(ranks, dict) and name in ranks:
                raise ValueError(f"ranks asks for {name!r}, a 1x1 conv, which pointwise=False leaves whole; drop it "
                                 f"from ranks or pass pointwise=True")
            reason = NOT_POINTWISE  # by choice, before whether it could be (a depthwise 1x1 too): no warning
        kind = _kind(m, method) if m is not None else "skip"
        chosen = None if reason else _choose_ranks(ranks, name, m, kind, round_to)
        if chosen is None and not reason:
            reason = NOT_SELECTED
        plan = (LayerPlan(source=name, kind="skip", reason=reason) if reason else
                LayerPlan(source=name, kind=kind, full_ranks=full_ranks(m, kind), ranks=chosen))
        for node in nodes:
            node.meta[KEY] = plan
        macs = [n.meta.get(MACS) for n in nodes]
        first = nodes[0]
        x = first.args[0] if first.args else first.kwargs.get("input")
        records.append(LayerRecord(
            name=name, node=first.name, op=op, kind=plan.kind,
            spec=conv_spec(m) if isinstance(m, CONV_TYPES) else None,
            in_shape=_shape(x) if isinstance(x, fx.Node) else (), out_shape=_shape(first),
            full_ranks=plan.full_ranks if plan.kind != "skip" else (() if structural else full_ranks(m, kind)),
            ranks=plan.ranks, macs_before=None if None in macs else sum(macs), decision=SKIPPED,
            reason=plan.reason, call_sites=len(nodes),
        ))
    position = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    for i, n in enumerate(gm.graph.nodes):  # a decomposed layer sits where its first factor is
        if factor_record(n) is not None:
            position.setdefault(factor_record(n).replaces, i)
    names = {r.name for r in records}
    records += [r for r in earlier if r.name not in names and r.node in position]
    records.sort(key=lambda r: position[r.node])
    # The rest of the record stays: the weights' format (set_memory_format) and the BatchNorms fold_bn
    # folded; not the ones it left, whose reason (e.g. "its input is conv2d()") may no longer hold.
    before = graph_record(gm)
    set_graph_record(gm, dataclasses.replace(before, layers=tuple(records), stage="plan_decomposition",
                                             batchnorms=tuple(b for b in before.batchnorms if b.folded)))
    return gm
