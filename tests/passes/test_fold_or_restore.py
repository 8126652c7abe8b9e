"""fold_or_restore: the cheaper form per layer, original names back, MACs never up."""

import contextlib
import copy
import importlib
import json
import math
import tempfile

import pytest
import torch
import torch.nn as nn
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtucker
from fxtucker.meta import FoldRecord
from fxtucker.passes import cost_model, decompose_conv, fold_or_restore, insert_gates, kept_ranks, predict_macs, strip_gates
from tests.conftest import REL_CHAIN_FLOAT32, REL_CHAIN_FLOAT64, reference, rel_error
from tests.strategies import OneConv, TwoConvs, conv_and_input


def _chain(model, x, ranks=None, threshold=0.0):
    gm = cost_model(fxtucker.trace(model), x)
    return fold_or_restore(strip_gates(insert_gates(decompose_conv(gm, ranks=ranks)), threshold), x)


@given(conv_and_input())
@settings(max_examples=30, deadline=None)
def test_whole_chain_full_rank_keeps_function_and_never_raises_macs(case):
    conv, x = case
    model = OneConv(conv).eval()
    ref = reference(model)
    final = _chain(model, x)
    final.graph.lint()
    assert rel_error(final(x), ref(x)) < REL_CHAIN_FLOAT64
    assert fxtucker.count_macs(final, x) <= fxtucker.count_macs(ref, x)


@given(conv_and_input(), st.floats(0.05, 1.0))
@settings(max_examples=30, deadline=None)
def test_truncated_chain_never_raises_macs(case, frac):
    conv, x = case
    model = OneConv(conv).eval()
    final = _chain(model, x, ranks=frac)
    assert fxtucker.count_macs(final, x) <= fxtucker.count_macs(model, x)
    layer = fxtucker.report(final).layers[0]
    assert layer.macs_after <= layer.macs_before


def test_restore_puts_back_original_names_and_code_golden():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    original = fxtucker.trace(model)
    final = _chain(model, x)  # full rank: every factorisation costs more, so all are restored
    assert final.code == original.code
    assert [n.name for n in final.graph.nodes] == [n.name for n in original.graph.nodes]
    assert [(n.op, n.target) for n in final.graph.nodes] == [(n.op, n.target) for n in original.graph.nodes]
    assert all(type(final.get_submodule(t)) is nn.Conv2d for t in ("conv1", "layer1.0.conv1", "layer2.0.downsample.0"))
    node = next(n for n in final.graph.nodes if n.name == "layer1_0_conv1")
    assert node.meta["fxtucker"] == FoldRecord(source="layer1.0.conv1", decision="restored",
                                               macs_original=64 * 64 * 9 * 16 * 16, macs_decomposed=16 * 16 * (64 * 64 + 64 * 64 * 9 + 64 * 64))
    assert all(l.decision == "restored" for l in fxtucker.report(final).layers)


def test_decision_follows_the_macs():
    model = TwoConvs().double().eval()
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    gm = cost_model(fxtucker.trace(model), x)
    final = fold_or_restore(strip_gates(insert_gates(decompose_conv(gm, ranks={"a": (4, 4), "b": (15, 15)})), 0.0), x)
    rep = {l.name: l for l in fxtucker.report(final).layers}
    # a: 64*(16*4 + 4*4*9 + 4*16) = 17408 < 64*16*16*9 = 147456; b: 64*(16*15 + 15*15*9 + 15*16) > 147456
    assert (rep["a"].decision, rep["a"].macs_before, rep["a"].macs_after) == ("decomposed", 147456, 17408)
    assert (rep["b"].decision, rep["b"].macs_after) == ("restored", 147456)
    assert isinstance(final.b, nn.Conv2d) and isinstance(final.get_submodule("a.core"), nn.Conv2d)
    assert final.get_submodule("a.last").__class__ is nn.Conv2d
    assert next(n for n in final.graph.nodes if n.name == "a_last").meta["fxtucker"].decision == "decomposed"
    # the restored b is the HOSVD truncation at (15, 15) multiplied back out
    d = decompose_conv(gm, ranks={"b": (15, 15)})
    assert rel_error(final.b(x), d.get_submodule("b.last")(d.get_submodule("b.core")(d.get_submodule("b.first")(x)))) < 1e-12
    assert sum(n.meta["macs"] for n in final.graph.nodes) == 17408 + 147456


