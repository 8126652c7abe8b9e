"""optimize_for_inference: the BN-folded baseline, the back-end-aware compressed model, plain torch throughout."""

import copy
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxtucker
from fxtucker.deploy import optimize_for_inference
from fxtucker.passes import cost_model, decompose_conv, fold_bn, fold_or_restore, insert_gates, strip_gates
from tests.conftest import EXACT, REL_CHAIN_FLOAT32, REL_CHAIN_FLOAT64, rel_error


class Small(nn.Module):
    """conv-BN-ReLU twice, a 1x1 shortcut, a head: enough to exercise every step."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 48, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(48)
        self.short = nn.Conv2d(32, 48, 1, stride=2)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + self.short(x))
        return self.fc(x.mean((2, 3)))


def _trained_like(dtype=torch.float32):
    """Small with non-trivial BatchNorm statistics, in eval mode."""
    model = Small().to(dtype)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(autouse=True)
def _timing_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path))


def _plain_torch(gm: fx.GraphModule) -> bool:
    """Only torch.nn modules (and fx's own containers) and no fxtucker module anywhere."""
    return all(type(m).__module__.startswith(("torch.nn.", "torch.fx.")) for m in gm.modules())


def test_ranks_none_is_the_bn_folded_original():
    model = _trained_like(torch.float64)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    base = optimize_for_inference(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in base.modules())
    assert rel_error(base(x), model(x)) < 1e-12
    assert fxtucker.count_macs(base, x) == fxtucker.count_macs(model, x)
    assert not any("fxtucker" in n.meta for n in base.graph.nodes if n.op == "call_module")  # nothing decomposed
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the model itself is untouched
    assert _plain_torch(base) and not base.training


def test_ranks_decompose_fold_and_keep_the_function_exactly():
    model = _trained_like(torch.float64)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    fast = optimize_for_inference(model, x, ranks=0.5, linear=True, threads=1)
    # the same chain by hand: fold BN, then decompose at the same ranks; fold_or_restore changes no function
    by_hand = decompose_conv(cost_model(fold_bn(fxtucker.trace(copy.deepcopy(model))), x), ranks=0.5, linear=True)
    assert rel_error(fast(x), by_hand(x)) < REL_CHAIN_FLOAT64
    layers = {l.name: l for l in fxtucker.report(fast).layers}
    assert set(layers) == {"conv1", "conv2", "short", "fc"}
    for layer in layers.values():
        times = dict(layer.timings_ms)
        # ties: rounded ms; the forms are timed in the memory format chosen on the factors
        assert times[layer.form] == min(times.values()) and layer.timed_on in ("eager/cpu/1 thread",
                                                                                "eager/cpu/1 thread, channels-last")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) and _plain_torch(fast)
    assert fxtucker.count_macs(fast, x) == sum(n.meta["macs"] for n in fast.graph.nodes)


def test_svd_method_decomposes_kxk_convs_as_svd_pairs():
    model = _trained_like(torch.float64)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    fast = optimize_for_inference(model, x, ranks=0.5, method="svd", threads=1)
    by_hand = decompose_conv(cost_model(fold_bn(fxtucker.trace(copy.deepcopy(model))), x), ranks=0.5, method="svd")
    assert rel_error(fast(x), by_hand(x)) < REL_CHAIN_FLOAT64
    layers = {l.name: l for l in fxtucker.report(fast).layers}
    assert {layers[n].kind for n in ("conv1", "conv2", "short")} == {"svd"}
    assert layers["conv2"].ranks == (24,)  # half of min(48, 32 * 3 * 3)


def test_pointwise_false_keeps_the_shortcut_whole():
    model, x = _trained_like(), torch.randn(1, 3, 16, 16)
    fast = optimize_for_inference(model, x, ranks=0.5, threads=1, pointwise=False, memory_format="contiguous")
    layers = {l.name: l for l in fxtucker.report(fast).layers}
    assert layers["short"].decision == "skipped" and "pointwise=False" in layers["short"].reason
    assert isinstance(fast.get_submodule("short"), nn.Conv2d) and layers["conv2"].decision != "skipped"


def test_round_to_rounds_the_ranks():
    model = _trained_like()
    x = torch.randn(1, 3, 16, 16)
    fast = optimize_for_inference(model, x, ranks=0.3, round_to=16, threads=1)
    ranks = {l.name: l.ranks for l in fxtucker.report(fast).layers}
    assert ranks == {"conv1": (3, 16), "conv2": (16, 16), "short": (16,)}  # conv1's input mode has full rank 3


