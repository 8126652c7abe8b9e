"""fold_bn: fold each eval-mode BatchNorm into the convolution that feeds it."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections import Counter, defaultdict
from typing import Collection, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker.meta import LAST, PARAMS, BatchNormRecord, factor_record, graph_record, set_graph_record
from fxtucker.passes._common import CONV_TYPES, finish, prepare

__all__ = ["fold_bn"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _input(node: fx.Node) -> Optional[fx.Node]:
    """The tensor a BatchNorm call normalises, if it is a graph node."""
    x = node.args[0] if node.args else node.kwargs.get("input")
    return x if isinstance(x, fx.Node) else None


def _describe(node: Optional[fx.Node], modules: dict[str, nn.Module]) -> str:
    if node is None:
        return "a constant"
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    if node.op in ("call_function", "call_method"):
        return f"{getattr(node.target, '__name__', node.target)}() (node {node.name!r})"
    return f"{node.op} {node.name!r}"


def _category(reason: str) -> str:
    """The reason without the names in it, to group skips in the summary warning."""
    if reason.startswith("its input is"):
        return "input is not a conv module"
    if reason.startswith("the output of"):
        return "conv output has other users"
    return re.sub(r" ?'[^']*'", "", reason.split(";")[0].split(" (")[0])


def _bn_reason(bn: nn.Module) -> str:
    """Why BatchNorm ``bn`` itself cannot be folded into anything, or ''."""
    if type(bn).forward is not nn.modules.batchnorm._BatchNorm.forward or not isinstance(bn, _BN_TYPES):
        return f"{type(bn).__name__} is not a plain BatchNorm1d/2d/3d (its forward is its own)"
    if bn._forward_hooks or bn._forward_pre_hooks:
        return "it has hooks registered; folding would drop them"
    if bn.running_mean is None or bn.running_var is None:
        return ("it keeps no running statistics (track_running_stats=False), so it normalises with batch "
                "statistics even in eval mode")
    return ""


def _conv_reason(conv: nn.Module, target: str, conv_node: fx.Node, bn: nn.Module, calls: Counter,
                 shared: dict[int, list[str]], read: frozenset[str]) -> str:
    """Why the conv called by ``conv_node`` cannot absorb BatchNorm ``bn``, or ''."""
    base = next(c for c in CONV_TYPES if isinstance(conv, c))
    if type(conv).forward is not base.forward or type(conv)._conv_forward is not base._conv_forward:
        return f"the conv {target!r} is a {type(conv).__name__} with its own forward; its function is not the weight's"
    if len(conv_node.users) > 1:
        others = sorted(u.name for u in conv_node.users)
        return f"the output of {target!r} has {len(others)} users ({', '.join(others)}); folding would change what the others see"
    if calls[target] > 1:
        return f"the conv {target!r} is called at {calls[target]} places; folding would change the other calls"
    if nn.utils.parametrize.is_parametrized(conv):
        return f"the weight of {target!r} is parametrized (gates not stripped yet, weight norm, ...); run strip_gates first"
    if conv._forward_hooks or conv._forward_pre_hooks:
        return f"the conv {target!r} has hooks registered; folding would change what they see"
    if not conv.weight.is_floating_point() or conv.weight.is_complex():
        return f"the weight of {target!r} has dtype {conv.weight.dtype}; only real floating-point weights are folded"
    names = [f"{target}.weight"] + ([f"{target}.bias"] if conv.bias is not None else [])
    tied = [o for p in names for o in shared.get(id(conv.get_parameter(p.rsplit('.', 1)[1])), []) if o not in names]
    if tied:
        return f"the parameters of {target!r} are shared with {', '.join(sorted(tied))}; folding would untie them"
    readers = sorted(t for t in read if t.startswith(f"{target}."))
    if readers:
        return f"the parameters of {target!r} are also read directly ({', '.join(readers)}); folding would change them"
    if bn.num_features != conv.out_channels:
        return f"num_features={bn.num_features} differs from the {conv.out_channels} output channels of {target!r}"
    return ""


def _fold(conv: nn.Module, bn: nn.Module) -> None:
    """conv <- bn(conv(.)) in eval mode: scale each output channel of the weight, shift the bias."""
    w = conv.weight.detach()
    dtype = torch.float64  # fold in float64, store in the conv's dtype
    scale = torch.rsqrt(bn.running_var.detach().to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    bias = -bn.running_mean.detach().to(dtype) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.detach().to(dtype)
    if conv.bias is not None:
        bias = bias + conv.bias.detach().to(dtype) * scale
    scale, bias = scale.to(w.device), bias.to(w.device)
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter((w.to(dtype) * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype), requires_grad)
    conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad)


def fold_bn(gm: fx.GraphModule, *, nodes: Optional[Collection[str]] = None, inplace: bool = False) -> fx.GraphModule:
    """Fold every eval-mode BatchNorm that directly follows a conv into that conv's weight and bias.

    A ``BatchNorm1d/2d/3d`` call whose input is the output of an ``nn.Conv1d/2d/3d`` module
    (a plain conv, a restored one, or the ``last`` factor of a decomposed layer) that nothing
    else reads becomes part of the conv: each output channel of the weight is scaled by
    ``gamma / sqrt(running_var + eps)`` and the bias becomes ``(bias - running_mean) * scale +
    beta`` (computed in float64). The BatchNorm node and, when no other call uses it, its module
    are removed; the conv keeps its target and node name (it gains a bias if it had none).

    BatchNorms that cannot be folded without changing the function are left as they are with a
    reason, recorded in ``fxtucker.meta.graph_record(gm).batchnorms`` with one summary warning:
    the input is not a conv module (an add, a concat, a functional conv), the conv's output has
    other users or the conv is called more than once, the conv is parametrized (gates not yet
    stripped), has hooks or tied weights, or the BatchNorm keeps no running statistics.

    A BatchNorm in training mode that follows a conv raises ValueError instead of being
    skipped: it normalises with batch statistics, which no fold reproduces, and a model left
    in training mode by mistake should not silently keep every BatchNorm.

    MACs are unchanged (bias excluded); ``node.meta["params"]`` of each absorbing conv is updated
    where the cost model wrote it, and a recorded layer's ``spec.bias`` becomes True, so
    ``fold_or_restore`` can still rebuild it.

    Args:
        gm: a traced model, or the output of any pass of the chain after ``strip_gates``
            (``decompose_conv`` and ``fold_or_restore`` outputs work too).
        nodes: fold only the BatchNorm calls with these graph node names (the others are left
            as they are, without a record); None for all. ValueError for a name that is not a
            BatchNorm call in the graph.
        inplace: rewrite ``gm`` itself instead of a deep copy.

    Returns:
        The GraphModule with the foldable BatchNorms gone.

    Before::

        %conv1 : call_module[target=conv1](args = (%x,))
        %bn1 : call_module[target=bn1](args = (%conv1,))
        %relu : call_module[target=relu](args = (%bn1,))

    After::

        %conv1 : call_module[target=conv1](args = (%x,))
        %relu : call_module[target=relu](args = (%conv1,))

    Example::

        >>> folded = fold_bn(fxtucker.trace(torchvision.models.resnet18().eval()))
        >>> any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        False
    """
    gm = prepare(gm, inplace, "fold_bn")
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    shared: dict[int, list[str]] = defaultdict(list)
    for pname, p in gm.named_parameters(remove_duplicate=False):
        shared[id(p)].append(pname)
    read = frozenset(n.target for n in gm.graph.nodes if n.op == "get_attr")
    rec = graph_record(gm)
    records: list[BatchNormRecord] = []
    bias_gained: set[str] = set()
    bn_nodes = [n for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(modules.get(n.target), nn.modules.batchnorm._BatchNorm)]
    if nodes is not None:
        if isinstance(nodes, str) or not all(isinstance(n, str) for n in nodes):
            raise TypeError(f"nodes must be a collection of graph node names, got {nodes!r}")
        unknown = sorted(set(nodes) - {n.name for n in bn_nodes})
        if unknown:
            raise ValueError(f"fold_bn: nodes names {unknown}, which are not BatchNorm calls in the graph; "
                             f"BatchNorm nodes: {[n.name for n in bn_nodes]}")
        bn_nodes = [n for n in bn_nodes if n.name in set(nodes)]
    for node in bn_nodes:
        bn, src = modules[node.target], _input(node)
        conv = modules.get(src.target) if src is not None and src.op == "call_module" else None
        if not isinstance(conv, CONV_TYPES):
            reason = f"its input is {_describe(src, modules)}, not the output of an nn.Conv1d/2d/3d module"
        else:
            reason = _bn_reason(bn) or _conv_reason(conv, src.target, src, bn, calls, shared, read)
        if not reason and bn.training:
            raise ValueError(
                f"fold_bn: BatchNorm {node.target!r} (node {node.name!r}) is in training mode, where it normalises "
                f"with the statistics of each batch and no fold can reproduce it; call model.eval() (or gm.eval()) "
                f"before fold_bn"
            )
        if reason:
            records.append(BatchNormRecord(name=node.target, node=node.name, reason=reason))
            continue
        had_bias = conv.bias is not None
        _fold(conv, bn)
        if PARAMS in src.meta:
            src.meta[PARAMS] = sum(p.numel() for p in conv.parameters())
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        factor = factor_record(src)
        layer = factor.source if factor is not None and factor.role == LAST else src.target
        if not had_bias:
            bias_gained.add(layer)
        records.append(BatchNormRecord(name=node.target, node=node.name, conv=src.target, folded=True,
                                       reason=f"folded into {src.target!r}"))
    layers = tuple(
        dataclasses.replace(r, spec=dataclasses.replace(r.spec, bias=True))
        if r.name in bias_gained and r.spec is not None else r
        for r in rec.layers
    )
    # Folds from an earlier run stay on record; skips are decided again for the nodes looked at now.
    considered = {n.name for n in bn_nodes}
    earlier = tuple(b for b in rec.batchnorms if b.folded or b.node not in considered)
    set_graph_record(gm, dataclasses.replace(rec, layers=layers, stage="fold_bn", batchnorms=earlier + tuple(records)))
    skipped = [r for r in records if not r.folded]
    if skipped:
        reasons: dict[str, list[str]] = defaultdict(list)
        for r in skipped:
            reasons[_category(r.reason)].append(r.name)
        summary = "; ".join(f"{len(v)} x {k} (e.g. {v[0]!r})" for k, v in reasons.items())
        warnings.warn(f"fold_bn left {len(skipped)} BatchNorm layer(s) as they are: {summary}. "
                      f"fxtucker.meta.graph_record(gm).batchnorms lists each with its reason.", stacklevel=2)
    return finish(gm)
