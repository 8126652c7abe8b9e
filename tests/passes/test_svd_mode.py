"""decompose_conv(method="svd"): kxk convs as SVD pairs (a kxk ``first``, a 1x1 ``last``) through the chain.

The paper's Table 4 compares this with Tucker-2. Each test checks the SVD pair against the maths
(torch.linalg.svd of the kernel reshaped to (C_out/g, C_in/g * k)) or against the original function.
"""

import dataclasses
import importlib
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtucker
from fxtucker.export import export, load, read_manifest
from fxtucker.meta import FactorRecord, LayerPlan, graph_record
from fxtucker.passes import (
    cost_model,
    decompose_conv,
    fold_bn,
    fold_or_restore,
    insert_gates,
    kept_ranks,
    plan_decomposition,
    predict_macs,
    strip_gates,
)
from fxtucker.passes.fold_or_restore import dense_module
from fxtucker.passes.forms import ChannelsLinear, is_pointwise
from tests.conftest import ATOL_FLOAT64, EXACT, REL_CHAIN_FLOAT64, REL_FLOAT64, REL_FOLD_FLOAT32, factor_roles, reference, rel_error
from tests.strategies import OneConv, TwoConvs, conv_and_input

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths:UserWarning")

TIME_MODULE = importlib.import_module("fxtucker.passes.time_forms")  # where plan_forms looks up time_chain


