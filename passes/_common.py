"""Helpers shared by the passes: copying, finishing a rewrite, module swapping."""

from __future__ import annotations

import copy
import hashlib
import json
import numbers
import operator
from collections import defaultdict
from typing import Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker.meta import KEY, FactorRecord, factor_record, graph_record

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def round_rank(k: int, round_to: Optional[int], full: int) -> int:
    """``k`` rounded up to a multiple of ``round_to``, never above ``full``; 0 stays 0."""
    if not round_to or k == 0:
        return k
    return min(full, -(-k // round_to) * round_to)


def check_round_to(round_to: object) -> None:
    """A ValueError unless ``round_to`` is None or an int >= 1."""
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral) or round_to < 1):
        raise ValueError(f"round_to must be None or an int >= 1 (e.g. 8 or 16: ranks rounded up to a multiple), "
                         f"got {round_to!r}")


def standard_strides(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with row-major strides. A kernel whose strides also read as channels-last (a
    1x1 kernel's size-1 dims allow both; ``.contiguous()`` keeps them) makes the conv's output
    channels-last, and a later ``.view()`` of it fail."""
    return weight.clone(memory_format=torch.contiguous_format)


def check_graph_module(gm: object, pass_name: str) -> fx.GraphModule:
    """Raise a TypeError unless ``gm`` is a GraphModule."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"{pass_name} expects a torch.fx.GraphModule, got {type(gm).__name__}; "
            f"trace the model first with fxtucker.trace(model) or torch.fx.symbolic_trace(model)"
        )
    return gm


_AFTER_DECOMPOSE = ("decompose_conv", "insert_gates", "strip_gates", "fold_or_restore")


def nothing_decomposed(gm: fx.GraphModule) -> bool:
    """Whether decompose_conv ran on ``gm`` but decomposed no layer (each skipped with a reason in the
    record): the later passes then have nothing to do and pass the model through unchanged."""
    rec = graph_record(gm)
    ran = rec.stage in _AFTER_DECOMPOSE or (bool(rec.layers) and rec.stage != "plan_decomposition")
    return ran and not any(factor_record(n) is not None for n in gm.graph.nodes)


def prepare(gm: fx.GraphModule, inplace: bool, pass_name: str) -> fx.GraphModule:
    """The GraphModule a pass rewrites: ``gm`` itself when ``inplace``, else a deep copy."""
    check_graph_module(gm, pass_name)
    return gm if inplace else copy.deepcopy(gm)


def _removable(node: fx.Node) -> bool:
    # Only fxtucker's own nodes and parameter reads may be dropped when unused: the user's
    # graph can hold in-place calls (x.add_(y)) whose results nobody reads but whose effect counts.
    return node.op == "get_attr" or isinstance(node.meta.get(KEY), FactorRecord)


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Lint, drop dead fxtucker nodes and unused submodules, recompile."""
    gm.graph.lint()
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: not _removable(n))
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def split_name(target: str) -> tuple[str, str]:
    """'a.b.c' -> ('a.b', 'c')."""
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def set_submodule(gm: nn.Module, target: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified name ``target``, replacing what is there."""
    parent, name = split_name(target)
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def new_node(graph: fx.Graph, op: str, target, args: tuple, like: fx.Node, record: FactorRecord) -> fx.Node:
    """Create a node that inherits ``like``'s stack trace and carries ``record``."""
    node = graph.create_node(op, target, args, {})
    if like.stack_trace:
        node.stack_trace = like.stack_trace
    node.meta[KEY] = record
    return node


def layer_nodes(gm: fx.GraphModule) -> dict[str, dict[str, list[fx.Node]]]:
    """fxtucker's nodes by layer (source module) and role, each list in graph order."""
    by_source: dict[str, dict[str, list[fx.Node]]] = defaultdict(lambda: defaultdict(list))
    for node, rec in factor_nodes(gm):
        by_source[rec.source][rec.role].append(node)
    return by_source


def factor_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, FactorRecord]]:
    """Every node that fxtucker created, with its record, in graph order."""
    for node in gm.graph.nodes:
        rec = factor_record(node)
        if rec is not None:
            yield node, rec


def model_digest(gm: fx.GraphModule) -> str:
    """What a whole model's speed depends on: its graph code, each called module's class and
    settings (``extra_repr``: shapes, strides, ...) and each attribute read's shape and dtype."""
    parts = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            parts.append([n.target, type(m).__module__, type(m).__qualname__, m.extra_repr(),
                          [[k, list(p.shape), str(p.dtype)] for k, p in m.named_parameters()]])
        elif n.op == "get_attr":
            a = operator.attrgetter(n.target)(gm)
            parts.append([n.target, list(a.shape) if isinstance(a, torch.Tensor) else repr(type(a)),
                          str(getattr(a, "dtype", ""))])
    text = json.dumps([gm.code, parts], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
