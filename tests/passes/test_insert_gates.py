"""insert_gates: visible gate nodes, gates = component norms, unit directions through training."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

import fxtucker
from fxtucker.passes import Gate, decompose_conv, insert_gates
from tests.conftest import REL_FLOAT64, reference, rel_error
from tests.strategies import OneConv, Twice, conv_and_input


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.pw = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.pw(torch.relu(self.conv(x))).mean((2, 3)))


@given(conv_and_input(), st.booleans())
@settings(max_examples=40, deadline=None)
def test_function_unchanged(case, balance):
    conv, x = case
    model = OneConv(conv).eval()
    ref = reference(model)
    gated = insert_gates(decompose_conv(fxtucker.trace(model)), balance=balance)
    gated.graph.lint()
    assert rel_error(gated(x), ref(x)) < REL_FLOAT64


def test_gate_nodes_are_visible_and_named_after_the_layer():
    gated = insert_gates(decompose_conv(fxtucker.trace(Net()), linear=True))
    names = [n.name for n in gated.graph.nodes if n.op == "call_module"]
    assert names == [
        "conv_first", "conv_gate_in", "conv_core", "conv_gate_core", "conv_gate_out", "conv_last",
        "pw_first", "pw_gate_in", "pw_gate_out", "pw_last",
        "fc_first", "fc_gate_in", "fc_gate_out", "fc_last",
    ]
    assert "%conv_gate_in : [num_users=1] = call_module[target=conv.gate_in](args = (%conv_first,)" in str(gated.graph)
    assert isinstance(gated.get_submodule("conv.gate_core"), Gate)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in gated.modules())


def test_balanced_input_gates_are_the_input_mode_singular_values():
    model = Net().double()
    g = fxtucker.gates(insert_gates(decompose_conv(fxtucker.trace(model))))
    w = model.conv.weight.detach()  # 2 groups of (3, 2, 3, 3)
    expected = torch.cat([
        torch.linalg.svdvals(wg.transpose(0, 1).reshape(2, -1)) for wg in w.reshape(2, 3, 2, 3, 3)
    ])
    torch.testing.assert_close(g["conv"]["gate_in"].detach(), expected)


def test_gates_are_component_norms_and_directions_are_unit():
    d = decompose_conv(fxtucker.trace(Net().double()))
    g = fxtucker.gates(insert_gates(d, balance=False))
    core = d.get_submodule("conv.core").weight.detach()
    torch.testing.assert_close(g["conv"]["gate_core"].detach(), core.flatten(1).norm(dim=1))
    # HOSVD factors are orthonormal: first rows and last columns have norm 1
    torch.testing.assert_close(g["conv"]["gate_in"].detach(), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(g["conv"]["gate_out"].detach(), torch.ones(6, dtype=torch.float64))
    assert set(g["pw"]) == {"gate_in", "gate_out"}
    left = d.get_submodule("pw.last").weight.detach()
    torch.testing.assert_close(g["pw"]["gate_out"].detach(), left.flatten(1).norm(dim=0))


def test_directions_stay_unit_norm_after_optimizer_steps():
    gated = insert_gates(decompose_conv(fxtucker.trace(Net())))
    opt = torch.optim.SGD(gated.parameters(), lr=0.5)
    x = torch.randn(4, 4, 6, 6)
    for _ in range(3):
        opt.zero_grad()
        gated(x).pow(2).sum().backward()
        opt.step()
    first = gated.get_submodule("conv.first")
    last = gated.get_submodule("conv.last")
    assert parametrize.is_parametrized(first, "weight")
    torch.testing.assert_close(first.weight.flatten(1).norm(dim=1), torch.ones(4))
    # last is grouped (2 groups of 3 output channels): each column of each group is unit
    cols = last.weight.reshape(2, 3, 3, -1).norm(dim=(1, 3))
    torch.testing.assert_close(cols, torch.ones(2, 3))
    # the raw weight did move: the parametrization, not the optimizer, keeps it unit
    assert first.parametrizations.weight.original.flatten(1).norm(dim=1).sub(1).abs().max() > 1e-3


def test_shared_module_gets_one_gate_module_and_a_node_per_call():
    model = Twice().double()
    gated = insert_gates(decompose_conv(fxtucker.trace(model)))
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    assert rel_error(gated(x), model(x)) < REL_FLOAT64
    assert [n.name for n in gated.graph.nodes if n.target == "conv.gate_in"] == ["conv_gate_in", "conv_gate_in_1"]
    assert len(fxtucker.gates(gated)) == 1


def test_errors():
    with pytest.raises(ValueError, match=r"insert_gates found no decomposed layers: run decompose_conv\(gm\) first"):
        insert_gates(fxtucker.trace(Net()))
    gated = insert_gates(decompose_conv(fxtucker.trace(Net())))
    with pytest.raises(ValueError, match=r"'conv' already has gates; insert_gates runs once"):
        insert_gates(gated)
    with pytest.raises(TypeError, match=r"insert_gates expects a torch.fx.GraphModule"):
        insert_gates(Net())