def test_compressed_model_runs_channels_last_and_exports():
    model = _trained_like()
    x = torch.randn(2, 3, 16, 16)
    fast = optimize_for_inference(model, x, ranks=0.5, threads=1)
    expected = fast(x)
    cl = copy.deepcopy(fast).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_error(cl(x.to(memory_format=torch.channels_last)), expected) < REL_CHAIN_FLOAT32
    exported = torch.export.export(fast, (x,))
    assert rel_error(exported.module()(x), expected) < REL_CHAIN_FLOAT32


def test_compressed_model_runs_under_torch_compile_in_channels_last():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 3, 8, 8).to(memory_format=torch.channels_last)
    fast = optimize_for_inference(model, x, ranks=0.5, threads=1).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_error(torch.compile(fast)(x), fast(x)) < REL_CHAIN_FLOAT32


def test_an_already_decomposed_model_keeps_its_ranks():
    """The model compress() returns: decomposed, stripped and folded by MACs, BatchNorm still in."""
    model = _trained_like(torch.float64)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    gated = insert_gates(decompose_conv(cost_model(fxtucker.trace(model), x), ranks={"conv2": (8, 12), "short": 6}))
    compressed = fold_or_restore(strip_gates(gated, 0.0), x)
    fast = optimize_for_inference(compressed, x, threads=1)
    assert rel_error(fast(x), compressed(x)) < REL_CHAIN_FLOAT64
    assert {l.name: l.ranks for l in fxtucker.report(fast).layers if l.kind != "skip"} == {"conv2": (8, 12), "short": (6,)}
    assert all(l.timed_on for l in fxtucker.report(fast).layers if l.kind != "skip")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())


def test_linear_forms_after_fold_bn_and_strided_1x1_reload(tmp_path, monkeypatch):
    """BatchNorm folded before decomposing, then +linear forms: conv2 (3x3 stride 2) and short (a 1x1
    with stride 2, so only its second SVD factor is pointwise) reload from a manifest node for node."""
    time_module = sys.modules["fxtucker.passes.time_forms"]
    linear = sys.modules["fxtucker.passes.forms"].ChannelsLinear
    monkeypatch.setattr(time_module, "time_chain",
                        lambda chain, *a: 1.0 if any(isinstance(m, linear) for m in chain) else 2.0)
    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path / "cache"))
    model = _trained_like(torch.float64)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fast = optimize_for_inference(model, x, ranks=0.5)
    forms = {l.name: l.form for l in fxtucker.report(fast).layers}
    assert forms["short"] == "svd+linear" and forms["conv2"].endswith("+linear")
    assert isinstance(fast.get_submodule("short.first"), nn.Conv2d)  # stride 2: not pointwise
    assert isinstance(fast.get_submodule("short.last"), nn.Linear)
    assert rel_error(fast(x), model(x)) < 1.0  # ranks 0.5 of random weights: an approximation, not a copy
    fxtucker.export(fast, x, tmp_path / "m", "manifest", model_factory=lambda: Small().double())
    loaded = fxtucker.load(tmp_path / "m", lambda: Small().double())
    assert loaded.code == fast.code
    torch.testing.assert_close(loaded(x), fast(x), **EXACT)


def test_errors():
    model = _trained_like()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"backend 'tvm' is not supported by optimize_for_inference; valid: \['eager', 'compile', 'compile-freezing', 'onnxruntime'\]"):
        optimize_for_inference(model, x, backend="tvm")
    with pytest.raises(ValueError, match=r"search 'whole' is not known to optimize_for_inference; valid: \['layer', 'model'\]"):
        optimize_for_inference(model, x, search="whole")
    with pytest.raises(ValueError, match=r"device 'tpu' is not supported by optimize_for_inference"):
        optimize_for_inference(model, x, device="tpu")
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor or a tuple of tensors"):
        optimize_for_inference(model, [1, 2])
    with pytest.raises(ValueError, match=r"max_macs bounds the layers' decomposed forms: it needs ranks"):
        optimize_for_inference(model, x, max_macs=10)
    decomposed = decompose_conv(cost_model(fxtucker.trace(model), x), ranks=0.5)
    with pytest.raises(ValueError, match=r"model is already decomposed .* so ranks=0.5 cannot apply"):
        optimize_for_inference(decomposed, x, ranks=0.5)
    with pytest.raises(ValueError, match=r"model is already decomposed: round_to cannot change its ranks"):
        optimize_for_inference(decomposed, x, round_to=8)
    with pytest.raises(ValueError, match=r"round_to=8 applies to fractional ranks only"):
        optimize_for_inference(model, x, ranks="vbmf", round_to=8)