def test_errors():
    x = torch.randn(1, 3, 8, 8)
    gated = insert_gates(decompose_conv(fxtucker.trace(OneConv(nn.Conv2d(3, 4, 3)))))
    with pytest.raises(ValueError, match=r"'conv' still has gate node 'conv_gate_in': run strip_gates\(gm, threshold\) before fold_or_restore"):
        fold_or_restore(gated, x)
    with pytest.raises(ValueError, match=r"fold_or_restore found no decomposed layers"):
        fold_or_restore(fxtucker.trace(OneConv(nn.Conv2d(3, 4, 3))), x)


def test_final_metadata_equals_a_fresh_cost_model_run():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    final = _chain(model, x, ranks={"layer1.0.conv1": (8, 8), "layer2.0.conv2": (120, 120)})
    got = {n.name: (n.meta["macs"], n.meta["params"], tuple(n.meta["tensor_meta"].shape)) for n in final.graph.nodes
           if n.op != "output"}
    fresh = cost_model(copy.deepcopy(final), x)
    want = {n.name: (n.meta["macs"], n.meta["params"], tuple(n.meta["tensor_meta"].shape)) for n in fresh.graph.nodes
            if n.op != "output"}
    assert got == want
    assert [l.decision for l in fxtucker.report(final).layers if l.decision != "skipped"] == ["decomposed", "restored"]


@given(conv_and_input(dtype=torch.float32), st.floats(0.0, 1.5), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_predict_macs_equals_the_real_chain(case, threshold, seed):
    conv, x = case
    model = OneConv(conv).eval()
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stand-in for training: spread the gates over [0, 2)
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(2 * torch.rand(gate.shape, generator=g))
    final = fold_or_restore(strip_gates(gated, threshold), x)
    assert predict_macs(gated, threshold) == fxtucker.count_macs(final, x)
    assert {k: v[0] for k, v in kept_ranks(gated, threshold).items()} == {l.name: l.ranks for l in fxtucker.report(final).layers if l.ranks}


def test_predict_macs_on_resnet18_at_several_thresholds():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model), linear=True)), x)
    with torch.no_grad():
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(torch.rand(gate.shape))
    for threshold in (0.0, 0.3, 0.7, 0.95):
        final = fold_or_restore(strip_gates(gated, threshold), x)
        assert predict_macs(gated, threshold) == fxtucker.count_macs(final, x)
    with pytest.raises(ValueError, match=r"predict_macs needs cost-model annotations"):
        predict_macs(insert_gates(decompose_conv(fxtucker.trace(model))), 0.1)


@given(conv_and_input(dtype=torch.float32))
@settings(max_examples=30, deadline=None)
def test_whole_chain_full_rank_float32(case):
    conv, x = case
    model = OneConv(conv).eval()
    ref = reference(model)
    assert rel_error(_chain(model, x)(x), ref(x)) < REL_CHAIN_FLOAT32


