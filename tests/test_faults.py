"""Faults in long runs: SIGKILL at any moment, disk full in the middle of a write, infinite loss.

tests/test_train.py already covers a KeyboardInterrupt between epochs, checkpoints damaged after
the fact (truncated, bytes changed under the checksum), a write that fails before writing
anything (``torch.save`` / ``os.replace`` raising) and NaN or Inf from the penalty. This file adds:

- a real ``SIGKILL`` of a training subprocess at exact points of the checkpoint write sequence
  (inside ``torch.save`` with half the bytes written, before the ``.prev`` link, before the final
  rename, inside the JSONL append) and, in the slow run, at random moments and after the k-th
  checkpoint; then ``resume=True`` must end bitwise where an uninterrupted run ends, redoing at
  most the epoch that was in flight;
- a disk that fills up in the middle of writing the checkpoint or the JSONL line (the file layer
  writes half the bytes, then raises ENOSPC): the last good checkpoint stays byte for byte, no
  temp file is left, and a resume repairs the log and ends where the uninterrupted run ends;
- a cross-entropy that is itself infinite (not the penalty) stops the run cleanly;
- untrusted files: a model or training checkpoint holding pickled code is refused without running
  it (weights_only=True), and a checkpoint with a valid checksum but the wrong structure is set
  aside like a damaged one.

Run as ``python -m tests.test_faults OUT_DIR EPOCHS PAUSE`` it is the training worker the tests kill.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fxtucker.io  # noqa: F401
from fxtucker.checkpoint import CheckpointFiles
from fxtucker.io import digest
from fxtucker.train import TrainConfig, TrainingDiverged, train
from tests.conftest import CHILD_TIMEOUT_S

io_module = sys.modules["fxtucker.io"]  # every file write goes through fxtucker.io

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 5
# Where the worker stops to be killed: (what, which checkpoint write, 1-based).
PAUSES = {
    "save-half": "torch.save has written half of the checkpoint's bytes to the temp file",
    "link": "the temp file is complete; the current checkpoint is about to be linked to .prev",
    "replace": "the temp file is complete and .prev rotated; the final rename is next",
    "append": "half of the epoch's JSONL line is written",
}
PAUSE_SECONDS = 60.0
STEP_SLEEP = float(os.environ.get("FXTUCKER_FAULTS_STEP_SLEEP", "0"))


# --- the run ----------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(self.drop(torch.flatten(x, 1)))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() * 2 + (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


def _penalty(model, epoch, step):
    """Draws from python's and numpy's RNGs, so a resume must restore them exactly."""
    if STEP_SLEEP:  # slows the worker's steps so that random kills spread over the epochs
        time.sleep(STEP_SLEEP)
    return 1e-3 * (1.0 + random.random() + float(np.random.rand())) * (model.fc.weight ** 2).sum()


def run(out_dir: Path, epochs: int = EPOCHS, resume: bool = False):
    torch.set_num_threads(1)
    torch.manual_seed(123)
    model = Tiny()
    history = train(model, _loader(), TrainConfig(epochs=epochs, lr=0.05), penalty=_penalty,
                    out_dir=out_dir, resume=resume, progress=False)
    return model, history


def _pause(out_dir: Path, what: str) -> None:
    """Tell the test where we are, then wait to be killed."""
    (out_dir / f"paused-{what}").write_text(str(os.getpid()))
    time.sleep(PAUSE_SECONDS)
    raise SystemExit(f"worker was not killed at {what}")


def _install_pause(out_dir: Path, pause: str) -> None:
    """Make the ``n``-th checkpoint write (the ``n``-th JSONL append) stop at ``what``; ``pause`` is ``what:n``."""
    if pause == "none":
        return
    what, n = pause.split(":")
    n = int(n)
    count = {"save": 0, "append": 0}
    real_save, real_link, real_replace = torch.save, os.link, os.replace
    real_append = CheckpointFiles.append

    def save(obj, f, *args, **kwargs):
        count["save"] += 1
        if what != "save-half" or count["save"] != n:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        _pause(out_dir, what)

    def link(src, dst, *args, **kwargs):
        if what == "link" and str(src).endswith(".ckpt") and count["save"] == n:
            _pause(out_dir, what)
        return real_link(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if what == "replace" and ".ckpt.tmp." in str(src) and count["save"] == n:
            _pause(out_dir, what)
        return real_replace(src, dst, *args, **kwargs)

    def append(self, record):
        count["append"] += 1
        if what != "append" or count["append"] != n:
            return real_append(self, record)
        line = json.dumps(record) + "\n"
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(line[: len(line) // 2])
            f.flush()
            os.fsync(f.fileno())
        _pause(out_dir, what)

    torch.save, os.link, os.replace = save, link, replace
    CheckpointFiles.append = append


def _worker(argv: list[str]) -> None:
    out_dir, epochs, pause = Path(argv[0]), int(argv[1]), argv[2]
    resume = len(argv) > 3 and argv[3] == "resume"
    out_dir.mkdir(parents=True, exist_ok=True)
    _install_pause(out_dir, pause)
    (out_dir / "started").write_text(str(time.time()))
    model, history = run(out_dir, epochs, resume=resume)
    (out_dir / "trained").write_text(str(time.time()))
    torch.save(model.state_dict(), out_dir / "final.pt")
    (out_dir / "final.json").write_text(json.dumps(history))


def spawn(out_dir: Path, pause: str = "none", resume: bool = False, step_sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FXTUCKER_FAULTS_STEP_SLEEP": str(step_sleep)}
    args = [sys.executable, "-m", "tests.test_faults", str(out_dir), str(EPOCHS), pause]
    return subprocess.Popen(args + (["resume"] if resume else []), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = CHILD_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"worker exited ({proc.returncode}) before {path.name}: {err[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"worker did not reach {path.name} in {timeout} s")
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


# --- checks -----------------------------------------------------------------------------------


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def checkpoint_epoch(path: Path):
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return raw["payload"]["epoch"]
    except Exception:
        return None


def state_on_disk(out_dir: Path) -> dict:
    """What a resume will see: the JSONL lines that parse and the epochs of the checkpoints."""
    lines = (out_dir / "train.jsonl").read_text().splitlines() if (out_dir / "train.jsonl").exists() else []
    done = 0
    for line in lines:
        try:
            json.loads(line)
            done += 1
        except json.JSONDecodeError:
            pass
    return {"logged": done, "ckpt": checkpoint_epoch(out_dir / "train.ckpt"),
            "prev": checkpoint_epoch(out_dir / "train.ckpt.prev")}


def assert_same_end(out_dir: Path, model_state: dict, history: list, reference) -> None:
    ref_model, ref_history = reference
    assert model_state.keys() == ref_model.state_dict().keys()
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model_state[k], v), k
    assert without_seconds(history) == without_seconds(ref_history)
    logged = [json.loads(line) for line in (out_dir / "train.jsonl").read_text().splitlines()]
    assert without_seconds(logged) == without_seconds(ref_history)
    assert checkpoint_epoch(out_dir / "train.ckpt") == EPOCHS
    assert not [p.name for p in out_dir.iterdir() if ".tmp." in p.name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in this process; the workers run the same code, so it is bitwise the same)."""
    return run(tmp_path_factory.mktemp("reference"))


