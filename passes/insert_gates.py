"""insert_gates: write each factor component as gate x unit vector (Chu and Lee 2021, eq. 4-5)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from fxtucker.meta import CORE, FIRST, GATE_CORE, GATE_IN, GATE_OUT, LAST, FactorRecord, graph_record, set_graph_record
from fxtucker.passes._common import (check_graph_module, factor_nodes, layer_nodes, finish, new_node,
                                     nothing_decomposed, prepare)
from fxtucker.tucker import compute_dtype

__all__ = ["insert_gates", "gates", "Gate", "UnitNorm"]

_EPS = 1e-12


class UnitNorm(nn.Module):
    """Parametrization: each component of a weight scaled to unit 2-norm.

    ``dim=0`` normalises output filters (rows); ``dim=1`` normalises input columns, taken
    per group for grouped convs (``groups``), where column j of group g is
    ``weight[g*C_out/g:(g+1)*C_out/g, j]``.
    """

    def __init__(self, dim: int = 0, groups: int = 1):
        super().__init__()
        self.dim, self.groups = dim, groups

    def component_norms(self, w: torch.Tensor) -> torch.Tensor:
        """The 2-norm of each component of ``w``, in the order the gate sees them."""
        if self.dim == 0:
            return w.flatten(1).norm(dim=1)
        g = w.reshape(self.groups, w.shape[0] // self.groups, w.shape[1], -1)
        return g.norm(dim=(1, 3)).flatten()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        norms = self.component_norms(w).clamp_min(_EPS)
        if self.dim == 0:
            return w / norms.view(-1, *([1] * (w.dim() - 1)))
        g = w.reshape(self.groups, w.shape[0] // self.groups, w.shape[1], -1)
        return (g / norms.view(self.groups, 1, w.shape[1], 1)).reshape(w.shape)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + (f", groups={self.groups}" if self.groups != 1 else "")


class Gate(nn.Module):
    """Multiplies channel ``c`` of its input by ``weight[c]``: the gates of one factor.

    The channel dimension is the one before the ``spatial_dims`` trailing dimensions
    (1 for a batched Conv2d input with spatial_dims=2, the last one for Linear).
    """

    def __init__(self, values: torch.Tensor, spatial_dims: int):
        super().__init__()
        self.weight = nn.Parameter(values.detach().clone())
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(-1, *([1] * self.spatial_dims))

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, spatial_dims={self.spatial_dims}"


def _spatial_dims(m: nn.Module) -> int:
    return 0 if isinstance(m, nn.Linear) else len(m.kernel_size)


def _groups(m: nn.Module) -> int:
    return getattr(m, "groups", 1)


def _balance(first: nn.Module, core: nn.Module) -> None:
    """Move the norm of each input slice of ``core`` into the matching row of ``first``.

    After HOSVD the rows of ``first`` are orthonormal and the input-mode singular values sit in
    the core's input slices; moved into ``first``, each input-mode gate starts at its
    component's importance (zero for a component that contributes nothing). The product of
    the two factors, and so the function, is unchanged.
    """
    groups = core.groups
    with torch.no_grad():
        w = core.weight  # (g*R2, R1, *k)
        # In the precision decompose_conv computed the factors in (float32 for fp16/bf16): the
        # rounding noise below is that of the HOSVD, and fp16's eps would zero live slices.
        dtype = compute_dtype(w.dtype)
        g = w.to(dtype).reshape(groups, w.shape[0] // groups, w.shape[1], -1)
        norms = g.norm(dim=(1, 3))  # (groups, R1): per group, per input slice
        # Slices below the numerical rank (torch.linalg.matrix_rank's default tolerance) hold
        # rounding noise; divided by their norms they would pose as unit-norm components, so they
        # are zeroed instead (a change within rounding error of the weights).
        tol = norms.amax(dim=1, keepdim=True) * torch.finfo(dtype).eps * max(g.shape[1], g.shape[2] * g.shape[3])
        live = norms > tol
        safe = torch.where(live, norms, torch.ones_like(norms))
        w.copy_((g * live.view(groups, 1, -1, 1) / safe.view(groups, 1, -1, 1)).reshape(w.shape))
        scale = torch.where(live, norms, torch.zeros_like(norms)).flatten()  # global index g*R1 + r
        first.weight.copy_(first.weight.to(dtype) * scale.view(-1, *([1] * (first.weight.dim() - 1))))


def insert_gates(gm: fx.GraphModule, *, balance: bool = True, inplace: bool = False) -> fx.GraphModule:
    """Make every factor component a trainable gate times a unit-norm direction.

    For each decomposed layer: the rows of ``first`` (R1 output filters), the output slices
    of ``core`` (R2) and the columns of ``last`` (R2) are kept at unit 2-norm by a
    :class:`UnitNorm` parametrization (it holds through every optimizer step), and their
    magnitudes move into :class:`Gate` nodes, initialised to the component norms, so the
    function is unchanged. SVD pairs get ``gate_in`` and ``gate_out`` only.

    Args:
        gm: output of :func:`decompose_conv`.
        balance: first move the norm of each input slice of ``core`` into the matching row of
            ``first`` (function unchanged), so that ``gate_in`` starts at the input-mode singular
            value, the component's importance, instead of 1 for every component (HOSVD's rows
            are orthonormal). Without it, input-mode components can hardly be pruned.
        inplace: rewrite ``gm`` itself instead of a deep copy.

    Before::

        %l_first = call_module[target=l.first](args = (%x,))
        %l_core = call_module[target=l.core](args = (%l_first,))
        %l_last = call_module[target=l.last](args = (%l_core,))

    After::

        %l_first = call_module[target=l.first](args = (%x,))
        %l_gate_in = call_module[target=l.gate_in](args = (%l_first,))
        %l_core = call_module[target=l.core](args = (%l_gate_in,))
        %l_gate_core = call_module[target=l.gate_core](args = (%l_core,))
        %l_gate_out = call_module[target=l.gate_out](args = (%l_gate_core,))
        %l_last = call_module[target=l.last](args = (%l_gate_out,))

    Example::

        >>> gated = insert_gates(decompose_conv(fxtucker.trace(model)))
        >>> fxtucker.gates(gated)["layer1.0.conv1"]["gate_in"].shape
        torch.Size([64])
    """
    if not isinstance(balance, bool):
        raise TypeError(f"insert_gates: balance must be True or False, got {balance!r}")
    gm = prepare(gm, inplace, "insert_gates")
    by_source = layer_nodes(gm)
    if not by_source and nothing_decomposed(gm):  # every layer skipped, with its reason: nothing to gate
        set_graph_record(gm, dataclasses.replace(graph_record(gm), stage="insert_gates"))
        return finish(gm)
    if not by_source:
        raise ValueError("insert_gates found no decomposed layers: run decompose_conv(gm) first")
    for source, roles in by_source.items():
        if any(r.startswith("gate") for r in roles):
            raise ValueError(f"{source!r} already has gates; insert_gates runs once, strip_gates removes them")
        container = gm.get_submodule(source)
        first, last = container[FIRST], container[LAST]
        core = container[CORE] if CORE in container else None
        if balance and core is not None:
            _balance(first, core)
        # (factor, gate role placed after it or before it, which norms)
        plan = [(FIRST, GATE_IN, UnitNorm(0, _groups(first)), "after")]
        if core is not None:
            plan.append((CORE, GATE_CORE, UnitNorm(0, _groups(core)), "after"))
        plan.append((LAST, GATE_OUT, UnitNorm(1, _groups(last)), "before"))
        for role, gate_role, unit, where in plan:
            module = container[role]
            norms = unit.component_norms(module.weight.detach())
            gate = Gate(norms, _spatial_dims(module))
            parametrize.register_parametrization(module, "weight", unit)
            container[gate_role] = gate
            for node in roles[role]:
                rec = node.meta["fxtucker"]
                grec = FactorRecord(source=source, role=gate_role, ranks=rec.ranks, replaces=rec.replaces)
                if where == "after":
                    with gm.graph.inserting_after(node):
                        g = new_node(gm.graph, "call_module", f"{source}.{gate_role}", (node,), node, grec)
                    node.replace_all_uses_with(g, delete_user_cb=lambda user: user is not g)
                else:
                    with gm.graph.inserting_before(node):
                        g = new_node(gm.graph, "call_module", f"{source}.{gate_role}", (node.args[0],), node, grec)
                    node.replace_input_with(node.args[0], g)
    set_graph_record(gm, dataclasses.replace(graph_record(gm), stage="insert_gates"))
    return finish(gm)


def gates(gm: fx.GraphModule) -> dict[str, dict[str, nn.Parameter]]:
    """The gate parameters of a gated GraphModule: ``{layer: {"gate_in": ..., ...}}``.

    The tensors are the live parameters, for a regularizer to read during training.
    """
    check_graph_module(gm, "gates")
    out: dict[str, dict[str, nn.Parameter]] = defaultdict(dict)
    for _, rec in factor_nodes(gm):
        if rec.role.startswith("gate"):
            out[rec.source][rec.role] = gm.get_submodule(f"{rec.source}.{rec.role}").weight
    return dict(out)
