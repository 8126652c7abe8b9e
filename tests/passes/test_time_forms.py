"""plan_forms and fold_or_restore(cost="latency"): each layer's forms timed on the target back end,
the fastest kept; the plan is a dict a user can edit before fold_or_restore applies it."""

import contextlib
import copy
import importlib
import json
import math
import tempfile

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtucker
from fxtucker.meta import FoldRecord, graph_record
from fxtucker.passes import cost_model, decompose_conv, fold_or_restore
from fxtucker.passes.forms import ChannelsLinear
from fxtucker.passes.time_forms import plan_forms
from tests.conftest import REL_CHAIN_FLOAT32, REL_CHAIN_FLOAT64, rel_error
from tests.strategies import OneConv, conv_and_input


TIME_MODULE = importlib.import_module("fxtucker.passes.time_forms")  # where plan_forms looks up its timers
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
        mp.setattr(TIME_MODULE, "measure_latency", timer)
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


def three_layers(dtype=torch.float32, ranks=0.5):
    model = Three().to(dtype).eval()
    x = torch.randn(2, 16, 12, 12, dtype=dtype)
    return model, x, decompose_conv(cost_model(fxtucker.trace(model), x), ranks=ranks, linear=True)


def test_latency_second_run_times_nothing(timing_cache, monkeypatch):
    _, x, decomposed = three_layers()
    calls = []
    real = TIME_MODULE.measure_latency
    monkeypatch.setattr(TIME_MODULE, "measure_latency", lambda *a, **k: calls.append(k) or real(*a, **k))
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
    model, x, decomposed = three_layers(torch.float64)
    final = fold_or_restore(decomposed, x, cost="latency", threads=1)
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT64
    for layer in fxtucker.report(final).layers:
        times = dict(layer.timings_ms)
        assert set(times) == FORMS_OF_THREE[layer.name]
        assert times[layer.form] == min(times.values()) and layer.timed_on == "eager/cpu/1 thread"  # ties: rounded ms
        assert f"{layer.form} {times[layer.form]:.3f} ms" in layer.reason
        if layer.form == "dense":
            node = next(n for n in final.graph.nodes if n.target == layer.name)
            rec = node.meta["fxtucker"]
            assert isinstance(rec, FoldRecord) and rec.form == "dense" and dict(rec.timings_ms) == times
    assert fxtucker.count_macs(final, x) == sum(n.meta["macs"] for n in final.graph.nodes)


def test_latency_max_macs_trades_speed_for_macs():
    model, x, decomposed = three_layers()
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
    _, x, decomposed = three_layers()
    with pytest.raises(ValueError, match=r"cost 'flops' is not known to fold_or_restore; valid: \['macs', 'latency'\]"):
        fold_or_restore(decomposed, x, cost="flops")
    with pytest.raises(ValueError, match=r"\['backend', 'max_macs'\] apply to cost='latency' only"):
        fold_or_restore(decomposed, x, backend="eager", max_macs=10)
    with pytest.raises(ValueError, match=r"backend 'tvm' is not supported by fold_or_restore; valid: \['eager', 'compile', 'compile-freezing', 'onnxruntime'\]"):
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
    _, x, decomposed = three_layers()
    final = fold_or_restore(decomposed, x, cost="latency", backend="onnxruntime", threads=1)
    assert all(l.timed_on == "onnxruntime/cpu/1 thread" for l in fxtucker.report(final).layers)
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT32


@pytest.mark.slow
def test_latency_on_compile(timing_cache):
    _, x, decomposed = three_layers()
    for search in ("layer", "model"):
        final = fold_or_restore(decomposed, x, cost="latency", backend="compile", threads=1, search=search)
        assert all(l.timed_on == "compile/cpu/1 thread" for l in fxtucker.report(final).layers)
        assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT32
        assert rel_error(torch.compile(final)(x), decomposed(x)) < REL_CHAIN_FLOAT32


# "+linear" forms: pointwise convs as nn.Linear over channels, between permutes.


def _prefer_linear(chain, *args):
    """Stands in for time_chain: a chain with a +linear pointwise conv takes 1 ms, any other 2 ms."""
    return 1.0 if any(isinstance(m, ChannelsLinear) for m in chain) else 2.0


def test_linear_forms_keep_the_function_in_both_layouts(monkeypatch, timing_cache):
    _, x, decomposed = three_layers(torch.float64)
    monkeypatch.setattr(TIME_MODULE, "time_chain", _prefer_linear)
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
    monkeypatch.setattr(TIME_MODULE, "time_chain", _prefer_linear)
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
    monkeypatch.setattr(TIME_MODULE, "time_chain", _prefer_linear)
    final = fold_or_restore(decomposed, x, cost="latency")
    assert all("+linear" not in f for l in fxtucker.report(final).layers for f, _ in l.timings_ms)
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT32


def test_a_model_with_linear_forms_is_not_folded_again(monkeypatch, timing_cache):
    _, x, decomposed = three_layers()
    monkeypatch.setattr(TIME_MODULE, "time_chain", _prefer_linear)
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
    _, x, decomposed = three_layers()
    monkeypatch.setattr(TIME_MODULE, "time_chain", lambda chain, *a: 1.0 if len(chain) == 1 else 2.0)
    by_layer = fold_or_restore(decomposed, x, cost="latency")
    assert {l.form for l in fxtucker.report(by_layer).layers} == {"dense"}  # each layer alone: dense is fastest
    timer = WholeTimer(lambda macs: macs / 1e6)  # as whole models, fewer MACs are faster
    monkeypatch.setattr(TIME_MODULE, "measure_latency", timer)
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
    _, x, decomposed = three_layers()
    monkeypatch.setattr(TIME_MODULE, "time_chain", lambda chain, *a: 2.0 if len(chain) == 1 else 1.0)
    monkeypatch.setattr(TIME_MODULE, "measure_latency", WholeTimer(lambda macs: 1e9 / macs))  # more MACs: faster
    final = fold_or_restore(decomposed, x, cost="latency", search="model")
    assert {l.form.removesuffix("+linear") for l in fxtucker.report(final).layers} == {"dense"}
    dense_macs = fxtucker.count_macs(final, x)
    # under max_macs, "all dense" is no candidate: the most MACs within the bound wins
    bounded = fold_or_restore(decomposed, x, cost="latency", search="model", max_macs=dense_macs - 1)
    assert fxtucker.count_macs(bounded, x) <= dense_macs - 1
    assert rel_error(bounded(x), decomposed(x)) < REL_CHAIN_FLOAT32