def resume_in_process(out_dir: Path):
    before = state_on_disk(out_dir)
    model, history = run(out_dir, resume=True)
    return before, model.state_dict(), history


# --- SIGKILL ----------------------------------------------------------------------------------


def test_sigkill_inside_a_checkpoint_write_then_resume_ends_bitwise_the_same(tmp_path, reference):
    # The default run's one subprocess test (~4 s); the slow run kills at every point of the sequence.
    pause = "save-half:2"
    proc = spawn(tmp_path, pause)
    wait_for(tmp_path / f"paused-{pause.split(':')[0]}", proc)
    kill(proc)
    n = int(pause.split(":")[1])
    before, state, history = resume_in_process(tmp_path)
    # Epochs 1..n-1 were checkpointed; epoch n's write was torn: it is the one redone.
    assert before["ckpt"] == n - 1 and before["logged"] == n
    assert_same_end(tmp_path, state, history, reference)


@pytest.mark.slow
# The first write has no checkpoint to link to .prev, so "link" starts at the second.
@pytest.mark.parametrize("pause", [f"{what}:{n}" for what in PAUSES for n in ((2, EPOCHS) if what == "link" else (1, 2, EPOCHS))])
def test_sigkill_at_every_point_of_the_write_sequence(tmp_path, reference, pause):
    what, n = pause.split(":")
    proc = spawn(tmp_path, pause)
    wait_for(tmp_path / f"paused-{what}", proc)
    kill(proc)
    before = state_on_disk(tmp_path)
    # No finished epoch is lost: the newest usable checkpoint holds every epoch before the one
    # being written (n - 1), and a torn file never counts.
    assert max(e for e in (before["ckpt"], before["prev"], 0) if e is not None) == int(n) - 1, before
    resumed = spawn(tmp_path, resume=True)
    out, err = resumed.communicate(timeout=CHILD_TIMEOUT_S)
    assert resumed.returncode == 0, err[-3000:]
    state = torch.load(tmp_path / "final.pt", weights_only=True)
    history = json.loads((tmp_path / "final.json").read_text())
    assert_same_end(tmp_path, state, history, reference)


