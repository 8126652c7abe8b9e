"""choose_memory_format / set_memory_format: the weights' strides change, the graph and the function
do not; the faster format is kept by timing, a model that cannot run channels-last stays as it is, and
the choice travels with a manifest."""

import importlib
import json

import pytest
import torch
import torch.nn as nn

import fxtucker
from fxtucker.deploy import optimize_for_inference
from fxtucker.manifest import load
from fxtucker.meta import graph_record
from fxtucker.passes import choose_memory_format, set_memory_format
from fxtucker.passes.memory_format import MEMORY_FORMATS
from tests.conftest import EXACT, REL_CHAIN_FLOAT32, rel_error

MF = importlib.import_module("fxtucker.passes.memory_format")  # where the pass looks up measure_latency


class Net(nn.Module):
    """A 3x3 and a 1x1 conv (whose kernel's strides read as both formats), a BatchNorm, a Linear."""

    def __init__(self, view=False):
        super().__init__()
        self.a, self.bn, self.p = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
        self.fc, self.view = nn.Linear(4 * 6 * 6 if view else 4, 5), view

    def forward(self, x):
        x = self.p(torch.relu(self.bn(self.a(x))))
        return self.fc(x.view(x.size(0), -1) if self.view else x.mean((2, 3)))


def traced(view=False):
    torch.manual_seed(0)
    return fxtucker.trace(Net(view).eval())


def four_d(gm):
    return [t for t in [*gm.parameters(), *gm.buffers()] if t.dim() == 4]


def is_channels_last(t):
    return t.stride() == torch.empty_like(t, memory_format=torch.channels_last).stride()


@pytest.fixture(autouse=True)
def own_timing_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path / "cache"))


def test_set_memory_format_changes_strides_only():
    gm, x = traced(), torch.randn(2, 3, 6, 6)
    last = set_memory_format(gm, "channels_last")
    assert all(is_channels_last(t) for t in four_d(last)) and len(four_d(last)) == 2  # the 1x1 kernel too
    assert all(t.is_contiguous() for t in four_d(gm))  # a copy: gm itself is untouched
    assert last.code == gm.code
    last.graph.lint()
    torch.testing.assert_close(last(x), gm(x))  # float32: another summation order at most
    rec = graph_record(last)
    assert (rec.memory_format, rec.memory_format_reason) == ("channels_last", "given")
    back = set_memory_format(last, "contiguous", inplace=True)
    assert back is last and all(t.stride() == torch.empty(t.shape).stride() for t in four_d(back))
    assert graph_record(back).memory_format == "contiguous"
    torch.testing.assert_close(back(x), gm(x), **EXACT)  # the same kernels as before


@pytest.mark.parametrize("fast", MEMORY_FORMATS)
def test_choose_memory_format_keeps_the_faster_format(monkeypatch, fast):
    """The timing decides: a stand-in for measure_latency that says which format is faster."""
    calls = []

    def fake(model, inputs, **kw):
        fmt = "channels_last" if is_channels_last(model.a.weight) else "contiguous"
        calls.append(fmt)
        return 1.0 if fmt == fast else 3.0

    monkeypatch.setattr(MF, "measure_latency", fake)
    gm, x = traced(), torch.randn(2, 3, 6, 6)
    out = choose_memory_format(gm, x, threads=1, rounds=3)
    rec = graph_record(out)
    assert rec.memory_format == fast
    assert all(is_channels_last(t) == (fast == "channels_last") for t in four_d(out))
    slow = "contiguous" if fast == "channels_last" else "channels_last"
    assert rec.memory_format_reason == f"faster on eager/cpu/1 thread: {fast} 1.000 ms, {slow} 3.000 ms"
    assert sorted(calls) == ["channels_last"] * 3 + ["contiguous"] * 3 and calls[:2] != calls[2:4]  # alternating
    torch.testing.assert_close(out(x), gm(x))
    # timed once: the same model again comes from the cache
    calls.clear()
    assert graph_record(choose_memory_format(gm, x, threads=1)).memory_format == fast and calls == []


