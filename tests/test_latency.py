"""measure_latency: median wall time on each back end, mode and threads restored, clear errors; the timing cache."""

import builtins
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxtucker
from fxtucker.latency import TimingCache, cache_dir, compare_latency, measure_latency
from fxtucker.latency import _cpu_times as _real_cpu_times
from fxtucker.models import get_model

ROOT = Path(__file__).resolve().parents[1]


def test_measures_and_restores_state():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Dropout(0.5)).train()
    threads = torch.get_num_threads()
    ms = measure_latency(model, torch.randn(1, 3, 16, 16), threads=1, warmup=1, repeats=3)
    assert ms > 0 and model.training and torch.get_num_threads() == threads


def test_slower_model_measures_slower():
    small, big = nn.Conv2d(8, 8, 1), nn.Sequential(*[nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)])
    assert measure_latency(big, torch.randn(1, 64, 32, 32), repeats=5) > measure_latency(small, torch.randn(1, 8, 4, 4), repeats=5)


def test_onnxruntime_backend_runs_the_exported_model(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    seen = {}
    real = ort.InferenceSession

    def session(path, options, providers):
        seen.update(threads=options.intra_op_num_threads, providers=providers)
        s = real(path, options, providers=providers)
        seen["inputs"] = [i.shape for i in s.get_inputs()]
        return s

    monkeypatch.setattr(ort, "InferenceSession", session)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).train()
    ms = measure_latency(model, torch.randn(2, 3, 16, 16), backend="onnxruntime", threads=1, warmup=1, repeats=3)
    assert ms > 0 and model.training
    assert seen == {"threads": 1, "providers": ["CPUExecutionProvider"], "inputs": [[2, 3, 16, 16]]}


@pytest.mark.parametrize("spinning, entry", [(None, ""), (True, "1"), (False, "0")])
def test_onnxruntime_spinning_is_the_session_option(monkeypatch, spinning, entry):
    """``spinning`` sets onnxruntime's ``session.intra_op.allow_spinning`` (None: its default, unset),
    for measure_latency and for both models of a comparison, and the comparison says so."""
    ort = pytest.importorskip("onnxruntime")
    seen = []
    real = ort.InferenceSession

    def session(path, options, providers):
        try:
            seen.append(options.get_session_config_entry("session.intra_op.allow_spinning"))
        except RuntimeError:  # not set: onnxruntime's default
            seen.append("")
        return real(path, options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", session)
    x = torch.randn(2, 3, 8, 8)
    assert measure_latency(nn.Conv2d(3, 4, 1), x, backend="onnxruntime", threads=1, warmup=0, repeats=1,
                           spinning=spinning) > 0
    cmp = compare_latency(nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1), x, rounds=1, backend="onnxruntime",
                          threads=1, warmup=0, repeats=1, spinning=spinning, interleave=True)
    assert seen == [entry] * 3
    assert cmp.spinning is spinning and cmp.to_dict()["spinning"] is spinning
    words = {None: "1 thread(s); timed", True: "1 thread(s) (spinning); timed", False: "1 thread(s) (not spinning); timed"}
    assert words[spinning] in cmp.setting()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["compile", "compile-freezing"])
def test_compile_backend(backend):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    assert measure_latency(model, torch.randn(1, 3, 16, 16), backend=backend, threads=1, warmup=1, repeats=3) > 0