def _training_seconds(tmp_path: Path) -> float:
    """How long the worker's training takes, from its start marker to its end (without start-up)."""
    proc = spawn(tmp_path / "timing", step_sleep=RANDOM_KILL_STEP_SLEEP)
    proc.communicate(timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0
    return float((tmp_path / "timing" / "trained").read_text()) - float((tmp_path / "timing" / "started").read_text())


RANDOM_KILL_STEP_SLEEP = 0.1  # 6 steps per epoch: ~0.6 s epochs, most of the run, so kills land in every epoch
RANDOM_KILLS = int(os.environ.get("FXTUCKER_RANDOM_KILLS", "12"))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path, reference):
    total = _training_seconds(tmp_path)
    rng = random.Random(20261124)
    kills = []
    for i in range(RANDOM_KILLS):
        run_dir = tmp_path / f"run{i}"
        proc = spawn(run_dir, step_sleep=RANDOM_KILL_STEP_SLEEP)
        wait_for(run_dir / "started", proc)
        delay = rng.uniform(0.0, total)
        time.sleep(delay)
        if proc.poll() is None:
            kill(proc)
        else:
            proc.communicate()
        before = state_on_disk(run_dir)
        kills.append((round(delay, 3), before["logged"], before["ckpt"]))
        # At most the epoch in flight is redone.
        newest = max(e for e in (before["ckpt"], before["prev"], 0) if e is not None)
        assert before["logged"] - newest in (0, 1), before
        resumed = spawn(run_dir, resume=True)
        _, err = resumed.communicate(timeout=CHILD_TIMEOUT_S)
        assert resumed.returncode == 0, err[-3000:]
        state = torch.load(run_dir / "final.pt", weights_only=True)
        history = json.loads((run_dir / "final.json").read_text())
        assert_same_end(run_dir, state, history, reference)
    print(f"training takes {total:.2f} s; kills (delay s, epochs logged, checkpoint epoch): {kills}")
    assert len({k[2] for k in kills}) >= 3  # the kills landed at several different epochs


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_sigkill_after_the_kth_checkpoint_then_resume(tmp_path, reference, k):
    # Slowed steps, and "at least k": a poller descheduled on a busy machine may see k + 1 first.
    proc = spawn(tmp_path, step_sleep=RANDOM_KILL_STEP_SLEEP)
    end = time.monotonic() + CHILD_TIMEOUT_S
    while (checkpoint_epoch(tmp_path / "train.ckpt") or 0) < k:
        assert proc.poll() is None and time.monotonic() < end, "the run ended before checkpoint k"
        time.sleep(0.005)
    kill(proc)
    before, state, history = resume_in_process(tmp_path)
    assert before["ckpt"] >= k
    assert_same_end(tmp_path, state, history, reference)