@given(conv_and_input(dtype=torch.float32), st.floats(0.0, 1.5), st.sampled_from([2, 3, 4, 8]), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_predict_macs_counts_rounded_ranks(case, threshold, round_to, seed):
    conv, x = case
    model = OneConv(conv).eval()
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(2 * torch.rand(gate.shape, generator=g))
    final = fold_or_restore(strip_gates(gated, threshold, round_to=round_to), x)
    assert predict_macs(gated, threshold, round_to) == fxtucker.count_macs(final, x)
    assert predict_macs(gated, threshold, round_to) >= predict_macs(gated, threshold)


def test_predict_macs_with_round_to_on_resnet18():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    with torch.no_grad():
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(torch.rand(gate.shape))
    final = fold_or_restore(strip_gates(gated, 0.6, round_to=16), x)
    assert predict_macs(gated, 0.6, 16) == fxtucker.count_macs(final, x)
    ranks = [r for l in fxtucker.report(final).layers for r, f in zip(l.ranks, l.full_ranks) if r != f]
    assert ranks and all(r % 16 == 0 for r in ranks)


# cost="latency": each layer's forms timed on the target back end, the fastest kept.

FOLD_MODULE = importlib.import_module("fxtucker.passes.fold_or_restore")  # fxtucker.passes.fold_or_restore is the function
FORMS_BY_KERNELS = {(True,): "dense", (False, True, False): "tucker2", (True, False): "merge_first",
                    (False, True): "merge_last", (False, False): "svd", (False,): "dense"}


def _form_of(module):
    """Which form a timed chain is, from its modules' kernels (kxk or 1x1)."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    return FORMS_BY_KERNELS[tuple(math.prod(getattr(m, "kernel_size", (1,))) > 1 for m in layers)]


class FakeTimer:
    """Stands in for measure_latency: ``times[form]`` ms (default 2.0), and a log of the calls."""

    def __init__(self, times=None):
        self.times, self.calls = times or {}, []

    def __call__(self, module, x, **kw):
        self.calls.append((_form_of(module), tuple(x.shape), kw))
        return self.times.get(_form_of(module), 2.0)


@contextlib.contextmanager
def fake_timing(times):
    """A FakeTimer in place of measure_latency and an empty timing cache in a temporary directory."""
    timer = FakeTimer(times)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXTUCKER_CACHE_DIR", tmp)
        mp.setattr(FOLD_MODULE, "measure_latency", timer)
        yield timer


@pytest.fixture
def timing_cache(tmp_path, monkeypatch):
    """An empty timing cache in tmp_path."""
    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path))
    return tmp_path


@given(conv_and_input(), st.sampled_from(["dense", "tucker2", "merge_first", "merge_last"]), st.floats(0.3, 1.0))
@settings(max_examples=40, deadline=None)
def test_latency_every_form_keeps_the_function(case, form, frac):
    conv, x = case
    model = OneConv(conv).eval()
    decomposed = decompose_conv(cost_model(fxtucker.trace(model), x), ranks=frac)
    with fake_timing({form: 1.0, "svd": 1.0 if form != "dense" else 3.0}):
        final = fold_or_restore(decomposed, x, cost="latency")
    final.graph.lint()
    layer = fxtucker.report(final).layers[0]
    want = form if len(layer.full_ranks) == 2 else ("dense" if form == "dense" else "svd")
    assert (layer.form, dict(layer.timings_ms)[want]) == (want, 1.0 * layer.call_sites)  # OneConv calls it twice
    assert layer.decision == ("restored" if want == "dense" else "decomposed")
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT64
    assert layer.macs_after == fxtucker.count_macs(final, x)  # the only layer with MACs
    fresh = cost_model(copy.deepcopy(final), x)
    assert [n.meta["macs"] for n in final.graph.nodes] == [n.meta["macs"] for n in fresh.graph.nodes]


class Three(nn.Module):
    """Three convs and a Linear: a 3x3, a grouped 3x3 with stride, a 1x1."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=2, bias=False)
        self.c = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(self.c(torch.relu(self.b(torch.relu(self.a(x))))).mean((2, 3)))


def _three(dtype=torch.float32, ranks=0.5):
    model = Three().to(dtype).eval()
    x = torch.randn(2, 16, 12, 12, dtype=dtype)
    return model, x, decompose_conv(cost_model(fxtucker.trace(model), x), ranks=ranks, linear=True)


def test_latency_second_run_times_nothing(timing_cache, monkeypatch):
    _, x, decomposed = _three()
    calls = []
    real = FOLD_MODULE.measure_latency
    monkeypatch.setattr(FOLD_MODULE, "measure_latency", lambda *a, **k: calls.append(k) or real(*a, **k))
    first = fold_or_restore(decomposed, x, cost="latency", threads=1)
    # a: dense, tucker2, merge_first, merge_last and the last three +linear; b (grouped, so no pointwise
    # factor): dense, tucker2, merge_first, merge_last; c (1x1): dense, svd, both +linear; fc: dense, svd
    assert len(calls) == 7 + 4 + 4 + 2 and all(k["threads"] == 1 and k["backend"] == "eager" for k in calls)
    assert (timing_cache / "latency.json").is_file()
    second = fold_or_restore(decomposed, x, cost="latency", threads=1)
    assert len(calls) == 17  # every timing came from the cache
    assert [l.timings_ms for l in fxtucker.report(first).layers] == [l.timings_ms for l in fxtucker.report(second).layers]
    assert [l.form for l in fxtucker.report(first).layers] == [l.form for l in fxtucker.report(second).layers]
    fold_or_restore(decomposed, x[:1], cost="latency", threads=1)  # another shape: timed again
    assert len(calls) == 34


FORMS_OF_THREE = {
    "a": {"dense", "tucker2", "merge_first", "merge_last", "tucker2+linear", "merge_first+linear", "merge_last+linear"},
    "b": {"dense", "tucker2", "merge_first", "merge_last"},  # grouped: no pointwise factor
    "c": {"dense", "svd", "dense+linear", "svd+linear"},
    "fc": {"dense", "svd"},
}


def test_latency_records_and_real_timings(timing_cache):
    model, x, decomposed = _three(torch.float64)
    final = fold_or_restore(decomposed, x, cost="latency", threads=1)
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT64
    for layer in fxtucker.report(final).layers:
        times = dict(layer.timings_ms)
        assert set(times) == FORMS_OF_THREE[layer.name]
        assert layer.form == min(times, key=times.get) and layer.timed_on == "eager/cpu/1 thread"
        assert f"{layer.form} {times[layer.form]:.3f} ms" in layer.reason
        if layer.form == "dense":
            node = next(n for n in final.graph.nodes if n.target == layer.name)
            rec = node.meta["fxtucker"]
            assert isinstance(rec, FoldRecord) and rec.form == "dense" and dict(rec.timings_ms) == times
    assert fxtucker.count_macs(final, x) == sum(n.meta["macs"] for n in final.graph.nodes)


def test_latency_max_macs_trades_speed_for_macs():
    model, x, decomposed = _three()
    with fake_timing({"dense": 1.0}):  # the original is fastest everywhere
        fastest = fold_or_restore(decomposed, x, cost="latency")
    assert {l.form for l in fxtucker.report(fastest).layers} == {"dense"}
    dense_macs = fxtucker.count_macs(fastest, x)
    assert dense_macs == fxtucker.count_macs(model, x)
    with fake_timing({"dense": 1.0}):
        fitted = fold_or_restore(decomposed, x, cost="latency", max_macs=dense_macs - 1)
    assert fxtucker.count_macs(fitted, x) <= dense_macs - 1
    assert any("fastest within max_macs" in l.reason for l in fxtucker.report(fitted).layers)
    assert rel_error(fitted(x), decomposed(x)) < REL_CHAIN_FLOAT32
    least = fxtucker.count_macs(fold_or_restore(decomposed, x), x)  # cost="macs" takes the fewest MACs per layer
    with fake_timing({"dense": 1.0}):
        tight = fold_or_restore(decomposed, x, cost="latency", max_macs=least)
        assert fxtucker.count_macs(tight, x) <= least
        with pytest.raises(ValueError, match=r"max_macs=1,000 cannot be met: the cheapest form of every layer still leaves"):
            fold_or_restore(decomposed, x, cost="latency", max_macs=1000)


def test_latency_errors():
    _, x, decomposed = _three()
    with pytest.raises(ValueError, match=r"cost 'flops' is not known to fold_or_restore; valid: \['macs', 'latency'\]"):
        fold_or_restore(decomposed, x, cost="flops")
    with pytest.raises(ValueError, match=r"\['backend', 'max_macs'\] apply to cost='latency' only"):
        fold_or_restore(decomposed, x, backend="eager", max_macs=10)
    with pytest.raises(ValueError, match=r"backend 'tvm' is not supported by fold_or_restore; valid: \['eager', 'compile', 'onnxruntime'\]"):
        fold_or_restore(decomposed, x, cost="latency", backend="tvm")
    with pytest.raises(ValueError, match=r"device 'tpu' is not supported by fold_or_restore; valid: \['cpu', 'cuda'\]"):
        fold_or_restore(decomposed, x, cost="latency", device="tpu")
    with pytest.raises(ValueError, match=r"max_macs must be a positive int"):
        fold_or_restore(decomposed, x, cost="latency", max_macs=-5)
    with pytest.raises(ValueError, match=r"threads must be a positive int or None"):
        fold_or_restore(decomposed, x, cost="latency", threads=0)
    with fake_timing({"merge_first": 1.0}):
        merged = fold_or_restore(decomposed, x, cost="latency")
    with pytest.raises(ValueError, match=r"layer 'a' was already folded to \['core', 'last'\]"):
        fold_or_restore(merged, x, cost="latency")


def test_latency_on_onnxruntime(timing_cache):
    pytest.importorskip("onnxruntime")
    _, x, decomposed = _three()
    final = fold_or_restore(decomposed, x, cost="latency", backend="onnxruntime", threads=1)
    assert all(l.timed_on == "onnxruntime/cpu/1 thread" for l in fxtucker.report(final).layers)
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT32


@pytest.mark.slow
def test_latency_on_compile(timing_cache):
    _, x, decomposed = _three()
    for search in ("layer", "model"):
        final = fold_or_restore(decomposed, x, cost="latency", backend="compile", threads=1, search=search)
        assert all(l.timed_on == "compile/cpu/1 thread" for l in fxtucker.report(final).layers)
        assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT32
        assert rel_error(torch.compile(final)(x), decomposed(x)) < REL_CHAIN_FLOAT32


# "+linear" forms: pointwise convs as nn.Linear over channels, between permutes.


def _prefer_linear(chain, *args):
    """Stands in for _time_chain: a chain with a +linear pointwise conv takes 1 ms, any other 2 ms."""
    return 1.0 if any(isinstance(m, FOLD_MODULE._ChannelsLinear) for m in chain) else 2.0


def test_linear_forms_keep_the_function_in_both_layouts(monkeypatch, timing_cache):
    _, x, decomposed = _three(torch.float64)
    monkeypatch.setattr(FOLD_MODULE, "_time_chain", _prefer_linear)
    final = fold_or_restore(decomposed, x, cost="latency")
    final.graph.lint()
    forms = {l.name: l.form for l in fxtucker.report(final).layers}
    # a: the +linear forms tie at 1 ms and the fewest MACs wins; b is grouped and c's SVD pair has fewer MACs than c.
    assert forms == {"a": "tucker2+linear", "b": "tucker2", "c": "svd+linear", "fc": "svd"}
    assert isinstance(final.get_submodule("a.first"), nn.Linear) and isinstance(final.get_submodule("c.last"), nn.Linear)
    permutes = [n for n in final.graph.nodes if n.op == "call_method" and n.target == "permute"]
    assert [n.name for n in permutes] == ["a_first_channels_last", "a_first_channels_first", "a_last_channels_last",
                                          "a_last_channels_first", "c_first_channels_last", "c_first_channels_first",
                                          "c_last_channels_last", "c_last_channels_first"]
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT64
    cl = copy.deepcopy(final).to(memory_format=torch.channels_last)
    assert rel_error(cl(x.contiguous(memory_format=torch.channels_last)), decomposed(x)) < REL_CHAIN_FLOAT64
    # with autograd on: the permutes carry no None stack trace, which torch.compile's tracing cannot take
    assert rel_error(torch.compile(final)(x), decomposed(x)) < REL_CHAIN_FLOAT64
    layers = fxtucker.report(final).layers
    assert fxtucker.count_macs(final, x) == sum(l.macs_after for l in layers)  # the Linear counted as the conv was
    assert fxtucker.count_macs(final, x) == fxtucker.count_macs(fold_or_restore(decomposed, x), x)


def test_pointwise_as_linear_refuses_other_convs():
    _, x, decomposed = _three()
    node = next(n for n in decomposed.graph.nodes if n.target == "a.core")
    with pytest.raises(ValueError, match=r"'a.core' is not a pointwise conv \(1x1, stride 1, no padding, groups 1\)"):
        FOLD_MODULE.pointwise_as_linear(decomposed, "a.core", [node])


class ViewAfterPointwise(nn.Module):
    """A 1x1 conv whose output is .view()-ed: a channels-last tensor cannot be."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.point = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = self.point(torch.relu(self.conv(x)))
        return y.view(y.shape[0], -1)


def test_linear_forms_are_dropped_where_the_model_cannot_run_with_them(monkeypatch, timing_cache):
    model = ViewAfterPointwise().eval()
    x = torch.randn(2, 8, 6, 6)
    decomposed = decompose_conv(cost_model(fxtucker.trace(model), x), ranks=0.5)
    assert decomposed(x).shape == (2, 16 * 36)  # decomposed at all: the factors' outputs are contiguous
    monkeypatch.setattr(FOLD_MODULE, "_time_chain", _prefer_linear)
    with pytest.warns(UserWarning, match=r"the '\+linear' forms are not used: the model does not run with them "
                                         r"\(RuntimeError: view size is not compatible"):
        final = fold_or_restore(decomposed, x, cost="latency")
    assert not any(l.form.endswith("+linear") for l in fxtucker.report(final).layers)
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT32
    for gm in (decomposed, final, fold_or_restore(decomposed, x)):  # every kernel the passes write is row-major
        for name, p in gm.named_parameters():
            assert p.stride() == torch.empty(p.shape).stride(), name


def test_linear_forms_need_a_batch_dimension(monkeypatch, timing_cache):
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    x = torch.randn(8, 6, 6)  # unbatched: (C, H, W)
    decomposed = decompose_conv(cost_model(fxtucker.trace(model), x), ranks=0.5)
    monkeypatch.setattr(FOLD_MODULE, "_time_chain", _prefer_linear)
    final = fold_or_restore(decomposed, x, cost="latency")
    assert all("+linear" not in f for l in fxtucker.report(final).layers for f, _ in l.timings_ms)
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT32


def test_a_model_with_linear_forms_is_not_folded_again(monkeypatch, timing_cache):
    _, x, decomposed = _three()
    monkeypatch.setattr(FOLD_MODULE, "_time_chain", _prefer_linear)
    final = fold_or_restore(decomposed, x, cost="latency")
    for kw in (dict(cost="latency"), dict()):
        with pytest.raises(ValueError, match=r"layer 'a' already has a '\+linear' form \(its pointwise convs run as "
                                             r"nn.Linear\): fold_or_restore ran on this model before"):
            fold_or_restore(final, x, **kw)


# search="model": whole models timed with candidate form sets.


class WholeTimer:
    """Stands in for measure_latency on whole models: ``ms(macs)``; logs the models timed."""

    def __init__(self, ms):
        self.ms, self.timed = ms, []

    def __call__(self, model, inputs, **kw):
        self.timed.append(model)
        return self.ms(fxtucker.count_macs(model, *inputs))


def test_model_search_keeps_the_fastest_whole_model(monkeypatch, timing_cache):
    _, x, decomposed = _three()
    monkeypatch.setattr(FOLD_MODULE, "_time_chain", lambda chain, *a: 1.0 if len(chain) == 1 else 2.0)
    by_layer = fold_or_restore(decomposed, x, cost="latency")
    assert {l.form for l in fxtucker.report(by_layer).layers} == {"dense"}  # each layer alone: dense is fastest
    timer = WholeTimer(lambda macs: macs / 1e6)  # as whole models, fewer MACs are faster
    monkeypatch.setattr(FOLD_MODULE, "measure_latency", timer)
    final = fold_or_restore(decomposed, x, cost="latency", search="model")
    least = fxtucker.count_macs(fold_or_restore(decomposed, x), x)  # cost="macs": the fewest MACs per layer
    assert fxtucker.count_macs(final, x) <= least < fxtucker.count_macs(by_layer, x)
    layers = fxtucker.report(final).layers
    assert all("in the fastest whole model, form set 'fewest MACs'" in l.reason for l in layers if l.form != "dense")
    assert any(l.form != "dense" for l in layers)
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT32
    # per-layer choice (all dense), +linear wherever possible, halfway, fewest MACs: 3 rounds each
    # (no "no +linear": it is the per-layer choice; no "all dense": the same again)
    assert len(timer.timed) == 4 * 3
    again = fold_or_restore(decomposed, x, cost="latency", search="model")
    assert len(timer.timed) == 12  # the whole models' timings came from the cache
    assert [l.form for l in fxtucker.report(again).layers] == [l.form for l in layers]


def test_model_search_can_keep_every_layer_dense(monkeypatch, timing_cache):
    """Layers alone say decompose; the whole model says dense: search="model" never keeps the slower."""
    _, x, decomposed = _three()
    monkeypatch.setattr(FOLD_MODULE, "_time_chain", lambda chain, *a: 2.0 if len(chain) == 1 else 1.0)
    monkeypatch.setattr(FOLD_MODULE, "measure_latency", WholeTimer(lambda macs: 1e9 / macs))  # more MACs: faster
    final = fold_or_restore(decomposed, x, cost="latency", search="model")
    assert {l.form.removesuffix("+linear") for l in fxtucker.report(final).layers} == {"dense"}
    dense_macs = fxtucker.count_macs(final, x)
    # under max_macs, "all dense" is no candidate: the most MACs within the bound wins
    bounded = fold_or_restore(decomposed, x, cost="latency", search="model", max_macs=dense_macs - 1)
    assert fxtucker.count_macs(bounded, x) <= dense_macs - 1
    assert rel_error(bounded(x), decomposed(x)) < REL_CHAIN_FLOAT32


def test_model_search_with_real_timings(timing_cache):
    _, x, decomposed = _three()
    final = fold_or_restore(decomposed, x, cost="latency", threads=1, search="model")
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT32
    assert all(l.timed_on == "eager/cpu/1 thread" for l in fxtucker.report(final).layers)
    entries = json.loads((timing_cache / "latency.json").read_text())["entries"]
    assert sum('"fold_or_restore/model"' in k for k in entries) >= 2  # the per-layer choice and at least one other


def test_search_errors():
    _, x, decomposed = _three()
    with pytest.raises(ValueError, match=r"search 'models' is not known to fold_or_restore; valid: \['layer', 'model'\]"):
        fold_or_restore(decomposed, x, cost="latency", search="models")
    with pytest.raises(ValueError, match=r"\['search'\] apply to cost='latency' only"):
        fold_or_restore(decomposed, x, search="model")


def test_threshold_for_budget_with_round_to_meets_the_budget_exactly():
    from fxtucker.compress import CompressConfig, threshold_for_budget

    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gated = cost_model(insert_gates(decompose_conv(fxtucker.trace(model))), x)
    with torch.no_grad():
        for layer in fxtucker.gates(gated).values():
            for gate in layer.values():
                gate.copy_(torch.rand(gate.shape))
    target = fxtucker.count_macs(model, x) // 2
    th = threshold_for_budget(gated, target, round_to=16)
    final = fold_or_restore(strip_gates(gated, th, 16), x)
    assert fxtucker.count_macs(final, x) == predict_macs(gated, th, 16) <= target
    # the threshold is the smallest that fits: the next gate value below it would not
    below = max(v for v in torch.cat([g.detach().abs().flatten().double() for l in fxtucker.gates(gated).values()
                                      for g in l.values()]).tolist() if v < th)
    assert predict_macs(gated, below, 16) > target
    assert all(r % 16 == 0 or r == f for l in fxtucker.report(final).layers for r, f in zip(l.ranks, l.full_ranks) if r)
    with pytest.raises(ValueError, match=r"CompressConfig.round_to must be None or an integer >= 1"):
        CompressConfig(round_to=0)
