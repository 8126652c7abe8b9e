"""compose_factors: a training view of a gated model in which each layer runs as one composed conv."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from fxtucker import tucker
from fxtucker.meta import CORE, FIRST, GATE_CORE, GATE_IN, GATE_OUT, LAST
from fxtucker.passes._common import CONV_TYPES, check_graph_module, layer_nodes
from fxtucker.passes.insert_gates import Gate

__all__ = ["compose_factors", "ComposedConv"]

_TUCKER = (FIRST, GATE_IN, CORE, GATE_CORE, GATE_OUT, LAST)
_SVD = (FIRST, GATE_IN, GATE_OUT, LAST)


class ComposedConv(nn.Module):
    """One gated layer's factors as a single conv whose kernel is composed on every call.

    The chain ``last(gate_out(gate_core(core(gate_in(first(x))))))`` is linear in ``x``, so it equals
    one conv with the kernel ``L diag(g_out g_core) C diag(g_in) F`` (Tucker-2) or
    ``L diag(g_out g_in) F`` (an SVD pair), with ``core``'s (or ``first``'s) stride, padding and
    dilation and ``last``'s bias. Autograd through the composition gives the factors and gates the
    chain's gradients. The factors and gates are this module's children under their role names,
    the same objects as in the gated model, so a parameter update here is one there, and the
    state_dict keys are the gated model's.
    """

    def __init__(self, factors: dict[str, nn.Module]):
        super().__init__()
        for role, module in factors.items():
            self.add_module(role, module)
        self.kind = "tucker2" if CORE in factors else "svd"

    def kernel(self) -> torch.Tensor:
        if self.kind == "tucker2":
            return tucker.compose_scaled(self.last.weight, self.first.weight, self.core.weight,
                                         scale_in=self.gate_in.weight,
                                         scale_out=self.gate_out.weight * self.gate_core.weight)
        return tucker.compose_scaled(self.last.weight, self.first.weight, scale_in=self.gate_in.weight,
                                     scale_out=self.gate_out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.core if self.kind == "tucker2" else self.first
        return conv._conv_forward(x, self.kernel(), self.last.bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def _composable(container: nn.Module, roles: dict[str, list[fx.Node]]) -> tuple[str, ...]:
    """The layer's chain of roles if it can run as one conv, else ()."""
    chain = _TUCKER if CORE in roles else _SVD
    if set(roles) != set(chain) or any(len(roles[r]) != 1 for r in chain):
        return ()  # not gated, or a layer called more than once
    mods = {r: container[r] for r in chain}
    convs = [mods[r] for r in chain if not r.startswith("gate")]
    kinds = {next((c for c in CONV_TYPES if isinstance(m, c)), None) for m in convs}  # parametrized subclasses too
    if None in kinds or len(kinds) != 1 or any(m.groups != 1 for m in convs):
        return ()
    if not all(isinstance(mods[r], Gate) for r in chain if r.startswith("gate")):
        return ()
    inner = [FIRST] if chain is _SVD else [FIRST, CORE]
    pointwise = [LAST] if chain is _SVD else [FIRST, LAST]
    if any(mods[r].bias is not None for r in inner):
        return ()
    for r in pointwise:  # a 1x1 conv with stride 1 and no padding: a matrix over channels
        m = mods[r]
        if any(k != 1 for k in m.kernel_size) or any(s != 1 for s in m.stride) or any(p != 0 for p in m.padding):
            return ()
    nodes = [roles[r][0] for r in chain]
    for a, b in zip(nodes, nodes[1:]):  # one straight chain: each node read only by the next
        if list(a.users) != [b] or b.args[0] is not a or len(b.args) != 1 or b.kwargs:
            return ()
    return chain


def compose_factors(gm: fx.GraphModule) -> fx.GraphModule:
    """A view of a gated GraphModule for training: each layer's factors and gates as one conv.

    The full-rank gated model runs three convs and three gate multiplies per layer, about 1.2x
    the original MACs and many small kernels. The view runs one conv per layer with the kernel
    composed from the factors and gates (:class:`ComposedConv`): the same function and gradients,
    at about the cost of the original model. It shares every parameter and buffer with ``gm``
    (nothing is copied), so training the view trains ``gm``, and its state_dict has ``gm``'s keys.
    Layers that cannot be composed (grouped convs, Linear factors, a factor called twice) keep
    their chain. Use it for training only: the passes after training (strip_gates,
    fold_or_restore) take ``gm``.

    Args:
        gm: a gated GraphModule (output of :func:`~fxtucker.passes.insert_gates`).

    Before::

        %l_first = call_module[target=l.first](args = (%x,))
        %l_gate_in = call_module[target=l.gate_in](args = (%l_first,))
        %l_core = call_module[target=l.core](args = (%l_gate_in,))
        %l_gate_core = call_module[target=l.gate_core](args = (%l_core,))
        %l_gate_out = call_module[target=l.gate_out](args = (%l_gate_core,))
        %l_last = call_module[target=l.last](args = (%l_gate_out,))

    After::

        %l = call_module[target=l](args = (%x,))      # a ComposedConv over l.first ... l.last

    Example::

        >>> view = compose_factors(gated)
        >>> train(view, loader, config)   # updates gated's factors and gates
    """
    check_graph_module(gm, "compose_factors")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    modules: dict[str, object] = {}
    for source, roles in layer_nodes(gm).items():
        container = gm.get_submodule(source)
        chain = _composable(container, roles)
        if not chain:
            continue
        first, last = env[roles[chain[0]][0]], env[roles[chain[-1]][0]]
        with graph.inserting_before(first):
            node = graph.call_module(source, (first.args[0],))
        node.meta = copy.copy(last.meta)
        if first.stack_trace:
            node.stack_trace = first.stack_trace
        last.replace_all_uses_with(node)
        for role in reversed(chain):
            graph.erase_node(env[roles[role][0]])
        modules[source] = ComposedConv({r: container[r] for r in chain})
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in modules:
            modules[node.target] = (gm.get_submodule(node.target) if node.op == "call_module"
                                    else _get_attr(gm, node.target))
    graph.lint()
    view = fx.GraphModule(modules, graph, class_name=type(gm).__name__)
    view.meta.update(gm.meta)
    return view


def _get_attr(gm: nn.Module, target: str):
    *path, name = target.split(".")
    owner = gm.get_submodule(".".join(path)) if path else gm
    return getattr(owner, name)