# --- disk full in the middle of a write -------------------------------------------------------


class FullDisk:
    """``open`` for fxtucker.io whose ``n``-th file opened with ``mode`` takes half of what is
    written to it, then raises ENOSPC, as a disk that fills up mid-write does."""

    def __init__(self, mode: str, n: int, name_part: str) -> None:
        self.mode, self.n, self.name_part, self.calls, self.fired = mode, n, name_part, 0, False

    def __call__(self, file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        if mode != self.mode or self.name_part not in str(file):
            return f
        self.calls += 1
        if self.calls != self.n:
            return f
        self.fired = True
        ckpt = Path(file).parent / "train.ckpt"
        self.ckpt_before = ckpt.read_bytes() if ckpt.exists() else None  # the last good checkpoint
        return _FillsUp(f)


class _FillsUp:
    """A file whose first write stores half of its data, then fails with ENOSPC."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data):
        self._f.write(data[: max(1, len(data) // 2)])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


@pytest.mark.parametrize("mode, name_part, what", [("xb", ".ckpt.tmp.", "checkpoint"), ("a", ".jsonl", "log")])
def test_disk_full_mid_write_keeps_the_last_good_checkpoint(tmp_path, reference, monkeypatch, mode, name_part, what):
    full = FullDisk(mode, 3, name_part)  # the third epoch's write fails halfway
    monkeypatch.setattr(io_module, "open", full, raising=False)
    with pytest.raises(OSError, match=r"could not write .* after epoch 2 \(0-based\) of stage 'train': .*No space "
                                      r"left on device.*the previous checkpoint .* \(after 2 epoch\(s\)\) is left "
                                      r"as it was"):
        run(tmp_path)
    monkeypatch.undo()
    assert full.fired
    good = tmp_path / "train.ckpt"
    assert good.read_bytes() == full.ckpt_before  # byte for byte
    assert checkpoint_epoch(good) == 2 and checkpoint_epoch(tmp_path / "train.ckpt.prev") == 1
    assert not [p.name for p in tmp_path.iterdir() if ".tmp." in p.name]
    if what == "log":  # half a JSON line is on disk; the resume rewrites the log from the checkpoint
        assert not (tmp_path / "train.jsonl").read_text().endswith("\n")
    before, state, history = resume_in_process(tmp_path)
    assert before["ckpt"] == 2
    assert_same_end(tmp_path, state, history, reference)


def test_disk_full_on_the_first_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    full = FullDisk("xb", 1, ".ckpt.tmp.")
    monkeypatch.setattr(io_module, "open", full, raising=False)
    with pytest.raises(OSError, match=r"no earlier checkpoint exists"):
        run(tmp_path, epochs=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]


# --- infinite loss ----------------------------------------------------------------------------


class InfAt(nn.Module):
    """Tiny whose logits make the cross-entropy itself +inf at training step ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.net, self.step, self.calls = Tiny(), step, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            if self.calls == self.step:
                out = out.clone()
                out[:, :] = 0.0
                out[:, 0] = float("-inf")  # every sample of class 0: -log softmax = +inf
            self.calls += 1
        return out


def test_infinite_cross_entropy_stops_with_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(123)
    model = InfAt(step=8)  # 6 steps per epoch: in epoch 1
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch 1 \(0-based\) at step 8 .*the loss is inf "
                                               r"\(cross-entropy inf, penalty 0.0\).*after 1 epoch\(s\)"):
        train(model, _loader(), TrainConfig(epochs=3, lr=0.05), out_dir=tmp_path, progress=False)
    assert checkpoint_epoch(tmp_path / "train.ckpt") == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- untrusted files --------------------------------------------------------------------------


def _write_marker(path: str) -> None:
    Path(path).write_text("code ran")