@pytest.mark.parametrize("backend, options", [("compile", None), ("compile-freezing", {"freezing": True})])
def test_compile_backends_pass_their_inductor_options(backend, options, monkeypatch):
    seen = []

    def fake_compile(model, **kwargs):
        seen.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    assert measure_latency(model, torch.randn(1, 3, 8, 8), backend=backend, threads=1, warmup=0, repeats=1) > 0
    assert seen == [{"dynamic": False, "options": options}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events():
    model = nn.Conv2d(3, 8, 3)
    assert measure_latency(model, torch.randn(1, 3, 64, 64), device="cuda", repeats=3) > 0
    assert next(model.parameters()).device.type == "cpu"  # timed on a copy


def test_onnxruntime_missing_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(ImportError, match=r"needs the onnx and onnxruntime packages \(onnxruntime is missing\): "
                                          r"pip install fxtucker\[export\]"):
        measure_latency(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), backend="onnxruntime")


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="tvm"), r"backend 'tvm' is not supported by measure_latency; valid: \['eager', 'compile', 'compile-freezing', 'onnxruntime'\]"),
    (dict(device="tpu"), r"device 'tpu' is not supported by measure_latency; valid: \['cpu', 'cuda'\] \(or 'cuda:N'\)"),
    (dict(device="cpu:1"), r"device 'cpu:1' is not supported by measure_latency"),
    (dict(repeats=0), r"repeats must be >= 1 and warmup >= 0, got repeats=0, warmup=3"),
    (dict(threads=0), r"threads must be a positive int or None"),
    (dict(spinning=False), r"spinning=False is an onnxruntime session option; backend 'eager' has no such setting"),
    (dict(backend="onnxruntime", spinning="off"), r"spinning must be True, False or None \(onnxruntime's default\), got 'off'"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_latency(nn.Identity(), torch.randn(1), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda():
    with pytest.raises(ValueError, match=r"device 'cuda' was asked for, but torch.cuda.is_available\(\) is False"):
        measure_latency(nn.Identity(), torch.randn(1), device="cuda")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("FXTUCKER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fxtucker"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "fxtucker"


def test_timing_cache_persists_merges_and_survives_a_broken_file(monkeypatch, tmp_path):
    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path))
    key = TimingCache.key("eager", "cpu", 2, shape=[1, 3])
    assert json.loads(key)["torch"] == torch.__version__ and json.loads(key)["threads"] == 2
    assert key != TimingCache.key("eager", "cpu", 1, shape=[1, 3]) != TimingCache.key("onnxruntime", "cpu", 2, shape=[1, 3])
    a, b = TimingCache(), TimingCache()  # two processes, say
    a.put(key, 1.5)
    b.put("other", 2.5)
    assert TimingCache().get(key) == 1.5 and TimingCache().get("other") == 2.5
    assert not [p for p in os.listdir(tmp_path) if p != "latency.json"]  # no temporary file left
    (tmp_path / "latency.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"ignoring the timing cache .*latency.json"):
        broken = TimingCache()
    assert broken.get(key) is None
    broken.put(key, 3.0)
    assert TimingCache().get(key) == 3.0


def test_timing_cache_is_fsynced_and_never_written_through_a_link(monkeypatch, tmp_path):
    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    victim = tmp_path / "victim.json"
    victim.write_text('{"version": 1, "entries": {}}')
    (tmp_path / "cache" / "latency.json").symlink_to(victim)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    TimingCache().put("k", 1.0)
    assert synced  # the data reached the disk before the rename
    assert victim.read_text() == '{"version": 1, "entries": {}}'
    assert not (tmp_path / "cache" / "latency.json").is_symlink() and TimingCache().get("k") == 1.0
    (tmp_path / "cache" / "latency.json").write_text("[" * 100_000)  # deeply nested JSON: ignored, not a crash
    with pytest.warns(UserWarning, match=r"ignoring the timing cache .*latency.json: maximum recursion depth"):
        assert TimingCache().get("k") is None


def _benchmark_module():
    """benchmarks/latency.py, loaded from its path (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("latency_benchmark", ROOT / "benchmarks" / "latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_quick_profile_runs_and_resumes(tmp_path, monkeypatch, capsys):
    """benchmarks/latency.py --quick: a row per (batch, back end) appended at once; a rerun skips them."""
    bench = _benchmark_module()
    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "latency.json"
    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["input_size"], r["batch"], r["backend"]) for r in rows] == [("resnet18", 32, 1, "eager")]
    row = rows[0]
    assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["compressed_ms"])
    # compare_latency's measurement: the kept round is one of the rounds, its speed-up the median, the spread recorded
    ratios = [b / c for b, c in zip(row["baseline_rounds_ms"], row["compressed_rounds_ms"])]
    assert len(ratios) == row["rounds"] == 2 and row["speedup"] == pytest.approx(min(ratios))  # median_low of two
    assert row["spread"] == pytest.approx(max(ratios) / min(ratios)) and row["reliable"] == (row["spread"] <= 1.2)
    assert row["commit"] and len(row["load_avg_1m"]) == 2
    assert row["macs_ratio"] == pytest.approx(row["baseline_macs"] / row["compressed_macs"]) and row["macs_ratio"] >= 2.0
    assert sum(row["forms"].values()) == 20  # resnet18: 20 convs
    # only a layer traded for the MAC goal may run slower than the original conv
    assert row["layers_slower_than_dense"] <= row["layers_traded_for_macs"]
    assert bench.main(["--quick", "--out", str(out)]) == 0
    assert "skip fxtucker resnet18 batch 1 eager" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == rows


def test_benchmark_goals_are_the_issues():
    """resnet18: efficiency (speed-up / MAC ratio) >= 0.92, 0.85 under freezing; resnet50: speed-up >= 1.8."""
    bench = _benchmark_module()
    row = dict(model="resnet18", backend="compile-freezing", speedup=1.8, macs_ratio=2.0)
    assert bench.goal_met(row) is True and bench.goal_met({**row, "speedup": 1.6}) is False
    assert bench.goal_met({**row, "backend": "onnxruntime"}) is False  # 0.90 < 0.92
    assert bench.goal_met(dict(model="resnet50", backend="compile", speedup=1.85, macs_ratio=2.4)) is True
    assert bench.goal_met(dict(model="resnet50", backend="eager", speedup=1.0, macs_ratio=2.0)) is None
    assert bench.goal_met({**row, "reliable": False}) is None  # rounds that disagree decide nothing
    assert bench.FULL["models"] == ["resnet18", "resnet50", "mobilenet_v2"] and "compile-freezing" in bench.FULL["backends"]


def test_benchmark_plot_draws_the_stored_rows_and_leaves_out_unreliable_ones(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench = _benchmark_module()
    row = dict(method="fxtucker", model="resnet18", input_size=224, threads=2, batch=1, backend="eager",
               speedup=2.1, macs_ratio=2.5, reliable=True)
    out = tmp_path / "latency.json"
    out.write_text(json.dumps({"rows": [{**row, "reliable": False}]}))
    assert bench.plot(bench.load_rows(out), tmp_path / "a.png") is None and not (tmp_path / "a.png").exists()
    assert bench.main(["--plot", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"no reliable rows in {out} to plot"
    rows = [row, {**row, "method": "torch-pruning", "batch": 8, "backend": "onnxruntime", "speedup": 1.7},
            {**row, "model": "resnet50"}]
    out.write_text(json.dumps({"rows": rows}))
    assert bench.main(["--plot", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "latency.png")
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert out.read_text() == json.dumps({"rows": rows})  # the rows are left as they are


def test_cli_bench_prints_every_back_end_side_by_side(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    from fxtucker.cli import main

    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path))
    argv = ["bench", "--model", "resnet20", "--input-size", "16", "--num-classes", "10", "--backend", "eager",
            "onnxruntime", "--threads", "1", "--repeats", "3", "--rounds", "2", "--round-to", "8", "--max-spread", "1e9",
            "--json", str(tmp_path / "b.json")]
    timed = []
    real = fxtucker.latency.measure_latency
    monkeypatch.setattr(fxtucker.latency, "measure_latency", lambda m, *a, **k: timed.append(m) or real(m, *a, **k))
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet20 at 16x16, batch 1, 1 thread(s)") and "ranks 0.5 rounded to 8" in lines[0]
    assert lines[0].endswith("; timed alternately over 2 rounds, the round with the median speed-up shown, "
                             "unreliable when the rounds' speed-ups differ by more than 1000000000.00x or other "
                             "processes use more than 25% of the CPU time meanwhile")
    # per back end: original, compressed, then compressed, original; each back end deploys its own original
    assert len(timed) == 8 and timed[0] is timed[3] and timed[1] is timed[2] and timed[4] is timed[7]
    assert timed[5] is timed[6] and timed[0] is not timed[4] and timed[1] is not timed[5]
    assert lines[1].split() == ["back", "end", "original", "ms", "compressed", "ms", "speed-up", "original", "MACs",
                                "compressed", "MACs", "MACs", "ratio"]
    assert [l.split()[0] for l in lines[2:4]] == ["eager", "onnxruntime"]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    macs = fxtucker.count_macs(get_model("resnet20", num_classes=10), torch.randn(1, 3, 16, 16))
    for line, row in zip(lines[2:4], rows):
        assert line.split()[1:4] == [f"{row['original_ms']:.2f}", f"{row['compressed_ms']:.2f}", f"{row['speedup']:.2f}x"]
        # Forms are chosen by timing, so on a noisy machine every layer may stay dense (the original's MACs):
        # the MACs change exactly when some layer runs in a decomposed form.
        assert row["original_macs"] == macs
        assert (row["compressed_macs"] != macs) == any(form != "dense" for form in row["forms"]), row["forms"]
        assert line.split()[4:7] == [f"{macs:,}", f"{row['compressed_macs']:,}",
                                     f"{macs / row['compressed_macs']:.2f}x"]


def test_cli_bench_errors(capsys):
    from fxtucker.cli import main

    assert main(["bench", "--model", "resnet20", "--ranks", "full"]) == 2
    assert "bench compares the original with a compressed model: give --ranks a fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", "resnet20", "--backend", "tvm"])
    err = capsys.readouterr().err
    assert "invalid choice: 'tvm'" in err and all(b in err for b in ("eager", "compile", "onnxruntime"))


def test_benchmark_torch_pruning_reaches_the_same_macs():
    pytest.importorskip("torch_pruning")
    model, x = get_model("resnet20", num_classes=10).eval(), torch.randn(1, 3, 16, 16)
    target = fxtucker.count_macs(model, x) // 2
    pruned = _benchmark_module()._torch_pruning(model, x, target)
    assert 0.95 * target <= fxtucker.count_macs(pruned, x) <= target
    assert fxtucker.count_macs(model, x) == 2 * target or fxtucker.count_macs(model, x) == 2 * target + 1  # untouched


def test_onnxruntime_input_errors(monkeypatch):
    ort = pytest.importorskip("onnxruntime")

    class TwoInputs(nn.Module):
        def forward(self, x, unused):
            return x * 2

    with pytest.raises(ValueError, match=r"the exported ONNX graph has 1 inputs .* but 2 example inputs were given"):
        measure_latency(TwoInputs(), (torch.randn(2), torch.randn(2)), backend="onnxruntime")
    with pytest.raises(TypeError, match=r"backend='onnxruntime' needs tensor inputs only"):
        measure_latency(TwoInputs(), (torch.randn(2), 3), backend="onnxruntime")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match=r"backend='onnxruntime' on device 'cuda' needs onnxruntime's "
                                         r"CUDAExecutionProvider \(pip install onnxruntime-gpu\)"):
        measure_latency(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), backend="onnxruntime", device="cuda")


# --- compare_latency: alternating rounds, the median round, the unreliable-timing rule ---------------


def _scripted(monkeypatch, times: dict):
    """measure_latency replaced by a fake clock: each model's next scripted time, in call order."""
    calls = []
    queues = {id(m): list(ts) for m, ts in times.items()}

    def fake(model, *args, **kwargs):
        calls.append((model, kwargs))
        return queues[id(model)].pop(0)

    monkeypatch.setattr(fxtucker.latency, "measure_latency", fake)
    return calls


def test_compare_latency_keeps_the_median_round_and_alternates(monkeypatch):
    from fxtucker.latency import compare_latency

    a, b = nn.Identity(), nn.ReLU()
    # speed-ups per round: 2.0, 2.1, 1.95, 2.05, 2.2 -> median 2.05 (round 3), spread 2.2 / 1.95 = 1.128
    calls = _scripted(monkeypatch, {a: [10.0, 21.0, 19.5, 20.5, 11.0], b: [5.0, 10.0, 10.0, 10.0, 5.0]})
    cmp = compare_latency(a, b, torch.randn(4, 3), rounds=5, backend="eager", threads=1, repeats=7)
    assert [m for m, _ in calls] == [a, b, b, a, a, b, b, a, a, b]  # A B, B A, ...
    assert all(k == dict(backend="eager", threads=1, device="cpu", warmup=3, repeats=7, spinning=None) for _, k in calls)
    assert cmp.reliable and cmp.kept_round == 3 and cmp.spread == pytest.approx(2.2 / 1.95)
    assert (cmp.baseline_ms, cmp.candidate_ms, cmp.speedup) == (20.5, 10.0, 2.05)
    assert cmp.describe() == "20.50 -> 10.00 ms, 2.05x"
    assert cmp.batch == 4 and cmp.setting().startswith("eager, cpu, batch 4 (4x3), 1 thread(s); timed alternately "
                                                        "over 5 round(s) of 7 runs, the median round kept")
    d = cmp.to_dict()
    assert d["reliable"] and d["speedup"] == 2.05 and d["baseline_rounds_ms"] == [10.0, 21.0, 19.5, 20.5, 11.0]
    assert json.loads(json.dumps(d)) == d


class _Logged(nn.Module):
    """Appends its name to ``log`` on every forward."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append(self.name)
        return x


def test_compare_latency_interleaved_runs_the_models_in_turn_within_each_round():
    from fxtucker.latency import compare_latency

    log: list = []
    a, b = _Logged("a", log), _Logged("b", log)
    a.train(), b.eval()
    cmp = compare_latency(a, b, torch.randn(2, 3), rounds=2, backend="eager", threads=1, warmup=1, repeats=3,
                          interleave=True)
    # round 0: a's warm-up, b's, then BLOCK runs of each in turn (3 < BLOCK: one turn); round 1 b first
    assert log == ["a", "b", "a", "a", "a", "b", "b", "b", "b", "a", "b", "b", "b", "a", "a", "a"]
    assert cmp.rounds == 2 and len(cmp.candidate_rounds_ms) == 2 and all(t > 0 for t in cmp.baseline_rounds_ms)
    assert cmp.interleaved and "timed alternately in turn, 5 runs at a time, 3 runs each, in 2 round(s)" in cmp.setting()
    log.clear()
    fxtucker.latency._interleaved_round([a, b], torch.randn(2, 3), warmup=0, repeats=7, block=3)
    assert log == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a", "b"]  # turns of 3, the last of what is left
    assert cmp.to_dict()["interleaved"] is True
    assert a.training and not b.training  # each model's mode as it was
    log.clear()
    compare_latency(a, b, torch.randn(2, 3), rounds=1, backend="eager", threads=1, warmup=1, repeats=3)
    assert log == ["a"] * 4 + ["b"] * 4  # not interleaved: one model's runs, then the other's


def test_an_unreliable_timing_on_a_quiet_machine_is_not_blamed_on_a_busy_one():
    from fxtucker.latency import QUIET, LatencyComparison

    rounds = dict(backend="onnxruntime", device="cpu", threads=2, input_shape=(1, 1, 28, 28),
                  baseline_rounds_ms=(0.42, 0.40, 0.44, 0.41, 0.43), candidate_rounds_ms=(0.40, 0.30, 0.28, 0.33, 0.35),
                  max_spread=1.2, repeats=20)
    quiet = LatencyComparison(**rounds, others_cpu=0.0)
    assert not quiet.reliable and not quiet.busy
    assert quiet.describe().endswith("allowed); other processes used 0% of the machine's CPU time meanwhile, so the "
                                     "rounds vary on their own at this size (runs of 0.28 to 0.44 ms): rerun with "
                                     "more runs per round or more rounds")
    slower = LatencyComparison(**dict(rounds, candidate_rounds_ms=(0.50, 0.41, 0.44, 0.60, 0.47)), others_cpu=0.01)
    assert "(runs of 0.4 to 0.6 ms)" in slower.describe()  # over both models' rounds, whichever is slower
    for others in (None, QUIET, 0.2):  # not measured, or others at work: the machine may be busy
        assert LatencyComparison(**rounds, others_cpu=others).describe().endswith(
            "allowed); the machine is probably busy: rerun when it is quiet, or with more rounds")


def test_compare_latency_says_unreliable_when_the_rounds_disagree(monkeypatch):
    from fxtucker.latency import MAX_SPREAD, compare_latency

    a, b = nn.Identity(), nn.ReLU()
    # the issue's busy machine: one slow moment for the original, speed-ups 1.0, 185, 0.9
    _scripted(monkeypatch, {a: [2.2, 329.5, 2.2], b: [2.2, 1.78, 2.44]})
    cmp = compare_latency(a, b, torch.randn(1, 3), rounds=3)
    assert not cmp.reliable and cmp.spread > MAX_SPREAD
    text = cmp.describe()
    assert text.startswith("timing unreliable: the 3 rounds' speed-ups range from 0.90x to 185.11x (spread "
                           "205.") and "> 1.20x allowed); the machine is probably busy" in text
    assert "ms" not in text.split(";")[0]  # no number of milliseconds is printed
    d = cmp.to_dict()
    assert d["reliable"] is False and d["speedup"] is None and d["baseline_ms"] is None and d["note"] == text
    # just above and just below the limit
    _scripted(monkeypatch, {a: [1.0, 1.0, 1.0], b: [1.0, 1.0, 1.0 / 1.21]})
    assert not compare_latency(a, b, torch.randn(1), rounds=3).reliable
    _scripted(monkeypatch, {a: [1.0, 1.0, 1.0], b: [1.0, 1.0, 1.0 / 1.19]})
    assert compare_latency(a, b, torch.randn(1), rounds=3).reliable
    _scripted(monkeypatch, {a: [1.0, 1.0, 1.0], b: [1.0, 1.0, 1.0 / 1.19]})
    assert not compare_latency(a, b, torch.randn(1), rounds=3, max_spread=1.1).reliable


@pytest.mark.parametrize("kwargs, match", [
    (dict(rounds=0), r"rounds must be an int >= 1, got 0"),
    (dict(max_spread=0.9), r"max_spread must be a finite number >= 1 \(the largest max / min of the rounds' "
                           r"speed-ups\), got 0.9"),
    (dict(max_spread=float("nan")), r"max_spread must be a finite number >= 1"),
])
def test_compare_latency_errors(kwargs, match):
    from fxtucker.latency import compare_latency

    with pytest.raises(ValueError, match=match):
        compare_latency(nn.Identity(), nn.Identity(), torch.randn(1), **kwargs)


def test_compare_latency_really_times(monkeypatch):
    from fxtucker.latency import compare_latency

    small, big = nn.Conv2d(8, 8, 1), nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
    cmp = compare_latency(small, big, torch.randn(1, 8, 8, 8), rounds=2, warmup=1, repeats=2, threads=1)
    assert cmp.rounds == 2 and all(t > 0 for t in cmp.baseline_rounds_ms + cmp.candidate_rounds_ms)
    assert cmp.threads == 1 and cmp.input_shape == (1, 8, 8, 8)


def test_from_seven_rounds_the_fastest_and_slowest_round_are_not_counted_in_the_spread(monkeypatch):
    from fxtucker.latency import ROUNDS, TRIM_FROM, compare_latency

    assert ROUNDS >= TRIM_FROM == 7  # the default number of rounds leaves out the extreme two
    a, b = nn.Identity(), nn.ReLU()
    # one stalled round each way among seven: speed-ups 1.6, 1.0, 1.65, 1.7, 1.6, 2.4, 1.62
    base, cand = [1.6, 1.0, 1.65, 1.7, 1.6, 2.4, 1.62], [1.0] * 7
    _scripted(monkeypatch, {a: list(base), b: list(cand)})
    cmp = compare_latency(a, b, torch.randn(2, 3))
    assert cmp.rounds == 7 and cmp.counted == (1.6, 1.6, 1.62, 1.65, 1.7)
    assert cmp.reliable and cmp.spread == pytest.approx(1.7 / 1.6) and cmp.speedup == 1.62
    assert ("unreliable when the middle 5 of the 7 rounds' speed-ups differ by more than 1.20x or other processes use "
            "more than 25% of the CPU time meanwhile;") in cmp.setting()
    assert cmp.to_dict()["counted"] == [1.6, 1.6, 1.62, 1.65, 1.7]
    # two stalled rounds the same way are counted: the middle five then disagree
    _scripted(monkeypatch, {a: [1.6, 1.0, 1.65, 1.7, 1.0, 2.4, 1.62], b: list(cand)})
    cmp = compare_latency(a, b, torch.randn(2, 3))
    assert not cmp.reliable and cmp.spread == pytest.approx(1.7)
    assert cmp.describe() == ("timing unreliable: the 7 rounds' speed-ups range from 1.00x to 2.40x, the middle 5 "
                              "from 1.00x to 1.70x (spread 1.70x > 1.20x allowed); the machine is probably busy: "
                              "rerun when it is quiet, or with more rounds")
    # six rounds: every one is counted
    _scripted(monkeypatch, {a: base[:6], b: cand[:6]})
    cmp = compare_latency(a, b, torch.randn(2, 3), rounds=6)
    assert cmp.counted == tuple(sorted(base[:6])) and not cmp.reliable


def test_cli_bench_prints_unreliable_instead_of_a_number(tmp_path, monkeypatch, capsys):
    from fxtucker.cli import main

    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path))
    clock = iter([4.0, 2.0, 2.0, 1.0, 2.0, 2.0])  # A=4 B=2 | B=2 A=1 | A=2 B=2: speed-ups 2.0, 0.5, 1.0
    monkeypatch.setattr(fxtucker.latency, "measure_latency", lambda *a, **k: next(clock))
    argv = ["bench", "--model", "resnet20", "--input-size", "16", "--num-classes", "10", "--threads", "1",
            "--rounds", "3", "--json", str(tmp_path / "b.json")]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:4] == ["eager", "unreliable", "unreliable", "unreliable"]
    assert lines[3].startswith("eager: timing unreliable: the 3 rounds' speed-ups range from 0.50x to 2.00x "
                               "(spread 4.00x > 1.20x allowed)")
    row = json.loads((tmp_path / "b.json").read_text())["rows"][0]
    assert row["speedup"] is None and row["original_ms"] is None and row["timing"]["ratios"] == [2.0, 0.5, 1.0]


def test_each_test_times_into_a_cache_of_its_own(tmp_path_factory):
    """conftest's autouse fixture: no test reads or writes the user's timing cache (~/.cache/fxtucker)."""
    here = fxtucker.latency.cache_dir()
    assert here.is_dir() and here.is_relative_to(tmp_path_factory.getbasetemp()) and not any(here.iterdir())


def test_compare_latency_interleaved_checks_its_arguments_as_measure_latency_does():
    from fxtucker.latency import _interleaved_round, compare_latency

    a, b = nn.Identity(), nn.ReLU()
    with pytest.raises(ValueError, match=r"threads must be a positive int or None"):
        compare_latency(a, b, torch.randn(2, 3), rounds=1, threads=0, interleave=True)
    with pytest.raises(ValueError, match=r"repeats must be >= 1"):
        compare_latency(a, b, torch.randn(2, 3), rounds=1, repeats=0, interleave=True)
    with pytest.raises(ValueError, match=r"block must be an int >= 1 \(runs per turn\), got 0"):
        _interleaved_round([a, b], torch.randn(2, 3), block=0)


def test_compare_latency_calls_a_busy_machine_unreliable_even_when_the_rounds_agree(monkeypatch):
    """Other processes' share of the CPU time while timing (/proc's jiffies: all, not idle, this
    process's) above max_others makes the comparison unreliable, says why, and gives no number."""
    from fxtucker import latency

    monkeypatch.setattr(latency, "measure_latency", lambda m, *a, **k: 2.0 if isinstance(m, nn.Identity) else 1.0)
    ticks = iter([(1000, 100, 10), (2000, 800, 60)])  # 1000 jiffies passed: 700 not idle, 50 of them this process's
    monkeypatch.setattr(latency, "_cpu_times", lambda: next(ticks))
    cmp = compare_latency(nn.Identity(), nn.ReLU(), torch.randn(2), rounds=3)
    assert cmp.others_cpu == pytest.approx(0.65) and cmp.busy and not cmp.reliable and cmp.spread == 1.0
    assert cmp.to_dict()["speedup"] is None and cmp.to_dict()["others_cpu"] == pytest.approx(0.65)
    assert cmp.describe().startswith("timing unreliable: other processes used 65% of the machine's CPU time while "
                                     "the models were timed (more than 25% allowed)")
    assert cmp.setting().endswith("or other processes use more than 25% of the CPU time meanwhile; other processes "
                                  "used 65% of the CPU time")
    ticks = iter([(1000, 100, 10), (2000, 800, 60)])
    cmp = compare_latency(nn.Identity(), nn.ReLU(), torch.randn(2), rounds=3, max_others=0.7)
    assert cmp.reliable and cmp.describe() == "2.00 -> 1.00 ms, 2.00x"
    monkeypatch.setattr(latency, "_cpu_times", lambda: None)  # no /proc: not checked
    cmp = compare_latency(nn.Identity(), nn.ReLU(), torch.randn(2), rounds=3)
    assert cmp.others_cpu is None and cmp.reliable and "processes used" not in cmp.setting()
    assert cmp.setting().endswith("the CPU time of other processes was not measured (a timing shorter than "
                                  "100 ticks of the machine's CPU time, or no Linux /proc), so only the spread was checked")
    cmp = compare_latency(nn.Identity(), nn.ReLU(), torch.randn(2), rounds=3, max_others=1.0)  # never checked: nothing said
    assert "measured" not in cmp.setting() and "processes" not in cmp.setting()
    # under MIN_TICKS of the machine's CPU time: too short a window to judge (all of it other processes')
    ticks = iter([(1000, 100, 10), (1099, 199, 10)])
    monkeypatch.setattr(latency, "_cpu_times", lambda: next(ticks))
    cmp = compare_latency(nn.Identity(), nn.ReLU(), torch.randn(2), rounds=3)
    assert next(ticks, None) is None  # both readings were taken
    assert cmp.others_cpu is None and cmp.reliable and "was not measured" in cmp.setting()
    with pytest.raises(ValueError, match=r"max_others must be a number from 0 to 1 .*, got 1.5"):
        compare_latency(nn.Identity(), nn.ReLU(), torch.randn(2), max_others=1.5)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc")
def test_cpu_times_reads_the_machine_and_this_process():
    first = _real_cpu_times()  # imported before conftest replaces it: the real /proc
    sum(i * i for i in range(2_000_000))  # some CPU time of this process's own
    second = _real_cpu_times()
    assert first is not None and second is not None
    assert second[2] > first[2] and second[1] - first[1] >= second[2] - first[2] - 5  # ours is among the busy ticks
    assert second[0] - first[0] >= second[1] - first[1]
    # a child's CPU time is this process's, not another's (inductor compiles in worker processes)
    import subprocess
    import sys
    burn = ("import time\nwhile time.process_time() < 0.3: pass\nprint('burnt', flush=True)\ntime.sleep(60)")
    before = _real_cpu_times()
    child = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "burnt"
        after = _real_cpu_times()
    finally:
        child.kill()
        child.wait()
    assert after[2] - before[2] >= 0.2 * os.sysconf("SC_CLK_TCK")  # at least most of the child's 0.3 s


def test_thread_scaling_runs_the_thread_counts_in_turn_resumes_and_tabulates(tmp_path, monkeypatch, capsys):
    """benchmarks/thread_scaling.py: each row at every thread count in turn (reversed the next pass),
    torch's threads set for the row and restored, rows appended at once and skipped on a rerun; the
    table's efficiency and each model's gain from the second thread come from the rows' medians."""
    spec = importlib.util.spec_from_file_location("thread_scaling", ROOT / "benchmarks" / "thread_scaling.py")
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    calls = []
    # the original gains 2x from the second thread, the compressed model 1.5x: the speed-up drops
    ms = {(1, "baseline"): 20.0, (2, "baseline"): 10.0, (1, "compressed"): 9.0, (2, "compressed"): 6.0}

    def run_row(args, model_name, batch, backend, method):
        calls.append((args.threads, torch.get_num_threads(), backend, method))
        b, c = ms[args.threads, "baseline"], ms[args.threads, "compressed"]
        return dict(method=method, model=model_name, input_size=args.input_size, batch=batch, backend=backend,
                    threads=args.threads, ranks=args.ranks, round_to=args.round_to, min_macs_ratio=args.min_macs_ratio,
                    search=args.search, baseline_ms=b, compressed_ms=c, speedup=b / c, macs_ratio=2.5,
                    spread=1.01, reliable=True)

    monkeypatch.setattr(ts.latency, "run_row", run_row)
    out = tmp_path / "ts.json"
    threads = torch.get_num_threads()
    argv = ["--out", str(out), "--backends", "eager", "--batches", "1", "--passes", "2", "--input-size", "32"]
    assert ts.main(argv) == 0
    assert torch.get_num_threads() == threads
    assert [(t, n) for t, n, _, _ in calls] == [(1, 1), (2, 2), (2, 2), (1, 1)]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["pass"], r["threads"]) for r in rows] == [(0, 1), (0, 2), (1, 2), (1, 1)]
    text = capsys.readouterr().out
    assert "| fxtucker | resnet18 32x32 | 1 | eager | 1 | 2 of 2 | 20.00 | 9.00 | 2.22x | 2.50x | 0.89 |" in text
    assert "| fxtucker | resnet18 32x32 | 1 | eager | 2 | 2 of 2 | 10.00 | 6.00 | 1.67x | 2.50x | 0.67 |" in text
    assert "| fxtucker | resnet18 32x32 | 1 | eager | 1 -> 2 | 2.00x | 1.50x | 0.75 |" in text
    # a pass whose rounds disagreed is left out where another one agreed; where none did, all count
    odd = {**rows[2], "pass": 2, "baseline_ms": 90.0, "speedup": 15.0, "reliable": False}
    lines = ts.table([*rows, odd]).splitlines()
    assert "| fxtucker | resnet18 32x32 | 1 | eager | 2 | 2 of 3 | 10.00 | 6.00 | 1.67x | 2.50x | 0.67 |" in lines
    lines = ts.table([odd]).splitlines()
    assert "| fxtucker | resnet18 32x32 | 1 | eager | 2 | none of 1 (all counted) | 90.00 | 6.00 | 15.00x | 2.50x | 6.00 |" \
        in lines
    calls.clear()
    assert ts.main(argv) == 0 and calls == []
    assert "skip pass 1 fxtucker batch 1 eager 1 thread(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ts.main([*argv, "--threads", "0", "2"])
    assert "--threads must be >= 1, got [0]" in capsys.readouterr().err
