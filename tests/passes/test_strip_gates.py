"""strip_gates: thresholding, consistent slicing, plain modules left, and edge cases."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

import fxtucker
import fxtucker.passes
from fxtucker.passes import Gate, decompose_conv, insert_gates, strip_gates
from fxtucker.passes.strip_gates import floor_masks, round_rank
from tests.conftest import EXACT, REL_FLOAT64, reference, rel_error
from tests.strategies import OneConv, conv_and_input


class Net(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups)
        self.pw = nn.Conv2d(6, 5, 1)

    def forward(self, x):
        return self.pw(torch.relu(self.conv(x)))


def _gated(model):
    return insert_gates(decompose_conv(fxtucker.trace(model)))


@given(conv_and_input())
@settings(max_examples=40, deadline=None)
def test_threshold_zero_keeps_the_function(case):
    conv, x = case
    model = OneConv(conv).eval()
    ref = reference(model)
    stripped = strip_gates(_gated(model), 0.0)
    stripped.graph.lint()
    assert rel_error(stripped(x), ref(x)) < REL_FLOAT64


def test_no_gate_or_parametrization_remains():
    stripped = strip_gates(_gated(Net()), 0.0)
    assert not any(isinstance(m, Gate) for m in stripped.modules())
    assert not any(parametrize.is_parametrized(m) for m in stripped.modules())
    assert {type(m) for n, m in stripped.named_modules() if n.count(".") == 1} == {nn.Conv2d}
    assert "gate" not in str(stripped.graph)
    assert fxtucker.report(stripped).stage == "strip_gates"


def test_components_below_threshold_are_dropped_and_the_rest_is_exact():
    model = Net().double()
    gated = _gated(model)
    g = fxtucker.gates(gated)
    with torch.no_grad():
        g["conv"]["gate_in"][[0, 2]] = 0.005  # below 0.01: dropped
        g["conv"]["gate_core"][1] = 0.0  # drops output slice 1 of core and column 1 of last
        g["pw"]["gate_out"][3] = -0.009  # magnitude counts
    stripped = strip_gates(gated, 0.01)
    assert stripped.get_submodule("conv.first").weight.shape == (2, 4, 1, 1)
    assert stripped.get_submodule("conv.core").weight.shape == (5, 2, 3, 3)
    assert stripped.get_submodule("conv.last").weight.shape == (6, 5, 1, 1)
    assert stripped.get_submodule("pw.first").weight.shape[0] == 4
    assert {l.name: l.ranks for l in fxtucker.report(stripped).layers} == {"conv": (2, 5), "pw": (4,)}
    # the stripped model equals the gated model with those components zeroed
    with torch.no_grad():
        for name in ("gate_in", "gate_core"):
            g["conv"][name][g["conv"][name].abs() < 0.01] = 0.0
        g["pw"]["gate_out"][3] = 0.0
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    assert rel_error(stripped(x), gated(x)) < REL_FLOAT64


def test_grouped_layers_keep_equal_ranks_per_group():
    gated = _gated(Net(groups=2).double())
    g = fxtucker.gates(gated)["conv"]
    with torch.no_grad():
        g["gate_in"][0] = 0.0  # group 0 would keep 1 of 2, group 1 keeps 2
    stripped = strip_gates(gated, 0.01)
    assert stripped.get_submodule("conv.first").weight.shape == (4, 2, 1, 1)
    assert "same rank" in fxtucker.report(stripped).layers[0].reason
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    assert rel_error(stripped(x), gated(x)) < REL_FLOAT64  # nothing was lost: the filler is exact


def test_layer_losing_a_whole_rank_outputs_its_bias():
    model = Net().double()
    gated = _gated(model)
    with torch.no_grad():
        fxtucker.gates(gated)["pw"]["gate_in"].zero_()
    stripped = strip_gates(gated, 0.01)
    assert fxtucker.report(stripped).layers[1].ranks == (0,)
    out = stripped(torch.randn(2, 4, 5, 5, dtype=torch.float64))
    expected = model.pw.bias.detach().view(1, -1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, **EXACT)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "0.1", True])
def test_bad_threshold(bad):
    with pytest.raises(ValueError, match=r"threshold must be a finite number >= 0 \(the paper uses 0.01 to 0.02\), got"):
        strip_gates(_gated(Net()), bad)


def test_errors():
    with pytest.raises(ValueError, match=r"strip_gates found no gates: run insert_gates\(gm\) first"):
        strip_gates(decompose_conv(fxtucker.trace(Net())), 0.01)
    gated = _gated(Net())
    with torch.no_grad():
        fxtucker.gates(gated)["conv"]["gate_core"][0] = float("nan")
    with pytest.raises(ValueError, match=r"gates conv.gate_core hold NaN or Inf; the training diverged"):
        strip_gates(gated, 0.01)


def test_threshold_is_compared_in_float64():
    gated = _gated(Net())
    g = fxtucker.gates(gated)["conv"]["gate_in"]
    with torch.no_grad():
        g[0] = 0.3  # float32(0.3) is a little above 0.3 in float64
    just_above = math.nextafter(float(g[0]), math.inf)
    assert fxtucker.passes.kept_ranks(gated, float(g[0]))["conv"][0][0] == 4
    assert fxtucker.passes.kept_ranks(gated, just_above)["conv"][0][0] == 3


# round_to: kept ranks rounded up to a multiple, never above full rank, the largest gates filling in.


class Wide(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2)

    def forward(self, x):
        return self.conv(x)


def _random_wide(cin, cout, k, seed):
    """A gated one-conv model with distinct random gate magnitudes on the input and output modes (the rest at 1)."""
    gated = _gated(Wide(cin, cout, k).double())
    g = fxtucker.gates(gated)["conv"]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        g["gate_in"].copy_(torch.rand(g["gate_in"].shape, generator=gen, dtype=torch.float64))
        g["gate_out"].copy_(torch.rand(g["gate_out"].shape, generator=gen, dtype=torch.float64))
        if "gate_core" in g:
            g["gate_core"].fill_(1.0)
        else:  # an SVD pair: one score per component, |gate_in * gate_out|
            g["gate_out"].fill_(1.0)
    return gated, g


def _assert_keeps_the_largest(stripped, gated, g, ranks, cin):
    """The stripped model is the gated one with every gate outside the kept (largest) ones zeroed."""
    names = ("gate_in", "gate_out") if len(ranks) == 2 else ("gate_in",)
    with torch.no_grad():
        for name, r in zip(names, ranks):
            gate = g[name]
            if r == 0:
                gate.zero_()
            else:
                gate[gate.abs().argsort(descending=True)[r:]] = 0.0
    x = torch.randn(1, cin, 6, 6, dtype=torch.float64)
    assert rel_error(stripped(x), gated(x)) < REL_FLOAT64


@given(st.integers(3, 20), st.integers(3, 20), st.sampled_from([1, 3]), st.sampled_from([2, 3, 4, 8, 16]),
       st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_round_to_rounds_up_keeping_the_largest_gates(cin, cout, k, round_to, threshold, seed):
    gated, g = _random_wide(cin, cout, k, seed)
    full = fxtucker.report(gated).layers[0].full_ranks
    plain = fxtucker.passes.kept_ranks(gated, threshold)["conv"][0]
    rounded = fxtucker.passes.kept_ranks(gated, threshold, round_to)["conv"][0]
    for r, p, f in zip(rounded, plain, full):
        assert r == (0 if p == 0 else min(f, -(-p // round_to) * round_to))
        assert r == 0 or r == f or r % round_to == 0
    stripped = strip_gates(gated, threshold, round_to=round_to)
    assert fxtucker.report(stripped).layers[0].ranks == rounded
    _assert_keeps_the_largest(stripped, gated, g, rounded, cin)


def test_round_to_is_noted_in_the_report_and_never_exceeds_full_rank():
    gated = _gated(Wide(20, 24, 3).double())
    g = fxtucker.gates(gated)["conv"]
    with torch.no_grad():
        g["gate_in"][5:] = 0.001  # 5 of 20 input components survive 0.01
    stripped = strip_gates(gated, 0.01, round_to=8)
    assert stripped.get_submodule("conv.first").weight.shape[0] == 8
    assert fxtucker.report(stripped).layers[0].ranks == (8, 24)
    assert "round ranks up to a multiple of 8" in fxtucker.report(stripped).layers[0].reason
    assert fxtucker.report(strip_gates(gated, 0.01, round_to=16)).layers[0].ranks == (16, 24)
    assert fxtucker.report(strip_gates(gated, 0.01, round_to=32)).layers[0].ranks == (20, 24)  # capped at full
    assert fxtucker.report(strip_gates(gated, 0.01, round_to=1)).layers[0].ranks == (5, 24)


@pytest.mark.parametrize("bad", [0, -8, 2.5, "8", True])
def test_bad_round_to(bad):
    with pytest.raises(ValueError, match=r"round_to must be None or an int >= 1 \(e.g. 8 or 16"):
        strip_gates(_gated(Net()), 0.01, round_to=bad)
    with pytest.raises(ValueError, match=r"round_to must be None or an int >= 1"):
        fxtucker.passes.kept_ranks(_gated(Net()), 0.01, round_to=bad)


@given(st.integers(2, 70), st.integers(2, 70), st.sampled_from([1, 3]), st.floats(0.05, 1.0), st.sampled_from([1, 4, 8, 16]))
@settings(max_examples=40, deadline=None)
def test_decompose_conv_rounds_fractional_ranks(cin, cout, k, frac, round_to):
    model = Wide(cin, cout, k)
    plain = fxtucker.report(decompose_conv(fxtucker.trace(model), ranks=frac)).layers[0]
    rounded = fxtucker.report(decompose_conv(fxtucker.trace(model), ranks=frac, round_to=round_to)).layers[0]
    for r, p, f in zip(rounded.ranks, plain.ranks, rounded.full_ranks):
        assert r == min(f, -(-p // round_to) * round_to)


def test_decompose_conv_round_to_errors():
    gm = fxtucker.trace(Net())
    with pytest.raises(ValueError, match=r"round_to=8 applies to fractional ranks only \(a float in \(0, 1\]\), not to ranks='vbmf'"):
        decompose_conv(gm, ranks="vbmf", round_to=8)
    with pytest.raises(ValueError, match=r"round_to=8 applies to fractional ranks only"):
        decompose_conv(gm, ranks={"conv": (2, 2)}, round_to=8)
    with pytest.raises(ValueError, match=r"round_to must be None or an int >= 1"):
        decompose_conv(gm, ranks=0.5, round_to=0)
    with pytest.raises(ValueError, match=r"pass round_to to plan_decomposition"):
        decompose_conv(fxtucker.passes.plan_decomposition(gm, 0.5), use_plan=True, round_to=8)
    assert fxtucker.report(decompose_conv(gm, round_to=4)).layers[0].ranks == (4, 6)  # full rank: nothing to round


@given(st.integers(3, 20), st.integers(3, 20), st.sampled_from([1, 3]), st.floats(0.0, 0.99),
       st.floats(0.0, 1.0), st.sampled_from([None, 2, 4, 8]), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_rank_floor_keeps_the_largest_gates_of_every_mode(cin, cout, k, rank_floor, threshold, round_to, seed):
    gated, g = _random_wide(cin, cout, k, seed)
    full = fxtucker.report(gated).layers[0].full_ranks
    plain = fxtucker.passes.kept_ranks(gated, threshold)["conv"][0]
    floored = fxtucker.passes.kept_ranks(gated, threshold, round_to, rank_floor=rank_floor)["conv"][0]
    for r, p, f in zip(floored, plain, full):  # the floor first, then rounded up as round_to rounds
        assert r == round_rank(max(p, math.ceil(rank_floor * f - 1e-9)), round_to, f)
    stripped = strip_gates(gated, threshold, round_to, rank_floor=rank_floor)
    assert fxtucker.report(stripped).layers[0].ranks == floored
    reason = fxtucker.report(stripped).layers[0].reason
    assert ("rank_floor" in reason) == any(math.ceil(rank_floor * f - 1e-9) > p for p, f in zip(plain, full))
    _assert_keeps_the_largest(stripped, gated, g, floored, cin)


def test_rank_floor_counts_per_group_and_scores_the_output_mode_by_both_gates():
    gated = _gated(Net(groups=2).double())  # conv: 2 groups, ranks (2, 3) per group
    g = fxtucker.gates(gated)["conv"]
    with torch.no_grad():
        g["gate_in"].copy_(torch.tensor([0.1, 0.0, 0.0, 0.2]))
        g["gate_out"].copy_(torch.tensor([1.0, 2.0, 0.5, 0.3, 0.0, 3.0]))
        g["gate_core"].copy_(torch.tensor([1.0, 0.1, 1.0, 1.0, 1.0, 1.0]))  # output 1 scores 0.2, under output 2's 0.5
    masks = floor_masks(gated.get_submodule("conv"), 0.5)
    assert masks["gate_in"].tolist() == [True, False, False, True]  # ceil(0.5 x 2) = 1 per group
    assert masks["gate_out"].tolist() == masks["gate_core"].tolist() == [True, False, True, True, False, True]
    assert not floor_masks(gated.get_submodule("conv"), 0.0)["gate_in"].any()
    # The threshold alone keeps no input component and outputs (0, 2) and (5) of the groups.
    assert fxtucker.passes.kept_ranks(gated, 0.5)["conv"][0] == (0, 2)
    stripped = strip_gates(gated, 0.5, rank_floor=0.5)
    assert fxtucker.report(stripped).layers[0].ranks == (1, 2)
    assert stripped.get_submodule("conv.first").weight.shape[0] == 2  # one input component per group
    assert "rank_floor=0.5" in fxtucker.report(stripped).layers[0].reason


@pytest.mark.parametrize("bad", [-0.1, 1.0, math.nan, "0.2", True])
def test_bad_rank_floor(bad):
    with pytest.raises(ValueError, match=r"rank_floor must be a number in \[0, 1\) \(the share of each mode's rank"):
        strip_gates(_gated(Net()), 0.01, rank_floor=bad)
    with pytest.raises(ValueError, match=r"rank_floor must be a number in \[0, 1\)"):
        fxtucker.passes.kept_ranks(_gated(Net()), 0.01, rank_floor=bad)
