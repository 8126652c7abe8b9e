"""Regression tests for defects found in review: each failed before its fix."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxtucker
from fxtucker.passes import (cost_model, decompose_conv, fold_bn, fold_or_restore, insert_gates, plan_decomposition,
                             predict_macs, strip_gates)
from fxtucker.passes.plan_decomposition import full_ranks
from tests.conftest import EXACT, REL_FLOAT64, rel_error
from tests.strategies import Twice


def test_conv_whose_weight_is_also_read_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + self.conv.weight.sum()

    model = M().double()
    with pytest.warns(UserWarning, match="left 1 layer"):
        gm = decompose_conv(fxtucker.trace(model))
    assert "its parameters are also read directly (conv.weight)" in fxtucker.report(gm).layers[0].reason
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(gm(x), model(x))


def test_edited_plan_cannot_force_an_unsafe_decomposition():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    gm = plan_decomposition(fxtucker.trace(model))
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    full = full_ranks(model[0])
    node.meta["fxtucker"] = dataclasses.replace(node.meta["fxtucker"], kind="tucker2", full_ranks=full, ranks=full, reason="")
    with pytest.raises(ValueError, match=r"the plan asks to decompose '0', which cannot be: it has hooks registered"):
        decompose_conv(gm, use_plan=True)


def test_call_sites_of_one_module_need_one_plan():
    gm = plan_decomposition(fxtucker.trace(Twice()))
    second = [n for n in gm.graph.nodes if n.op == "call_module"][1]
    second.meta["fxtucker"] = dataclasses.replace(second.meta["fxtucker"], kind="skip", reason="user")
    with pytest.raises(ValueError, match=r"the call sites of 'conv' \(\['conv', 'conv_1'\]\) carry different plans"):
        decompose_conv(gm, use_plan=True)


def test_unused_conv_output_is_skipped_not_reported_decomposed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)

        def forward(self, x):
            self.conv(x)
            return self.c2(x)

    with pytest.warns(UserWarning, match="its output is never used"):
        gm = decompose_conv(fxtucker.trace(M()))
    assert {l.name: l.decision for l in fxtucker.report(gm).layers} == {"conv": "skipped", "c2": "decomposed"}


def test_frozen_layers_stay_frozen_and_modes_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)).eval()
    model[0].requires_grad_(False)
    gm = decompose_conv(fxtucker.trace(model))
    assert not any(p.requires_grad for p in gm.get_submodule("0").parameters())
    assert all(p.requires_grad for p in gm.get_submodule("1").parameters())
    assert not any(m.training for m in gm.modules())


def test_uninitialised_lazy_conv_gets_a_clear_reason():
    model = nn.Sequential(nn.LazyConv2d(4, 3))
    with pytest.warns(UserWarning):
        gm = decompose_conv(fxtucker.trace(model))
    assert "uninitialised; run one forward pass before tracing" in fxtucker.report(gm).layers[0].reason


def test_strip_gates_drops_stale_costs():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU())
    x = torch.randn(1, 4, 6, 6)
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    with torch.no_grad():
        fxtucker.gates(gated)["0"]["gate_core"][:4] = 0
    stripped = strip_gates(gated, 0.01)
    factors = [n for n in stripped.graph.nodes if n.op == "call_module" and n.target.startswith("0.")]
    assert factors and all("macs" not in n.meta and "tensor_meta" not in n.meta for n in factors)


def test_cost_model_with_keyword_arguments():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
            self.w = nn.Parameter(torch.randn(2, 3, 2, 2))

        def forward(self, x):
            y = self.up(input=x)
            return F.conv_transpose2d(input=y, weight=self.w)

    x = torch.randn(1, 4, 3, 3)
    # up: 1*4*3*3 inputs x 2*2*2 ; functional: 1*2*6*6 inputs x 3*2*2
    assert fxtucker.count_macs(M(), x) == 36 * 8 + 72 * 12


def test_missing_layer_record_is_an_error_not_a_wrong_number():
    model = nn.Sequential(nn.Conv2d(4, 8, 3))
    x = torch.randn(1, 4, 6, 6)
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    gated.meta.clear()
    with pytest.raises(ValueError, match=r"no fxtucker layer record for \['0'\]: gm.meta\['fxtucker'\] is missing"):
        predict_macs(gated, 0.0)
    with pytest.raises(ValueError, match=r"no fxtucker layer record"):
        fold_or_restore(strip_gates(gated, 0.0), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_balance_of_half_precision_factors_keeps_live_slices(dtype):
    # insert_gates' balance zeroed core slices below a numerical-rank tolerance taken from the
    # storage dtype's eps times the slice size: for fp16/bf16 that is above most slice norms, so
    # live components were zeroed (bf16: 49% output change on a 3-conv net). The factors are
    # computed in float32, and so is the tolerance now.
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    with torch.no_grad():  # input-mode spectrum decaying from 1 to ~0.03
        conv.weight.mul_((0.8 ** torch.arange(16.0)).view(1, -1, 1, 1))
    model = nn.Sequential(conv).eval().to(dtype)
    x = torch.randn(1, 16, 6, 6).to(dtype)
    gated = insert_gates(decompose_conv(fxtucker.trace(model)))
    ref = copy.deepcopy(model).float()
    assert rel_error(gated(x).float(), ref(x.float())) < (5e-3 if dtype == torch.float16 else 3e-2)
    assert (fxtucker.gates(gated)["0"]["gate_in"] > 0).all()


# --- issue 16: hostile inputs and faults ----------------------------------------------------------


def _two_convs():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                         nn.Conv2d(6, 4, 1)).double().eval()


def test_decompose_conv_twice_leaves_the_factors_alone():
    model, x = _two_convs(), torch.randn(2, 3, 7, 7, dtype=torch.float64)
    once = decompose_conv(cost_model(fxtucker.trace(model), x), 0.5)
    twice = decompose_conv(once, 0.5)
    assert str(twice.graph) == str(once.graph)  # no factor of a factor
    assert fxtucker.report(twice).layers == fxtucker.report(once).layers  # one record per original layer
    torch.testing.assert_close(twice(x), once(x))
    with pytest.raises(ValueError, match=r"ranks names '0.core' \(a factor of '0'\), already decomposed by an earlier "
                                         r"decompose_conv"):
        decompose_conv(once, {"0.core": (2, 2)})
    final = fold_or_restore(strip_gates(insert_gates(twice), 0.0), x)
    assert {r.name for r in fxtucker.report(final).layers} == {"0", "2", "3"}


@pytest.mark.parametrize("ranks", [0.5, None], ids=["kept", "restored"])
def test_frozen_parameters_stay_frozen_through_the_chain(ranks):
    model, x = _two_convs(), torch.randn(1, 3, 7, 7, dtype=torch.float64)
    model.requires_grad_(False)
    gated = insert_gates(decompose_conv(cost_model(fxtucker.trace(model), x), ranks))
    for name, p in gated.named_parameters():
        if "gate" not in name:
            assert not p.requires_grad, name
    gated.requires_grad_(False)
    stripped = strip_gates(gated, 0.0)
    assert not [n for n, p in stripped.named_parameters() if p.requires_grad]
    assert not [n for n, p in fold_or_restore(stripped, x).named_parameters() if p.requires_grad]
    # and trainable ones stay trainable
    trainable = strip_gates(insert_gates(decompose_conv(fxtucker.trace(_two_convs()), 0.5)), 0.0)
    assert all(p.requires_grad for p in trainable.parameters())


def test_passes_never_change_the_callers_inputs():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            x.mul_(2)
            return self.conv(x)

    model = InPlace().double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    before = x.clone()
    gm = cost_model(fxtucker.trace(model), x)
    final = fold_or_restore(strip_gates(insert_gates(decompose_conv(gm, 0.5)), 0.0), x)
    fold_or_restore(decompose_conv(gm, 0.5), x, cost="latency", threads=1)
    fxtucker.count_macs(final, x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape", [(0, 3, 7, 7), (2, 3, 0, 7)], ids=["batch-0", "height-0"])
def test_empty_example_inputs_are_refused(shape):
    model = _two_convs()
    empty = torch.randn(*shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"example input 0 has shape \({', '.join(map(str, shape))}\): it holds no "
                                         rf"elements, so every layer would cost 0 MACs"):
        cost_model(fxtucker.trace(model), empty)
    decomposed = decompose_conv(cost_model(fxtucker.trace(model), torch.randn(1, 3, 7, 7, dtype=torch.float64)), 0.5)
    with pytest.raises(ValueError, match=r"it holds no elements"):
        fold_or_restore(decomposed, empty)
    from fxtucker.latency import measure_latency

    with pytest.raises(ValueError, match=r"measure_latency: example input 0 has shape .*: it holds no elements"):
        measure_latency(model, empty)


class _FunctionalOnly(nn.Module):
    """Nothing decomposable: a functional conv on a parameter also read elsewhere and a weight-standardized conv."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.ws = nn.Conv2d(4, 5, 3)

    def forward(self, x):
        x = F.conv2d(x, self.w) + self.w.mean()
        w = self.ws.weight - self.ws.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.ws.bias)


def test_a_model_with_nothing_to_decompose_goes_through_the_chain_unchanged():
    model = _FunctionalOnly().double().eval()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"decompose_conv left 2 layer\(s\) as they are"):
        decomposed = decompose_conv(cost_model(fxtucker.trace(model), x))
    final = fold_bn(fold_or_restore(strip_gates(insert_gates(decomposed), 0.01), x))
    torch.testing.assert_close(final(x), model(x), **EXACT)
    layers = fxtucker.report(final).layers
    assert [r.decision for r in layers] == ["skipped", "skipped"]
    assert "its weight is also read by other nodes (mean read 'w')" in layers[0].reason
    assert "its weight is computed in forward (node 'sub')" in layers[1].reason
    assert fxtucker.gates(insert_gates(decomposed)) == {}
    # passes run out of order still say so
    with pytest.raises(ValueError, match=r"insert_gates found no decomposed layers: run decompose_conv\(gm\) first"):
        insert_gates(fxtucker.trace(model))