def _truncated_svd(w: torch.Tensor, groups: int, rank: int) -> torch.Tensor:
    """The kernel whose every group is the rank-``rank`` truncated SVD of (C_out/g, C_in/g * k), by torch.linalg.svd."""
    parts = []
    for wg in w.double().reshape(groups, w.shape[0] // groups, *w.shape[1:]):
        u, s, vh = torch.linalg.svd(wg.reshape(wg.shape[0], -1), full_matrices=False)
        parts.append((u[:, :rank] * s[:rank] @ vh[:rank]).reshape(wg.shape))
    return torch.cat(parts)


class Net(nn.Module):
    """A 3x3 conv with BatchNorm, a grouped 3x3 with stride and dilation, a 1x1 and a Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect")
        self.p = nn.Conv2d(24, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.a(x)))
        x = torch.relu(self.b(x))
        return self.fc(self.p(x).mean((2, 3)))


def _net(dtype=torch.float64):
    torch.manual_seed(0)
    model = Net().to(dtype).eval()
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.5)
        model.bn.running_var.uniform_(0.3, 3.0)
        model.bn.weight.normal_(1, 0.5)
        model.bn.bias.normal_(0, 0.5)
    return model, torch.randn(2, 3, 12, 12, dtype=dtype)


# --- decompose_conv -------------------------------------------------------------------------------


@given(conv_and_input())
@settings(max_examples=60, deadline=None)
def test_full_rank_preserves_function_float64(case):
    """Any conv (1d/2d/3d, stride, padding and padding modes, dilation, groups, bias) at full rank R."""
    conv, x = case
    model = OneConv(conv).eval()
    ref = reference(model)
    gm = decompose_conv(fxtucker.trace(model), method="svd")
    gm.graph.lint()
    assert rel_error(gm(x), ref(x)) < REL_FLOAT64
    assert [r for _, r in factor_roles(gm)] == ["first", "last"] * 2
    first, last = gm.get_submodule("conv.first"), gm.get_submodule("conv.last")
    group = (conv.out_channels // conv.groups, conv.in_channels // conv.groups * math.prod(conv.kernel_size))
    r = min(group)
    assert (first.in_channels, first.out_channels, last.in_channels, last.out_channels) == (
        conv.in_channels, conv.groups * r, conv.groups * r, conv.out_channels)
    assert (first.kernel_size, first.stride, first.padding, first.dilation, first.groups, first.padding_mode) == (
        conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    assert last.kernel_size == (1,) * len(conv.kernel_size) and last.stride == (1,) * len(conv.kernel_size)
    assert first.bias is None and (last.bias is None) == (conv.bias is None)
    layer = fxtucker.report(gm).layers[0]
    assert (layer.kind, layer.full_ranks, layer.ranks, layer.decision) == ("svd", (r,), (r,), "decomposed")


@given(conv_and_input(dtype=torch.float32))
@settings(max_examples=20, deadline=None)
def test_full_rank_preserves_function_float32(case):
    conv, x = case
    model = OneConv(conv).eval()
    ref = reference(model)
    assert rel_error(decompose_conv(fxtucker.trace(model), method="svd")(x), ref(x)) < 1e-5


def test_graph_names_and_records():
    model, x = _net()
    gm = decompose_conv(fxtucker.trace(model), method="svd", linear=True)
    assert factor_roles(gm) == [("a_first", "first"), ("a_last", "last"), ("b_first", "first"), ("b_last", "last"),
                          ("p_first", "first"), ("p_last", "last"), ("fc_first", "first"), ("fc_last", "last")]
    assert "core" not in dict(gm.named_modules())["b"]
    b = {l.name: l for l in fxtucker.report(gm).layers}["b"]
    # per group: (24/2, 16/2 * 3 * 3) = (12, 72), so R = 12
    assert (b.kind, b.full_ranks, b.ranks, b.spec.kernel_size) == ("svd", (12,), (12,), (3, 3))
    node = next(n for n in gm.graph.nodes if n.name == "b_first")
    assert node.meta["fxtucker"] == FactorRecord(source="b", role="first", ranks=(12,), replaces="b")
    assert rel_error(gm(x), model(x)) < REL_FLOAT64
    # 1x1 convs and Linear layers are SVD pairs under either method: the same factors
    tucker = decompose_conv(fxtucker.trace(model), linear=True)
    for name in ("p.first", "p.last", "fc.first", "fc.last"):
        torch.testing.assert_close(gm.get_submodule(name).weight, tucker.get_submodule(name).weight, **EXACT)


@pytest.mark.parametrize("groups", [1, 2])
def test_truncated_kernel_is_the_truncated_svd_of_the_reshaped_kernel(groups):
    conv = nn.Conv2d(6, 10, 3, padding=1, groups=groups).double()
    gm = decompose_conv(fxtucker.trace(OneConv(conv)), ranks={"conv": 2}, method="svd")
    rec = fxtucker.report(gm).layers[0]
    assert rec.ranks == (2,) and gm.get_submodule("conv.first").weight.shape == (2 * groups, 6 // groups, 3, 3)
    kernel = dense_module(gm.get_submodule("conv"), rec.spec).weight.detach()
    torch.testing.assert_close(kernel, _truncated_svd(conv.weight.detach(), groups, 2), rtol=0, atol=ATOL_FLOAT64)
    # and the module computes the conv with that kernel
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(gm.conv.last(gm.conv.first(x)), F.conv2d(x, kernel, conv.bias, padding=1, groups=groups),
                               rtol=0, atol=ATOL_FLOAT64)


def test_fraction_vbmf_round_to_and_callable_ranks():
    conv = nn.Conv2d(8, 20, 3).double()  # matrix (20, 72): R = 20
    model = OneConv(conv)
    gm = fxtucker.trace(model)
    rank = lambda d: fxtucker.report(d).layers[0].ranks  # noqa: E731
    assert rank(decompose_conv(gm, 0.5, method="svd")) == (10,)
    assert rank(decompose_conv(gm, 0.3, method="svd", round_to=8)) == (8,)
    assert rank(decompose_conv(gm, 0.9, method="svd", round_to=8)) == (20,)  # never above full rank
    assert rank(decompose_conv(gm, lambda name, m: 3, method="svd")) == (3,)
    assert rank(decompose_conv(gm, {"conv": (4,)}, method="svd")) == (4,)
    # EVBMF of the reshaped kernel: a rank-3 kernel plus a little noise
    with torch.no_grad():
        low = torch.randn(20, 3, dtype=torch.float64) @ torch.randn(3, 72, dtype=torch.float64)
        conv.weight.copy_((low + 1e-3 * torch.randn(20, 72, dtype=torch.float64)).reshape(20, 8, 3, 3))
    want = max(1, fxtucker.tucker.evbmf(conv.weight.detach().reshape(20, -1)))
    assert want == 3 and rank(decompose_conv(fxtucker.trace(model), "vbmf", method="svd")) == (3,)


def test_depthwise_is_skipped_under_either_method():
    """One input channel per group is left alone by both methods, so both decompose the same layers."""
    model = OneConv(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) as they are: 1 x one input channel per group"):
        gm = decompose_conv(fxtucker.trace(model), method="svd")
    assert fxtucker.report(gm).layers[0].decision == "skipped"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="tt"), r"decompose_conv: method='tt' is not known; valid: 'tucker2', 'svd'"),
        (dict(method=None), r"decompose_conv: method=None is not known; valid: 'tucker2', 'svd'"),
        (dict(method="SVD"), r"method='SVD' is not known"),
        (dict(ranks={"a": 3}), r"ranks for 'a' \(Conv2d, decomposed by tucker2\) must be a pair \(R1, R2\), got 3; "
                               r"or pass method='svd' to decompose kxk convs as SVD pairs of rank R"),
        (dict(ranks={"a": (2, 2)}, method="svd"), r"ranks for 'a' \(Conv2d, decomposed by svd\) must be an int R or "
                                                  r"\(R,\), got \(2, 2\)$"),
        (dict(ranks={"a": 28}, method="svd"), r"ranks \(28,\) for 'a' out of range: valid are 1 <= R <= 16"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decompose_conv(fxtucker.trace(_net()[0]), **kwargs)


def test_plan_with_the_method_and_edited_kinds():
    model, x = _net()
    gm = plan_decomposition(fxtucker.trace(model), method="svd")
    node = next(n for n in gm.graph.nodes if n.name == "b")
    assert node.meta["fxtucker"] == LayerPlan(source="b", kind="svd", full_ranks=(12,), ranks=(12,))
    with pytest.raises(ValueError, match=r"plan_decomposition: method='x' is not known; valid: 'tucker2', 'svd'"):
        plan_decomposition(fxtucker.trace(model), method="x")
    with pytest.raises(ValueError, match=r"use_plan=True\) applies the plans as they are: pass method='svd' to "
                                         r"plan_decomposition\(gm, ranks, method=...\) instead"):
        decompose_conv(gm, use_plan=True, method="svd")
    d = decompose_conv(gm, use_plan=True)
    assert [r for n, r in factor_roles(d) if n.startswith("b_")] == ["first", "last"]
    # a kxk conv's plan may switch kind, with full ranks and ranks that fit it
    node.meta["fxtucker"] = LayerPlan(source="b", kind="tucker2", full_ranks=(8, 12), ranks=(4, 6))
    d = decompose_conv(gm, use_plan=True)
    assert d.get_submodule("b.core").weight.shape == (2 * 6, 4, 3, 3)  # (groups * R2, R1, k, k)
    assert d.get_submodule("a.first").kernel_size == (3, 3)  # a stays an SVD pair
    assert {l.name: l.kind for l in fxtucker.report(d).layers} == {"a": "svd", "b": "tucker2", "p": "svd"}
    node.meta["fxtucker"] = LayerPlan(source="b", kind="svd", full_ranks=(8, 12), ranks=(4,))
    with pytest.raises(ValueError, match=r"the plan for 'b' \(.*\) does not fit Conv2d: it must have kind 'tucker2' "
                                         r"with full_ranks \(8, 12\) or kind 'svd' with full_ranks \(12,\)"):
        decompose_conv(gm, use_plan=True)
    p = next(n for n in gm.graph.nodes if n.name == "p")
    node.meta["fxtucker"] = LayerPlan(source="b", kind="svd", full_ranks=(12,), ranks=(12,))
    p.meta["fxtucker"] = dataclasses.replace(p.meta["fxtucker"], kind="tucker2", full_ranks=(12, 12))
    with pytest.raises(ValueError, match=r"the plan for 'p' \(.*\) does not fit Conv2d: it must have kind 'svd' with "
                                         r"full_ranks \(12,\)$"):
        decompose_conv(gm, use_plan=True)


# --- gates, stripping, folding --------------------------------------------------------------------


def test_gates_insert_strip_fold_round_trip_at_full_rank():
    model, x = _net()
    want = model(x)
    gm = cost_model(fxtucker.trace(model), x)
    gated = insert_gates(decompose_conv(gm, method="svd"))
    assert set(fxtucker.gates(gated)["b"]) == {"gate_in", "gate_out"}
    assert fxtucker.gates(gated)["b"]["gate_in"].shape == (24,)  # 2 groups x R = 12
    assert rel_error(gated(x), want) < REL_CHAIN_FLOAT64
    stripped = strip_gates(gated, 0.0)
    assert not any(isinstance(m, fxtucker.passes.Gate) for m in stripped.modules())
    assert type(stripped.get_submodule("b.first")) is nn.Conv2d and stripped.b.first.kernel_size == (3, 3)
    assert not nn.utils.parametrize.is_parametrized(stripped.b.first)
    assert rel_error(stripped(x), want) < REL_CHAIN_FLOAT64
    final = fold_or_restore(stripped, x)
    assert rel_error(final(x), want) < REL_CHAIN_FLOAT64
    # at full rank every SVD pair costs more than its conv: all are restored under their own names
    assert {l.name: l.decision for l in fxtucker.report(final).layers} == {"a": "restored", "b": "restored", "p": "restored"}
    assert final.code == fxtucker.trace(model).code


@pytest.mark.parametrize("groups", [1, 2])
def test_stripping_matches_a_directly_truncated_decomposition(groups):
    """Gates start at the singular values; a threshold between the 3rd and 4th keeps the rank-3 truncation."""
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=groups).double()
    model = OneConv(conv).eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    gated = insert_gates(decompose_conv(fxtucker.trace(model), method="svd"))
    sigma = torch.stack([torch.linalg.svdvals(wg.reshape(wg.shape[0], -1))
                         for wg in conv.weight.detach().reshape(groups, 12 // groups, 8 // groups, 3, 3)])
    threshold = float(sigma[:, 2:4].mean())
    assert (sigma[:, 2] > threshold).all() and (sigma[:, 3] < threshold).all() and threshold < 1  # gate_out starts at 1
    assert kept_ranks(gated, threshold)["conv"] == ((3,), (3,))
    stripped = strip_gates(gated, threshold)
    assert stripped.get_submodule("conv.first").weight.shape == (3 * groups, 8 // groups, 3, 3)
    direct = decompose_conv(fxtucker.trace(model), ranks={"conv": 3}, method="svd")
    assert rel_error(stripped(x), direct(x)) < REL_FLOAT64
    rec = fxtucker.report(stripped).layers[0]
    assert rec.ranks == (3,)
    kernel = dense_module(stripped.get_submodule("conv"), rec.spec).weight.detach()
    torch.testing.assert_close(kernel, _truncated_svd(conv.weight.detach(), groups, 3), rtol=0, atol=ATOL_FLOAT64)


def test_strip_relative_and_round_to_with_predicted_macs():
    model, x = _net()
    gated = cost_model(insert_gates(decompose_conv(cost_model(fxtucker.trace(model), x), method="svd",
                                                   linear=True)), x)
    with torch.no_grad():
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(torch.rand(gate.shape, dtype=gate.dtype))
    for threshold, round_to, relative in [(0.5, None, False), (0.5, 4, False), (0.8, 4, True), (0.3, None, True)]:
        ranks = kept_ranks(gated, threshold, round_to, relative=relative)
        stripped = strip_gates(gated, threshold, round_to, relative=relative)
        for name, (kept, built) in ranks.items():
            first = stripped.get_submodule(f"{name}.first")
            groups = getattr(first, "groups", 1)
            assert first.weight.shape[0] == groups * built[0]
            assert graph_record(stripped).layer(name).ranks == kept
            if round_to:
                full = graph_record(gated).layer(name).full_ranks
                assert all(k % round_to == 0 or k in (0, f) for k, f in zip(kept, full))
        assert stripped.get_submodule("b.first").kernel_size == (3, 3)
        final = fold_or_restore(stripped, x)
        assert rel_error(final(x), stripped(x)) < REL_CHAIN_FLOAT64
        assert predict_macs(gated, threshold, round_to, relative=relative) == fxtucker.count_macs(final, x)


def test_fold_or_restore_follows_the_macs_of_a_kxk_first():
    model = TwoConvs().double().eval()
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    gm = cost_model(fxtucker.trace(model), x)
    decomposed = decompose_conv(gm, ranks={"a": 4, "b": 15}, method="svd")
    cost_model(decomposed, x)
    # the cost model counts the kxk first: 64 positions x R x 16 x 9, then last: 64 x 16 x R
    a_first = next(n for n in decomposed.graph.nodes if n.name == "a_first")
    assert a_first.meta["macs"] == 64 * 4 * 16 * 9 and a_first.meta["params"] == 4 * 16 * 9
    final = fold_or_restore(decomposed, x)
    rep = {l.name: l for l in fxtucker.report(final).layers}
    dense = 64 * 16 * 16 * 9
    assert (rep["a"].decision, rep["a"].macs_before, rep["a"].macs_after) == ("decomposed", dense, 64 * 4 * (16 * 9 + 16))
    assert (rep["b"].decision, rep["b"].macs_after) == ("restored", dense)  # 64 x 15 x 160 > 64 x 16 x 144
    assert "factors would cost 153,600 MACs >= 147,456 of the original; dense kernel rebuilt" in rep["b"].reason
    assert type(final.b) is nn.Conv2d and [n.name for n in final.graph.nodes if n.target == "b"] == ["b"]
    # the restored kernel is sum_r last[o, r] first[r, i, kh, kw]: the rank-15 truncation of b
    torch.testing.assert_close(final.b.weight, _truncated_svd(model.b.weight.detach(), 1, 15), rtol=0, atol=ATOL_FLOAT64)
    assert final.b.bias is not model.b.bias and torch.equal(final.b.bias, model.b.bias)
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT64
    assert fxtucker.count_macs(final, x) == 64 * 4 * (16 * 9 + 16) + dense


@given(conv_and_input(), st.sampled_from(["dense", "svd"]), st.floats(0.3, 1.0))
@settings(max_examples=30, deadline=None)
def test_latency_forms_keep_the_function(case, form, frac):
    conv, x = case
    model = OneConv(conv).eval()
    decomposed = decompose_conv(cost_model(fxtucker.trace(model), x), ranks=frac, method="svd")
    timed = []

    def fake_time(chain, *args):
        timed.append(len(chain))
        if any(isinstance(m, ChannelsLinear) for m in chain):
            return 3.0  # the +linear variants lose
        return 1.0 if (len(chain) == 1) == (form == "dense") else 2.0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TIME_MODULE, "time_chain", fake_time)
        final = fold_or_restore(decomposed, x, cost="latency")
    final.graph.lint()
    layer = fxtucker.report(final).layers[0]
    # A form with a pointwise conv (1x1, stride 1, no padding, ungrouped) also comes as +linear.
    factors = decomposed.get_submodule(layer.name)
    dense_pw, svd_pw = is_pointwise(conv), any(is_pointwise(m) for m in factors.children())
    want = {"dense", "svd"} | ({"dense+linear"} if dense_pw else set()) | ({"svd+linear"} if svd_pw else set())
    assert set(dict(layer.timings_ms)) == want
    assert sorted(timed) == sorted([1, 1] * (1 + dense_pw) + [2, 2] * (1 + svd_pw))  # two call sites
    assert (layer.form, layer.decision) == (form, "restored" if form == "dense" else "decomposed")
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT64
    assert layer.macs_after == fxtucker.count_macs(final, x)


def test_fold_bn_into_the_last_factor():
    model, x = _net()
    want = model(x)
    final = fold_or_restore(decompose_conv(cost_model(fxtucker.trace(model), x), ranks={"a": 2}, method="svd"), x)
    assert fxtucker.report(final).layers[0].decision == "decomposed"
    folded = fold_bn(final)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert graph_record(folded).batchnorms[0].conv == "a.last"
    assert graph_record(folded).layer("a").spec.bias is True
    assert rel_error(folded(x), final(x)) < REL_FOLD_FLOAT32
    assert rel_error(final(x), want) > 1e-3  # rank 2 of 16 is not the original: the comparison above is not vacuous


def test_report_lists_svd_layers():
    model, x = _net()
    final = fold_or_restore(decompose_conv(cost_model(fxtucker.trace(model), x), ranks=0.25, method="svd"), x)
    report = fxtucker.report(final)
    rows = {l["name"]: l for l in report.to_dict()["layers"]}
    assert (rows["b"]["kind"], rows["b"]["full_ranks"], rows["b"]["ranks"]) == ("svd", [12], [3])
    line = next(line for line in str(report).splitlines() if line.startswith("b "))
    assert " 12 " in line and " 3 " in line and "decomposed" in line


# --- export and load ------------------------------------------------------------------------------


def _compressed(dtype=torch.float64, mixed=False, **fold_or_restore_kw):
    """Net, SVD pairs with some components pruned, folded or restored, BatchNorm folded."""
    model, x = _net(dtype)
    gm = cost_model(fxtucker.trace(model), x)
    if mixed:  # b as Tucker-2 through an edited plan, a as an SVD pair: load() rebuilds each its way
        gm = plan_decomposition(gm, {"a": 12, "b": 12, "p": 12, "fc": 5}, method="svd", linear=True)
        b = next(n for n in gm.graph.nodes if n.name == "b")
        b.meta["fxtucker"] = LayerPlan(source="b", kind="tucker2", full_ranks=(8, 12), ranks=(8, 12))
        decomposed = decompose_conv(gm, use_plan=True)
    else:
        decomposed = decompose_conv(gm, {"a": 12, "b": 12, "p": 12, "fc": 5}, method="svd", linear=True)
    gated = insert_gates(decomposed)
    with torch.no_grad():  # stand-ins for training: some components die
        gated.get_submodule("a.gate_in").weight[3:] = 0.0
        gated.get_submodule("b.gate_in").weight.view(2, -1)[:, :-4] = 0.0  # 4 kept per group
        gated.get_submodule("fc.gate_in").weight[:2] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        final = fold_bn(fold_or_restore(strip_gates(gated, 1e-6), x, **fold_or_restore_kw))
    return final, x, model


@pytest.mark.parametrize("mixed", [False, True], ids=["svd", "svd-and-tucker2"])
def test_manifest_round_trip(tmp_path, mixed):
    final, x, _ = _compressed(mixed=mixed)
    layers = {l.name: l for l in fxtucker.report(final).layers}
    assert (layers["a"].kind, layers["a"].decision, layers["a"].ranks) == ("svd", "decomposed", (3,))
    assert (layers["b"].kind, layers["b"].decision) == ("tucker2" if mixed else "svd", "decomposed")
    assert layers["b"].ranks == ((4, 12) if mixed else (4,))
    assert final.get_submodule("a.first").kernel_size == (3, 3)
    result = export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double())
    assert result.max_abs_error == 0.0
    loaded = load(tmp_path / "m", lambda: Net().double())
    torch.testing.assert_close(loaded(x), final(x), **EXACT)
    assert loaded.code == final.code and graph_record(loaded) == graph_record(final)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in final.state_dict().items())
    manifest = read_manifest(tmp_path / "m")
    assert manifest["state_dict"]["a.first.weight"] == ((3, 3, 3, 3), "float64")


def test_manifest_round_trip_of_the_latency_svd_form(tmp_path, monkeypatch):
    monkeypatch.setattr(TIME_MODULE, "time_chain", lambda chain, *args: 1.0 if len(chain) == 2 else 2.0)
    final, x, _ = _compressed(cost="latency")
    assert {l.name: l.form for l in fxtucker.report(final).layers if l.decision != "skipped"} == {
        "a": "svd", "b": "svd", "p": "svd", "fc": "svd"}
    export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double())
    loaded = load(tmp_path / "m", lambda: Net().double())
    torch.testing.assert_close(loaded(x), final(x), **EXACT)


def test_manifest_of_another_architecture_is_refused(tmp_path):
    final, x, _ = _compressed()
    export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double())

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 5, padding=2, bias=False)  # R = min(16, 75) as before, kernel 5x5

    with pytest.raises(ValueError, match=r"weight 'a.first.weight' has shape \(3, 3, 3, 3\) in the manifest, the "
                                         r"rebuilt model's is \(3, 3, 5, 5\)"):
        load(tmp_path / "m", lambda: Wider().double())


def test_onnx_parity(tmp_path):
    for name in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(name)
    final, x, _ = _compressed(torch.float32)
    result = export(final, x, tmp_path / "m.onnx", "onnx")
    assert result.max_abs_error < 1e-5