class Evil:
    """Unpickling this runs code (harmlessly: it writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_write_marker, (self.marker,))


def _evil_file(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_the_evil_file_really_runs_code_when_unpickled(tmp_path):
    # The control for the tests below: an unsafe load of such a file does run its code.
    marker = tmp_path / "marker"
    path = _evil_file(tmp_path / "evil.pt", {"w": torch.zeros(1), "x": Evil(marker)})
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_model_checkpoint_with_pickled_code_is_refused(tmp_path):
    from fxtucker.models import get_model

    marker = tmp_path / "marker"
    state = {**get_model("resnet20").state_dict(), "evil": Evil(marker)}
    path = _evil_file(tmp_path / "model.pt", state)
    with pytest.raises(ValueError, match=r"could not load checkpoint .* with torch.load\(weights_only=True\): refused "
                                         r"to unpickle the global '[\w.]*_write_marker'") as info:
        get_model("resnet20", checkpoint=path)
    assert "weights_only=False" not in str(info.value) and "`weights_only` set to `False`" not in str(info.value)
    assert not marker.exists()


def test_training_checkpoint_with_pickled_code_is_refused_and_set_aside(tmp_path, reference):
    run(tmp_path)
    marker = tmp_path / "marker"
    raw = torch.load(tmp_path / "train.ckpt", weights_only=True)
    raw["payload"]["history"].append(Evil(marker))
    torch.save(raw, tmp_path / "train.ckpt")
    with pytest.warns(UserWarning, match=r"train.ckpt is unusable because it does not load: refused to unpickle the "
                                         r"global '[\w.]*_write_marker'.*; it is kept as train.ckpt.bad, trying "
                                         r".*train.ckpt.prev") as caught:
        _, state, history = resume_in_process(tmp_path)
    assert not marker.exists()
    assert not any("weights_only" in str(w.message) for w in caught)  # torch's unsafe advice is not repeated
    assert (tmp_path / "train.ckpt.bad").exists()
    assert_same_end(tmp_path, state, history, reference)  # resumed from .prev, one epoch before the end


def _tweak(key, value):
    def change(payload):
        if callable(value):
            value(payload)
        else:
            payload[key] = value
    return change


@pytest.mark.parametrize("key, change", [
    ("epoch", _tweak("epoch", "2")),
    ("epoch", _tweak("epoch", -1)),
    ("epoch", _tweak("epoch", 10**6)),
    ("history", _tweak("history", "ab")),
    ("history", _tweak("history", [])),
    ("model", _tweak("model", [1, 2])),
    ("optimizer", _tweak("optimizer", "sgd")),
    ("rng", _tweak("rng", [])),
    ("rng", _tweak("rng", lambda p: p["rng"][0].pop("torch"))),
    ("rng", _tweak("rng", lambda p: p["rng"][0].update(torch="x"))),
    ("rng", _tweak("rng", lambda p: p["rng"][0]["numpy"].update(keys=[1, 2]))),
    ("rng", _tweak("rng", lambda p: p["rng"][0].update(numpy="x"))),
    ("rng", _tweak("rng", lambda p: p["rng"][0].update(python="x"))),
    ("config", _tweak("config", "x")),
    ("step", _tweak("step", 1.5)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_checkpoint_with_a_valid_checksum_but_wrong_structure_is_refused(tmp_path, reference, key, change):
    # The checksum detects damage, not a crafted file: whoever writes one can recompute it.
    run(tmp_path)
    raw = torch.load(tmp_path / "train.ckpt", weights_only=True)
    change(raw["payload"])
    raw["sha256"] = digest(raw["payload"])
    torch.save(raw, tmp_path / "train.ckpt")
    with pytest.warns(UserWarning, match=rf"train.ckpt is unusable because its payload does not have the structure "
                                         rf"train\(\) writes: {key} must be"):
        _, state, history = resume_in_process(tmp_path)
    assert_same_end(tmp_path, state, history, reference)


if __name__ == "__main__":
    _worker(sys.argv[1:])
