"""Hostile inputs and faults (issue 16): reproducible and resumable CLI runs, run configurations that
must match on resume, output paths and config files that are wrong, models with nothing to decompose."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxtucker
from fxtucker.cli import main
from fxtucker.compress import CompressConfig, compress
from fxtucker.runs import RunMismatch, record_run
from tests.conftest import CHILD_TIMEOUT_S, EXACT

REPO = Path(__file__).resolve().parent.parent
CONFIG = "train_epochs = 0\nreg_epochs = 2\nfinetune_epochs = 1\ntarget_speedup = 1.5\n"


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _fake_fashion_mnist(root: Path) -> Path:
    """96 training and 48 test images of Fashion-MNIST's format, learnable from their brightness."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 96), ("t10k", 48)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = (rng.integers(0, 60, size=(n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(_idx(images))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return root


def _argv(root: Path, config: Path, out: Path, *more: str) -> list[str]:
    return ["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--root", str(root), "--batch-size", "32",
            "--baseline-epochs", "1", "--config", str(config), "--no-progress", "--threads", "1", "--seed", "3",
            "--backend", "eager", "--latency-batch", "2", "--rounds", "2", "--repeats", "2",
            "--out", str(out), *more]


def _report(out: Path) -> dict:
    """report.json without what is measured rather than computed: latencies, seconds, the command line, and the
    deployed model (its forms are chosen by timing)."""
    rep = json.loads((out / "report.json").read_text())
    for key in ("latency", "deployed", "command"):
        rep.pop(key)
    for record in rep["history"] + rep["baseline_history"]:
        record.pop("seconds")
    return rep


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same `fxtucker compress` command run twice in fresh directories."""
    base = tmp_path_factory.mktemp("runs")
    root, config = _fake_fashion_mnist(base / "fm"), base / "a.toml"
    config.write_text(CONFIG)
    with pytest.MonkeyPatch.context() as mp:  # module scope: before conftest's per-test timing cache
        mp.setenv("FXTUCKER_CACHE_DIR", str(base / "cache"))
        torch.manual_seed(1234)  # whatever the global state before, --seed decides
        assert main(_argv(root, config, base / "a")) == 0
        torch.manual_seed(999)
        assert main(_argv(root, config, base / "b")) == 0
    return base, root, config


def test_the_same_command_with_the_same_seed_gives_the_same_report(two_runs):
    base, _, _ = two_runs
    a, b = _report(base / "a"), _report(base / "b")
    assert a["baseline_history"] and a["history"]
    assert a == b
    assert (base / "a" / "baseline_state_dict.pt").read_bytes() == (base / "b" / "baseline_state_dict.pt").read_bytes()


@pytest.mark.parametrize("change,keys", [
    (["--config", "OTHER"], r"config.reg_weight: 'auto' then, 0.5 now"),
    (["--train-subset", "64"], r"train_subset: None then, 64 now"),
    (["--batch-size", "16"], r"batch_size: 32 then, 16 now"),
    (["--seed", "4"], r"config.seed: 3 then, 4 now; seed: 3 then, 4 now"),
], ids=["reg-weight", "train-subset", "batch-size", "seed"])
def test_resume_with_another_configuration_is_refused_naming_each_key(two_runs, capsys, change, keys):
    base, root, config = two_runs
    other = base / "other.toml"
    other.write_text(CONFIG + "reg_weight = 0.5\n")
    argv = _argv(root, config, base / "a", "--resume")
    for flag, value in zip(change[::2], change[1::2]):
        value = str(other) if value == "OTHER" else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    before = {p.name: p.stat().st_mtime_ns for p in (base / "a").iterdir()}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot resume the run in '{base / 'a'}': its configuration differs from the stored one (run.json)" in err
    assert keys in err and "Resume with the settings the run started with" in err
    assert {p.name: p.stat().st_mtime_ns for p in (base / "a").iterdir()} == before  # nothing written


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_resume_into_an_empty_or_mistyped_out_is_refused(two_runs, capsys, tmp_path, where):
    _, root, config = two_runs
    out = tmp_path / "typo"
    if where == "empty":
        out.mkdir()
    assert main(_argv(root, config, out, "--resume")) == 2
    err = capsys.readouterr().err
    what = "does not exist" if where == "missing" else r"holds no run to continue (run.json is missing)"
    assert f"--resume: the output directory '{out}' {what}; check --out" in err
    assert not out.exists() or not any(out.iterdir())


def test_a_run_killed_and_resumed_ends_as_the_uninterrupted_one(two_runs, tmp_path):
    base, root, config = two_runs
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fxtucker.cli", *_argv(root, config, out)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + CHILD_TIMEOUT_S
    while not (out / "regularize.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (out / "regularize.ckpt").exists(), "killed before step 3's first checkpoint, not where this test kills"
    assert not (out / "report.json").exists()
    assert subprocess.run(cmd + ["--resume"], env=env, cwd=REPO, capture_output=True).returncode == 0
    assert _report(out) == _report(base / "a")


# --- --out and --config that cannot be used ----------------------------------------------------


def test_out_that_is_a_file_or_under_one_exits_2_before_training(two_runs, tmp_path, capsys):
    _, root, config = two_runs
    (tmp_path / "f").write_text("x")
    assert main(_argv(root, config, tmp_path / "f")) == 2
    assert f"--out '{tmp_path / 'f'}' is an existing file, not a directory" in capsys.readouterr().err
    assert main(_argv(root, config, tmp_path / "f" / "run")) == 2
    assert (f"--out '{tmp_path / 'f' / 'run'}' is under '{tmp_path / 'f'}', which is an existing file"
            in capsys.readouterr().err)


def test_unwritable_out_exits_2_before_training(two_runs, tmp_path, capsys, monkeypatch):
    import fxtucker.cli as cli

    _, root, config = two_runs

    def refuse(*args, **kwargs):  # a read-only directory (root, who runs CI here, writes into any)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse)
    assert main(_argv(root, config, tmp_path / "run")) == 2
    assert (f"--out '{tmp_path / 'run'}' cannot be written (Permission denied); give a directory you can write to"
            in capsys.readouterr().err)
    assert not (tmp_path / "run" / "baseline.ckpt").exists()


@pytest.mark.parametrize("content,message", [
    (b"compress = 3\n", r"'compress' must be a table \(\[compress\] followed by key = value lines\), got a int"),
    (b"train_epochs = = 1\n", r"is not valid TOML: "),
    (b"reg = \"\xff\xfe\"\n", r"is not UTF-8 text"),
], ids=["not-a-table", "syntax", "encoding"])
def test_bad_toml_exits_2_naming_the_file(two_runs, tmp_path, capsys, content, message):
    _, root, _ = two_runs
    bad = tmp_path / "bad.toml"
    bad.write_bytes(content)
    assert main(_argv(root, bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"--config '{bad}'" in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,message", [
    (["export", "--model", "resnet20", "--format", "onnx", "--out", "m", "--input-size", "0"], "--input-size"),
    (["export", "--model", "resnet20", "--format", "onnx", "--out", "m", "--num-classes", "0"], "--num-classes"),
    (["export", "--model", "resnet20", "--format", "onnx", "--out", "m", "--batch", "-1"], "--batch"),
    (["bench", "--model", "resnet20", "--batch", "0"], "--batch"),
], ids=["export-size-0", "export-classes-0", "export-batch-neg", "bench-batch-0"])
def test_sizes_below_1_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"argument {message}" in capsys.readouterr().err


def test_export_refuses_an_empty_example_input(tmp_path):
    gm = fxtucker.trace(nn.Sequential(nn.Conv2d(3, 4, 3)).eval())
    with pytest.raises(ValueError, match=r"example input 0 has shape \(0, 3, 8, 8\): it holds no elements, so the "
                                         r"parity check would compare empty tensors"):
        fxtucker.export(gm, torch.randn(0, 3, 8, 8), tmp_path / "m.pt", "torchscript")
    assert not (tmp_path / "m.pt").exists()


def test_a_corrupt_image_in_an_imagefolder_is_named(tmp_path):
    from PIL import Image

    from fxtucker.data import get_dataset

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "ok.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = get_dataset("imagefolder", False, root=tmp_path)
    index = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png")][0]
    with pytest.raises(ValueError, match=rf"imagefolder: the image {tmp_path / 'b' / 'broken.png'} cannot be decoded "
                                         rf"\(UnidentifiedImageError: .*\); remove or replace the file"):
        ds[index]


# --- the run configuration on resume (library) ------------------------------------------------


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.arange(16) % 3)
    return model, DataLoader(data, batch_size=8), torch.randn(1, 1, 8, 8)


def test_compress_resume_refuses_a_changed_config(tmp_path):
    model, loader, x = _tiny()
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, target_speedup=1.2)
    compress(model, loader, x, config=config, out_dir=tmp_path, progress=False)
    changed = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, target_speedup=1.3, reg="l1")
    with pytest.raises(RunMismatch, match=r"differs from the stored one \(compress.json\) in 2 key\(s\): config.reg: "
                                          r"'funnel' then, 'l1' now; config.target_speedup: 1.2 then, 1.3 now"):
        compress(model, loader, x, config=changed, out_dir=tmp_path, resume=True, progress=False)
    again = compress(model, loader, x, config=config, out_dir=tmp_path, resume=True, progress=False)
    assert again.report["macs_after"] <= again.report["macs_before"] / 1.2


def test_record_run_names_added_and_removed_keys_and_reads_no_junk(tmp_path):
    record_run(tmp_path, {"a": 1, "config": {"b": [1, 2]}}, resume=False)
    record_run(tmp_path, {"a": 1, "config": {"b": (1, 2)}}, resume=True)  # tuples are stored as lists
    with pytest.raises(RunMismatch, match=r"in 2 key\(s\): a: 1 then, '\(absent\)' now; c: '\(absent\)' then, 2 now"):
        record_run(tmp_path, {"c": 2, "config": {"b": [1, 2]}}, resume=True)
    (tmp_path / "run.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match=r"run.json: the stored run configuration cannot be read"):
        record_run(tmp_path, {"a": 1}, resume=True)


def test_a_compress_run_stored_before_an_option_existed_resumes_at_its_default(tmp_path):
    model, loader, x = _tiny()
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, target_speedup=1.2)
    first = compress(model, loader, x, config=config, out_dir=tmp_path, progress=False)
    stored = json.loads((tmp_path / "compress.json").read_text())
    del stored["config"]["distill_reg"]  # as written before CompressConfig had it
    (tmp_path / "compress.json").write_text(json.dumps(stored))
    again = compress(model, loader, x, config=config, out_dir=tmp_path, resume=True, progress=False)
    assert again.report["macs_after"] == first.report["macs_after"]
    with pytest.raises(RunMismatch, match=r"in 1 key\(s\): config.distill_reg: '\(absent\)' then, True now"):
        compress(model, loader, x, config=dataclasses.replace(config, distill_reg=True), out_dir=tmp_path,
                 resume=True, progress=False)


# --- nothing to decompose ------------------------------------------------------------------------


class _Undecomposable(nn.Module):
    """Every conv is skipped: a weight-standardized conv (its weight computed in forward) and tied weights."""

    def __init__(self):
        super().__init__()
        self.ws = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        w = self.ws.weight - self.ws.weight.mean((1, 2, 3), keepdim=True)
        x = torch.relu(F.conv2d(x, w, self.ws.bias, padding=1))
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(x.mean((2, 3)))


def test_compress_and_optimize_a_model_with_nothing_to_decompose(tmp_path):
    from fxtucker.deploy import optimize_for_inference

    _, loader, x = _tiny()
    model = _Undecomposable().eval()
    with pytest.warns(UserWarning, match=r"compress: no layer of the model can be decomposed, so it is returned "
                                         r"unchanged and untrained \(the MAC budget cannot be met\): decompose_conv "
                                         r"left 3 layer\(s\)"):
        result = compress(model, loader, x, config=CompressConfig(target_speedup=2.0), out_dir=tmp_path,
                          progress=False)
    torch.testing.assert_close(result.model(x), model(x), **EXACT)
    assert result.report["macs_after"] == result.report["macs_before"] and result.history == []
    reasons = {r["name"]: r["reason"] for r in result.report["layers"]}
    assert "its weight is computed in forward" in reasons["conv2d"] and "shared with another module" in reasons["a"] + reasons["b"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = optimize_for_inference(model, x, ranks=0.5, threads=1)
    torch.testing.assert_close(fast(x), model(x))
