"""strip_gates(relative=True): gates compared with the threshold times their vector's mean magnitude."""

import torch
import torch.nn as nn

import fxtucker
from fxtucker.passes import cost_model, count_macs, decompose_conv, fold_or_restore, insert_gates, predict_macs
from fxtucker.passes.strip_gates import kept_ranks, relative_gates, strip_gates


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)

    def forward(self, x):
        return self.bn(self.conv(x))


def _gated(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2, 8, 6, 6)
    return cost_model(insert_gates(decompose_conv(fxtucker.trace(Net().eval()))), x), x


def test_relative_gates_divide_by_the_mean_magnitude():
    g = torch.tensor([-2.0, 1.0, 0.0, 1.0])
    assert torch.equal(relative_gates(g), torch.tensor([2.0, 1.0, 0.0, 1.0]))
    assert torch.equal(relative_gates(torch.zeros(3)), torch.zeros(3))


def test_scaling_a_gate_vector_does_not_change_what_relative_stripping_keeps():
    gm, x = _gated()
    gates = fxtucker.gates(gm)["conv"]
    with torch.no_grad():
        gates["gate_in"].copy_(torch.linspace(0.01, 1.0, gates["gate_in"].numel()))
    before = kept_ranks(gm, 0.5, relative=True)
    absolute = kept_ranks(gm, 0.5)
    with torch.no_grad():
        for g in gates.values():
            g.mul_(1e-3)  # what a BatchNorm after the layer lets training do for free
    assert kept_ranks(gm, 0.5, relative=True) == before
    assert kept_ranks(gm, 0.5) != absolute  # absolute thresholds now cut everything
    mean = gates["gate_in"].detach().abs().mean()
    kept_in = int((gates["gate_in"].detach().abs() >= 0.5 * mean).sum())
    assert before["conv"][0][0] == kept_in


def test_relative_stripping_keeps_the_function_of_what_it_keeps_and_predicts_macs():
    gm, x = _gated(1)
    with torch.no_grad():
        for g in fxtucker.gates(gm)["conv"].values():
            g.mul_(torch.rand_like(g))
    for th in (0.0, 0.3, 0.8, 1.5):
        stripped = strip_gates(gm, th, relative=True)
        final = fold_or_restore(stripped, x)
        assert torch.allclose(final(x), stripped(x), atol=1e-5)
        assert predict_macs(gm, th, relative=True) == count_macs(final, x)
