"""compose_factors: the training view runs each gated layer as one conv, with the chain's function
and gradients, and shares every parameter with the gated model."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtucker
from fxtucker.passes import cost_model, decompose_conv, insert_gates
from fxtucker.passes.compose_factors import ComposedConv, compose_factors
from tests.conftest import REL_FLOAT64, rel_error


class Net(nn.Module):
    def __init__(self, conv: nn.Module, grouped: bool = False):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)
        self.other = nn.Conv2d(conv.out_channels, 4, 3, padding=1, groups=2 if grouped else 1)

    def forward(self, x):
        return self.other(torch.relu(self.bn(self.conv(x))))


def _gated(model: nn.Module, x: torch.Tensor, method: str = "tucker2") -> torch.fx.GraphModule:
    gm = insert_gates(decompose_conv(cost_model(fxtucker.trace(model), x[:1]), method=method))
    with torch.no_grad():  # gates away from their initial values, some at 0
        for layer in fxtucker.gates(gm).values():
            for g in layer.values():
                g.mul_(torch.rand_like(g) + 0.5)
                g[0] = 0.0
    return gm


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@settings(max_examples=20, deadline=None)
@given(k=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2), dilation=st.integers(1, 2), bias=st.booleans(),
       padding_mode=st.sampled_from(["zeros", "reflect", "circular"]), method=st.sampled_from(["tucker2", "svd"]))
def test_view_has_the_chains_function_and_gradients(k, stride, dilation, bias, padding_mode, method):
    conv = nn.Conv2d(6, 8, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=bias,
                     padding_mode=padding_mode)
    model = Net(conv).double()
    x = torch.randn(3, 6, 11, 11, dtype=torch.float64)
    gm = _gated(model, x, method)
    view = compose_factors(gm)
    composed = [m for m in view.modules() if isinstance(m, ComposedConv)]
    assert len(composed) == 2  # conv and other, the grouped-free layers
    gm.train(), view.train()
    assert rel_error(view(x), gm(x)) < REL_FLOAT64
    ga, gb = _grads(gm, x), _grads(view, x)
    assert ga.keys() == gb.keys()
    scale = max(g.norm().item() for g in ga.values())  # a bias before BatchNorm has a gradient of 0 (noise)
    for name in ga:
        assert (gb[name] - ga[name]).norm().item() <= REL_FLOAT64 * scale, name


def test_view_shares_parameters_and_state_dict_keys_with_the_gated_model():
    model = Net(nn.Conv2d(4, 8, 3, padding=1))
    x = torch.randn(2, 4, 9, 9)
    gm = _gated(model, x)
    view = compose_factors(gm)
    assert list(view.state_dict()) == list(gm.state_dict()) or sorted(view.state_dict()) == sorted(gm.state_dict())
    ids = {id(p) for p in gm.parameters()}
    assert {id(p) for p in view.parameters()} == ids
    opt = torch.optim.SGD(view.parameters(), lr=0.1)
    before = fxtucker.gates(gm)["conv"]["gate_in"].detach().clone()
    view(x).sum().backward()
    opt.step()
    assert not torch.equal(fxtucker.gates(gm)["conv"]["gate_in"].detach(), before)  # trained through the view
    gm.eval(), view.eval()
    torch.testing.assert_close(view(x), gm(x))


def test_view_graph_has_one_node_per_composed_layer_and_keeps_grouped_chains():
    model = Net(nn.Conv2d(4, 8, 3, padding=1), grouped=True)
    x = torch.randn(2, 4, 9, 9)
    gm = _gated(model, x)
    view = compose_factors(gm)
    targets = [n.target for n in view.graph.nodes if n.op == "call_module"]
    assert "conv" in targets and not any(t.startswith("conv.") for t in targets)
    assert any(t.startswith("other.") for t in targets)  # the grouped conv keeps first/gates/core/last
    assert isinstance(view.get_submodule("conv"), ComposedConv)
    view.graph.lint()
    gm.eval(), view.eval()
    torch.testing.assert_close(view(x), gm(x))


def test_compress_trains_through_the_view_and_without_it():
    from fxtucker.compress import CompressConfig, compress

    model = nn.Sequential(Net(nn.Conv2d(3, 8, 3, padding=1)), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(4)]
    out = {}
    for compose in (True, False):
        config = CompressConfig(train_epochs=1, reg_epochs=1, finetune_epochs=0, compose=compose, seed=0)
        out[compose] = compress(model, data, x, config=config, progress=False)
    a, b = out[True].report, out[False].report
    assert a["macs_after"] == b["macs_after"]
    ha = [r["loss"] for r in out[True].history]
    hb = [r["loss"] for r in out[False].history]
    assert ha == pytest.approx(hb, rel=1e-4)  # the same training, up to float32 re-association
    with pytest.raises(ValueError, match=r"CompressConfig.compose must be true or false"):
        CompressConfig(compose="yes")


def test_compose_factors_refuses_a_plain_module():
    with pytest.raises(TypeError, match=r"compose_factors expects a torch.fx.GraphModule"):
        compose_factors(nn.Conv2d(1, 1, 1))