def test_model_search_with_real_timings(timing_cache):
    _, x, decomposed = three_layers()
    final = fold_or_restore(decomposed, x, cost="latency", threads=1, search="model")
    assert rel_error(final(x), decomposed(x)) < REL_CHAIN_FLOAT32
    assert all(l.timed_on == "eager/cpu/1 thread" for l in fxtucker.report(final).layers)
    entries = json.loads((timing_cache / "latency.json").read_text())["entries"]
    assert sum('"fold_or_restore/model"' in k for k in entries) >= 2  # the per-layer choice and at least one other


def test_search_errors():
    _, x, decomposed = three_layers()
    with pytest.raises(ValueError, match=r"search 'models' is not known to fold_or_restore; valid: \['layer', 'model'\]"):
        fold_or_restore(decomposed, x, cost="latency", search="models")
    with pytest.raises(ValueError, match=r"\['search'\] apply to cost='latency' only"):
        fold_or_restore(decomposed, x, search="model")


# plan_forms: the plan is a dict; fold_or_restore(plan=) applies it, edited or not.


def test_plan_forms_returns_an_editable_plan_that_fold_or_restore_applies(timing_cache):
    _, x, decomposed = three_layers(torch.float64)
    with fake_timing({"merge_last": 1.0, "svd": 1.5}):
        plan = plan_forms(decomposed, x, cost="latency", threads=1)
        timed = fold_or_restore(decomposed, x, cost="latency", threads=1)
    assert plan == {"a": "merge_last", "b": "merge_last", "c": "svd", "fc": "svd"}
    assert {r.name: r.form for r in fxtucker.report(timed).layers} == plan  # the same plan, applied
    # plan_forms annotated decomposed in place: timings in the records, nothing rewritten
    rec = graph_record(decomposed)
    assert rec.stage == "plan_forms" and all(n.op != "call_module" or "." in n.target for n in decomposed.graph.nodes)
    assert {l.name: l.form for l in rec.layers} == plan and all(l.timed_on == "eager/cpu/1 thread" for l in rec.layers)
    applied = fold_or_restore(decomposed, x, plan=plan)
    assert applied.code == timed.code and graph_record(applied) == graph_record(timed)
    # the edit is applied as given, and said so; the layers left alone keep their timed reason
    plan["a"], plan["c"] = "dense", "svd+linear"
    edited = fold_or_restore(decomposed, x, plan=plan)
    layers = {l.name: l for l in fxtucker.report(edited).layers}
    assert {n: l.form for n, l in layers.items()} == plan
    assert type(edited.a) is nn.Conv2d and isinstance(edited.get_submodule("c.last"), nn.Linear)
    assert layers["a"].decision == "restored" and layers["a"].reason.startswith("given by the plan on eager/cpu/1 thread: dense ")
    assert layers["b"].reason.startswith("fastest on eager/cpu/1 thread: merge_last 1.000 ms")
    assert layers["a"].macs_after == layers["a"].macs_before
    assert fxtucker.count_macs(edited, x) == sum(l.macs_after for l in layers.values())
    assert rel_error(edited(x), decomposed(x)) < REL_CHAIN_FLOAT64


def test_plan_forms_by_macs_is_the_rule_fold_or_restore_applies():
    _, x, decomposed = three_layers(torch.float64, ranks={"a": (4, 4), "b": (16, 16), "c": 20, "fc": 5})
    plan = plan_forms(decomposed, x)
    assert plan == {"a": "tucker2", "b": "dense", "c": "dense", "fc": "svd"}
    by_rule = fold_or_restore(decomposed, x)
    assert {l.name: l.decision for l in fxtucker.report(by_rule).layers} == {
        "a": "decomposed", "b": "restored", "c": "restored", "fc": "decomposed"}
    applied = fold_or_restore(decomposed, x, plan=plan)
    assert applied.code == by_rule.code
    assert all(torch.equal(applied.state_dict()[k], v) for k, v in by_rule.state_dict().items())
    assert plan_forms(decomposed, x, linear=True) == {"a": "tucker2+linear", "b": "dense", "c": "dense+linear",
                                                      "fc": "svd"}


def test_plan_forms_errors():
    _, x, decomposed = three_layers()
    with pytest.raises(ValueError, match=r"cost 'flops' is not known to plan_forms"):
        plan_forms(decomposed, x, cost="flops")
    with pytest.raises(ValueError, match=r"plan_forms: \['threads'\] apply to cost='latency' only"):
        plan_forms(decomposed, x, threads=2)
    with pytest.raises(ValueError, match=r"search 'all' is not known to plan_forms"):
        plan_forms(decomposed, x, cost="latency", search="all")
    with pytest.raises(TypeError, match=r"plan_forms: linear must be True, False or None, got 'yes'"):
        plan_forms(decomposed, x, linear="yes")
    with pytest.raises(ValueError, match=r"plan_forms found no decomposed layers"):
        plan_forms(fxtucker.trace(Three()), x)
