"""`fxtucker compress` under torchrun: 2 CPU processes (gloo) run the whole flow and end identical.

The ranks run tests/_cli_ddp_worker.py, which calls fxtucker.cli.main as `torchrun -m fxtucker`
does and records per rank the gates and threshold it strips at, lambda and its final model.
"""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

import fxtucker
from fxtucker.models import get_model
from tests.conftest import run_child

WORKER = Path(__file__).with_name("_cli_ddp_worker.py")
FASHION = Path("/usr/share/datasets/fashion-mnist")
CONFIG = ("train_epochs = 1\nreg_epochs = 2\nfinetune_epochs = 1\nreg_weight = 0.5\ntarget_speedup = 1.5\n"
          "steer_every = 2\n")

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built"),
    pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp: Path, out: Path, results: Path, kill_at: str = "-", resume: bool = False):
    results.mkdir(exist_ok=True)
    config = tmp / "tiny.toml"
    config.write_text(CONFIG)
    argv = ["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--config", str(config),
            "--train-subset", "256", "--eval-subset", "128", "--batch-size", "32", "--baseline-epochs", "1",
            "--no-progress", "--backend", "eager", "--latency-batch", "2", "--rounds", "1", "--repeats", "1",
            "--out", str(out)] + (["--resume"] if resume else [])
    return run_child(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(results), kill_at, *argv],
        env={**os.environ, "OMP_NUM_THREADS": "1", "FXTUCKER_CACHE_DIR": str(tmp / "cache")},
    )


def _ranks(results: Path) -> tuple[dict, dict]:
    return tuple(torch.load(results / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out, results = tmp / "run", tmp / "results"
    proc = _torchrun(tmp, out, results)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, out, results


def test_two_ranks_end_with_the_same_compressed_model(reference):
    proc, out, results = reference
    r0, r1 = _ranks(results)
    # Step 3 decided the same on both ranks: gate values, lambda at each epoch, the budget threshold.
    _assert_same(r0["gates"], r1["gates"])
    assert r0["threshold"] == r1["threshold"] and r0["reg_weight"] == r1["reg_weight"]
    assert r0["reg_weight"][-1] != 0.5  # lambda was steered, on both ranks alike
    # Kept ranks (the shapes), weights and BatchNorm statistics after fine-tuning.
    _assert_same(r0["model"], r1["model"])
    assert any(k.endswith(".running_mean") for k in r0["model"])
    assert r0["report"] == r1["report"]
    # Only rank 0 printed the report and wrote the files, and they hold the same model.
    assert proc.stdout.count("/report.json, report.md") == 1 and proc.stdout.count("training the baseline") == 1
    _assert_same(torch.load(out / "compressed_state_dict.pt", weights_only=True), r0["model"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["macs_after"] == r0["report"]["macs_after"] <= rep["macs_before"] / 1.5
    loaded = fxtucker.load(out / "manifest", lambda: get_model("resnet20", num_classes=10, in_channels=1))
    _assert_same(loaded.state_dict(), r0["model"])


def test_killed_ranks_resume_to_the_uninterrupted_result(reference, tmp_path):
    _, _, ref_results = reference
    out, results = tmp_path / "run", tmp_path / "results"
    killed = _torchrun(tmp_path, out, results, kill_at="regularize:1")  # after 1 of step 3's 2 epochs
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr
    assert (out / "regularize.ckpt").is_file() and not (out / "report.json").exists()
    resumed = _torchrun(tmp_path, out, results, resume=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    r0, r1 = _ranks(results)
    _assert_same(r0["model"], r1["model"])
    ref0, _ = _ranks(ref_results)
    _assert_same(r0["gates"], ref0["gates"])
    _assert_same(r0["model"], ref0["model"])
    assert r0["reg_weight"] == ref0["reg_weight"] and r0["threshold"] == ref0["threshold"]
    assert json.loads((out / "report.json").read_text())["macs_after"] == ref0["report"]["macs_after"]