def test_a_model_that_cannot_run_channels_last_stays_contiguous(monkeypatch):
    monkeypatch.setattr(MF, "measure_latency", lambda *a, **k: pytest.fail("nothing to time"))
    gm, x = traced(view=True), torch.randn(2, 3, 6, 6)
    out = choose_memory_format(gm, x)
    rec = graph_record(out)
    assert rec.memory_format == "contiguous" and all(t.is_contiguous() for t in four_d(out))
    assert rec.memory_format_reason.startswith("contiguous: it does not run channels-last (RuntimeError: view size")
    torch.testing.assert_close(out(x), gm(x), **EXACT)


def test_a_model_without_4d_weights_is_left_alone(monkeypatch):
    monkeypatch.setattr(MF, "measure_latency", lambda *a, **k: pytest.fail("nothing to time"))
    gm = fxtucker.trace(nn.Sequential(nn.Linear(4, 3)))
    rec = graph_record(choose_memory_format(gm, torch.randn(2, 4)))
    assert (rec.memory_format, rec.memory_format_reason) == ("contiguous", "no 4-D weights: the format changes nothing")


def test_choose_memory_format_times_for_real():
    gm, x = traced(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = gm(x)
    out = choose_memory_format(gm, x, threads=1, rounds=1)
    rec = graph_record(out)
    assert rec.memory_format in MEMORY_FORMATS and rec.memory_format_reason.startswith("faster on eager/cpu/1 thread")
    # the weights are in the format it chose, and the function is the same
    in_format = is_channels_last if rec.memory_format == "channels_last" else (lambda t: t.is_contiguous())
    assert four_d(out) and all(in_format(t) for t in four_d(out))
    with torch.no_grad():
        torch.testing.assert_close(out(x), want)  # float32: channels-last may sum in another order


@pytest.mark.parametrize("call,match", [
    (lambda gm, x: set_memory_format(gm, "nhwc"), r"set_memory_format: memory_format 'nhwc' is not known; valid: "
                                                   r"\['contiguous', 'channels_last'\]"),
    (lambda gm, x: choose_memory_format(gm, x, backend="tvm"), r"backend 'tvm'"),
    (lambda gm, x: choose_memory_format(gm, x, threads=0), r"threads must be a positive int or None"),
    (lambda gm, x: choose_memory_format(gm, x, rounds=0), r"rounds must be an int >= 1, got 0"),
    (lambda gm, x: optimize_for_inference(Net().eval(), x, memory_format="nhwc"),
     r"memory_format 'nhwc' is not known to optimize_for_inference; valid: \['auto', 'contiguous', 'channels_last'\]"),
], ids=["set-format", "backend", "threads", "rounds", "optimize_for_inference"])
def test_bad_arguments_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call(traced(), torch.randn(2, 3, 6, 6))


def test_not_a_graph_module():
    with pytest.raises(TypeError, match="choose_memory_format expects a torch.fx.GraphModule"):
        choose_memory_format(Net(), torch.randn(2, 3, 6, 6))


def test_optimize_for_inference_records_the_format_and_a_manifest_keeps_it(tmp_path):
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(0)
    model = Net().eval()
    auto = optimize_for_inference(model, x, threads=1)
    assert graph_record(auto).memory_format_reason.startswith("faster on eager/cpu/1 thread")
    # not timed there: the default format, even for weights that came channels-last
    onnx_side = optimize_for_inference(set_memory_format(fxtucker.trace(model), "channels_last"), x,
                                       backend="onnxruntime")
    assert graph_record(onnx_side).memory_format_reason == "auto: the default format on onnxruntime"
    assert graph_record(onnx_side).memory_format == "contiguous" and all(t.is_contiguous() for t in four_d(onnx_side))
    deployed = optimize_for_inference(model, x, ranks=0.5, threads=1, memory_format="channels_last")
    assert all(is_channels_last(t) for t in four_d(deployed))
    fxtucker.export(deployed, x, tmp_path / "m", "manifest", model_factory=Net)
    data = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert (data["memory_format"], data["memory_format_reason"]) == ("channels_last", "given")
    loaded = load(tmp_path / "m", Net)
    assert graph_record(loaded).memory_format == "channels_last" and all(is_channels_last(t) for t in four_d(loaded))
    torch.testing.assert_close(loaded(x), deployed(x), **EXACT)
    # a manifest from before the key loads in the default format; a bad value is refused
    for value, error in ((None, None), ("nhwc", r"'memory_format' must be one of \['contiguous', 'channels_last'\]")):
        data.pop("memory_format", None)
        if value is not None:
            data["memory_format"] = value
        (tmp_path / "m" / "manifest.json").write_text(json.dumps(data))
        if error:
            with pytest.raises(ValueError, match=error):
                load(tmp_path / "m", Net)
        else:
            old = load(tmp_path / "m", Net)
            assert graph_record(old).memory_format == "contiguous"  # the saved strides stay as they were
            assert all(torch.equal(a, b) for a, b in zip(four_d(old), four_d(loaded)))
            torch.testing.assert_close(old(x), deployed(x))


def test_forms_are_timed_and_built_in_the_models_format(monkeypatch):
    """A model whose weights are channels-last has its forms timed channels-last (inputs and weights,
    as inside the model) and keeps the format for the modules the forms build."""
    time_forms = importlib.import_module("fxtucker.passes.time_forms")
    seen = []

    def fake(model, x, **kw):
        seen.append(is_channels_last(x) and all(is_channels_last(t) for t in four_d(model)))
        return 1.0

    monkeypatch.setattr(time_forms, "measure_latency", fake)
    x = torch.randn(2, 3, 6, 6)
    gm = fxtucker.passes.decompose_conv(fxtucker.passes.cost_model(traced(), x), ranks=0.5)
    last = set_memory_format(gm, "channels_last")
    out = fxtucker.passes.fold_or_restore(last, x, cost="latency", threads=1)
    assert seen and all(seen)
    assert all(is_channels_last(t) for t in four_d(out))
    assert any(r.form for r in graph_record(out).layers)
    assert all(r.timed_on == "eager/cpu/1 thread, channels-last" for r in graph_record(out).layers if r.form)
    torch.testing.assert_close(out(x), gm(x))
    seen.clear()
    plain = fxtucker.passes.fold_or_restore(gm, x, cost="latency", threads=1)
    assert seen and not any(seen) and all(t.is_contiguous() for t in four_d(plain))


class StrideAdd(nn.Module):
    """Adds the channel stride: a result that depends on the format (a stand-in for a kernel that
    assumes contiguous memory); traced as a leaf."""

    def forward(self, y):
        return y + float(y.stride()[1])


class Odd(nn.Module):
    """A conv whose output goes through ``mode``: NaN, a write into the input, float16, or a
    result that depends on the format (a stand-in for a kernel that assumes contiguous memory)."""

    def __init__(self, mode):
        super().__init__()
        self.a, self.mode, self.s = nn.Conv2d(3, 8, 3, padding=1), mode, StrideAdd()

    def forward(self, x):
        if self.mode == "inplace":
            x.mul_(2)
        y = self.a(x)
        if self.mode == "nan":
            return torch.log(y)  # NaN where y < 0
        if self.mode == "strides":
            return self.s(y)
        return y


@pytest.mark.parametrize("mode,dtype", [("nan", torch.float32), ("inplace", torch.float32), ("plain", torch.float16)])
def test_outputs_compared_fairly(monkeypatch, mode, dtype):
    """NaN outputs, a model that writes into its input and float16 rounding all count as the same
    function in both formats: the timing decides, and the caller's input is left as it was."""
    monkeypatch.setattr(MF, "measure_latency", lambda model, x, **k: 1.0 if is_channels_last(model.a.weight) else 2.0)
    torch.manual_seed(0)
    gm = fxtucker.trace(Odd(mode).to(dtype).eval())
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    before = x.clone()
    rec = graph_record(choose_memory_format(gm, x))
    assert rec.memory_format == "channels_last", rec.memory_format_reason
    torch.testing.assert_close(x, before, **EXACT)


def test_a_format_dependent_model_stays_contiguous_and_is_refused_channels_last(monkeypatch):
    monkeypatch.setattr(MF, "measure_latency", lambda *a, **k: pytest.fail("nothing to time"))
    gm, x = fxtucker.trace(Odd("strides").eval(), leaf_modules=[StrideAdd]), torch.randn(2, 3, 6, 6)
    rec = graph_record(choose_memory_format(gm, x))
    assert rec.memory_format == "contiguous"
    assert rec.memory_format_reason == "contiguous: its outputs channels-last differ from the default format's beyond float rounding"
    with pytest.raises(ValueError, match="the model cannot be stored channels-last: its outputs channels-last differ"):
        set_memory_format(gm, "channels_last", x)
    with pytest.raises(ValueError, match=r"cannot be stored channels-last: it does not run channels-last \(RuntimeError: view"):
        optimize_for_inference(Net(view=True).eval(), x, memory_format="channels_last")
    assert is_channels_last(set_memory_format(gm, "channels_last").a.weight)  # without inputs: not checked


def test_inputs_the_model_does_not_take_are_an_error_not_a_reason():
    with pytest.raises(RuntimeError, match=r"to have 3 channels, but got 5 channels"):  # torch's own error, as it is
        choose_memory_format(traced(), torch.randn(2, 5, 6, 6))  # 5 channels for a conv of 3


def test_pipeline_refuses_an_unknown_format_and_a_bad_reason():
    with pytest.raises(ValueError, match=r"memory_format 'nhwc' is not known; valid: \['auto', 'contiguous', 'channels_last'\]"):
        fxtucker.pipeline.deployment((torch.randn(1, 3, 6, 6),), memory_format="nhwc")
    with pytest.raises(TypeError, match="set_memory_format: reason must be a str, got int"):
        set_memory_format(traced(), "contiguous", reason=3)


def test_whole_model_search_in_channels_last():
    x = torch.randn(2, 3, 6, 6)
    torch.manual_seed(0)
    model = Net().eval()
    deployed = optimize_for_inference(model, x, ranks=0.5, threads=1, search="model", memory_format="channels_last")
    assert all(is_channels_last(t) for t in four_d(deployed)) and graph_record(deployed).memory_format == "channels_last"
    assert any(r.timed_on.endswith("channels-last") for r in graph_record(deployed).layers if r.form)
    plain = optimize_for_inference(model, x, ranks=0.5, threads=1, memory_format="contiguous")
    torch.testing.assert_close(deployed(x), plain(x), rtol=1e-4, atol=1e-5)  # every form: the same function


def test_the_passes_that_build_modules_keep_a_channels_last_model_channels_last():
    # decompose_conv, strip_gates and fold_or_restore build new convs: in a channels-last model they
    # are channels-last too, and the record keeps the format through the chain.
    from fxtucker.passes import decompose_conv, fold_or_restore, insert_gates, strip_gates
    gm, x = traced(), torch.randn(2, 3, 6, 6)
    last = set_memory_format(gm, "channels_last", x, reason="given by the test")
    steps = {}
    steps["decompose_conv"] = g = decompose_conv(last, ranks=1.0)
    steps["insert_gates"] = g = insert_gates(g)
    steps["strip_gates"] = g = strip_gates(g, threshold=0.0)
    steps["fold_or_restore"] = g = fold_or_restore(g, x)
    for name, g in steps.items():
        rec = graph_record(g)
        assert (rec.memory_format, rec.memory_format_reason) == ("channels_last", "given by the test"), name
        assert four_d(g) and all(is_channels_last(t) for t in four_d(g)), name
        assert rel_error(g(x), gm(x)) < REL_CHAIN_FLOAT32, name
    plain = decompose_conv(gm, ranks=1.0)  # the default format stays the default
    assert graph_record(plain).memory_format == "contiguous"
    assert all(t.stride() == torch.empty(t.shape).stride() for t in four_d(plain))
