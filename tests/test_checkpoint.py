"""fxtucker.checkpoint: the checkpoint format, its files and rotation, exact resume and refusals."""

import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fxtucker.checkpoint import CHECKPOINT_FORMAT, CheckpointFiles, rng_state, set_rng_state
from fxtucker.io import digest
import fxtucker.train
from fxtucker.train import TrainConfig, train
from tests.test_train import (
    CFG,
    InterruptAt,
    assert_same_state,
    fc_norm,
    load_payload,
    loader,
    read_jsonl,
    step_penalty,
    tiny,
    without_seconds,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors on a shared 2-core machine: intra-op threads only add contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the format -------------------------------------------------------------------------------


def test_digest_covers_values_dtypes_shapes_and_order():
    payload = {"a": torch.arange(4, dtype=torch.float32), "b": [1, "x", None, 2.5]}
    same = {"a": torch.arange(4, dtype=torch.float32), "b": [1, "x", None, 2.5]}
    assert digest(payload) == digest(same) and len(digest(payload)) == 64
    changed = [
        {"a": torch.arange(4, dtype=torch.float64), "b": [1, "x", None, 2.5]},
        {"a": torch.arange(4, dtype=torch.float32).view(2, 2), "b": [1, "x", None, 2.5]},
        {"a": torch.arange(4, dtype=torch.float32), "b": [1, "x", None, 2.6]},
        {"b": [1, "x", None, 2.5], "a": torch.arange(4, dtype=torch.float32)},
        {"a": torch.arange(4, dtype=torch.float32), "b": [True, "x", None, 2.5]},
    ]
    assert len({digest(p) for p in changed} | {digest(payload)}) == len(changed) + 1
    with pytest.raises(TypeError, match=r"checkpoint payload holds a object, which cannot be hashed"):
        digest({"a": object()})


def test_rng_state_restores_every_generator():
    state = rng_state()
    first = (torch.rand(3), float(np.random.rand()), random.random())
    set_rng_state(state)
    again = (torch.rand(3), float(np.random.rand()), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_files_rotate_and_refuse_other_files(tmp_path):
    files = CheckpointFiles(tmp_path, "s")
    files.save({"n": 1})
    files.save({"n": 2})
    for path, n in ((files.ckpt, 2), (files.prev, 1)):
        raw = torch.load(path, weights_only=True)
        assert raw == {"format": CHECKPOINT_FORMAT, "sha256": digest({"n": n}), "payload": {"n": n}}
    torch.save({"format": "other"}, files.prev)
    with pytest.warns(UserWarning) as record:
        loaded, bad = files.load(say=True)
    assert loaded is None and bad == [files.ckpt, files.prev]
    messages = [str(w.message) for w in record]
    assert re.search(r"s.ckpt is unusable because its payload lacks \['stage', ", messages[0]), messages
    assert re.search(r"s.ckpt.prev is unusable because it is not an fxtucker training checkpoint \(format "
                     r"'other', expected 'fxtucker-train-checkpoint/1'\)", messages[1]), messages
    assert "no usable checkpoint for stage 's'" in messages[2] and len(messages) == 3


def test_train_still_exports_the_format_name():
    assert fxtucker.train.CHECKPOINT_FORMAT == CHECKPOINT_FORMAT == "fxtucker-train-checkpoint/1"


# --- files ------------------------------------------------------------------------------------


def test_writes_jsonl_and_atomic_checkpoints(tmp_path):
    m = tiny()
    history = train(m, loader(), CFG, out_dir=tmp_path, stage="ft", epoch_stats=fc_norm,
                    progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.ckpt", "ft.ckpt.prev", "ft.jsonl"]
    assert read_jsonl(tmp_path / "ft.jsonl") == history
    raw = torch.load(tmp_path / "ft.ckpt", map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and len(raw["sha256"]) == 64
    payload = raw["payload"]
    assert payload["epoch"] == 3 and payload["step"] == 12 and payload["history"] == history
    assert payload["config"] == {**CFG.__dict__}
    for k, v in m.state_dict().items():
        assert torch.equal(payload["model"][k], v), k
    assert payload["optimizer"]["state"], "momentum buffers must be saved"
    assert payload["scheduler"]["last_epoch"] == 3 and payload["scaler"] is None
    rng = payload["rng"][0]
    assert set(rng) == {"torch", "cuda", "numpy", "python"}
    assert torch.equal(rng["torch"], torch.get_rng_state())
    assert load_payload(tmp_path / "ft.ckpt.prev")["epoch"] == 2


def test_fresh_start_replaces_an_earlier_run(tmp_path):
    train(tiny(), loader(), CFG, out_dir=tmp_path, progress=False)
    with pytest.warns(UserWarning, match=r"stage 'train' starts over \(resume=False\) and removes "
                                         r"the files of an earlier run: .*train.ckpt"):
        history = train(tiny(), loader(), TrainConfig(epochs=1), out_dir=tmp_path,
                        progress=False)
    assert read_jsonl(tmp_path / "train.jsonl") == history
    assert not (tmp_path / "train.ckpt.prev").exists()
    assert load_payload(tmp_path / "train.ckpt")["epoch"] == 1


def straight_run(out_dir):
    m = tiny()
    history = train(m, loader(), CFG, eval_data=loader(shuffle=False), penalty=step_penalty,
                    out_dir=out_dir, epoch_stats=fc_norm, progress=False)
    return m, history


def killed_run(out_dir, at_epoch):
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), loader(), CFG, eval_data=loader(shuffle=False), penalty=step_penalty,
              out_dir=out_dir, epoch_stats=InterruptAt(at_epoch), progress=False)


def resumed_run(out_dir):
    m = tiny(seed=99)  # other weights: the checkpoint must overwrite them
    history = train(m, loader(), CFG, eval_data=loader(shuffle=False), penalty=step_penalty,
                    out_dir=out_dir, epoch_stats=fc_norm, resume=True, progress=False)
    return m, history


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, caplog):
    a, ha = straight_run(tmp_path / "a")
    with caplog.at_level("WARNING", logger="fxtucker.train"):
        killed_run(tmp_path / "b", at_epoch=1)
    ckpt = tmp_path / "b" / "train.ckpt"
    assert load_payload(ckpt)["epoch"] == 1
    assert len(read_jsonl(tmp_path / "b" / "train.jsonl")) == 1
    msgs = [r.getMessage() for r in caplog.records if r.name == "fxtucker.train"]
    assert len(msgs) == 1
    assert "interrupted in epoch 1 (0-based) of 3" in msgs[0]
    assert str(ckpt) in msgs[0] and "resume=True" in msgs[0] and "--resume" in msgs[0]
    b, hb = resumed_run(tmp_path / "b")
    assert_same_state(a, b)
    assert without_seconds(hb) == without_seconds(ha)
    assert without_seconds(read_jsonl(tmp_path / "b" / "train.jsonl")) == without_seconds(ha)


def test_interrupt_before_any_checkpoint_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="fxtucker.train"):
        killed_run(tmp_path, at_epoch=0)
    assert "no checkpoint was written yet" in caplog.text
    assert "nothing can be resumed yet" in caplog.text
    assert not (tmp_path / "train.ckpt").exists()


def test_resume_of_a_finished_stage_returns_at_once(tmp_path):
    a, ha = straight_run(tmp_path)

    class MustNotIterate:
        def __len__(self):
            return 1

        def __iter__(self):
            raise AssertionError("a finished stage must not train again")

    b = tiny(seed=5)
    hb = train(b, MustNotIterate(), CFG, out_dir=tmp_path, resume=True, progress=False,
               penalty=lambda *a: pytest.fail("penalty called"))
    assert hb == ha
    assert_same_state(a, b)


def tamper(path: Path) -> None:
    """Change one weight but keep the stored checksum."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    raw["payload"]["model"]["fc.weight"][0, 0] += 1.0
    torch.save(raw, path)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (tamper, r"its SHA-256 checksum does not match"),
        (truncate, r"it does not load"),
    ],
)
def test_resume_falls_back_to_prev_when_checkpoint_is_damaged(tmp_path, damage, reason):
    a, ha = straight_run(tmp_path / "a")
    run = tmp_path / "b"
    killed_run(run, at_epoch=2)
    assert load_payload(run / "train.ckpt")["epoch"] == 2
    damage(run / "train.ckpt")
    ckpt, prev = re.escape(str(run / "train.ckpt")), re.escape(str(run / "train.ckpt.prev"))
    with pytest.warns(UserWarning, match=rf"checkpoint {ckpt} is unusable because {reason}.*; it "
                                         rf"is kept as train.ckpt.bad, trying {prev}"):
        b, hb = resumed_run(run)
    assert_same_state(a, b)
    assert without_seconds(hb) == without_seconds(ha)
    assert (run / "train.ckpt.bad").exists()
    assert without_seconds(read_jsonl(run / "train.jsonl")) == without_seconds(ha)
    assert load_payload(run / "train.ckpt")["epoch"] == 3
    assert load_payload(run / "train.ckpt.prev")["epoch"] == 2


def test_resume_uses_prev_when_checkpoint_is_missing(tmp_path):
    a, ha = straight_run(tmp_path / "a")
    run = tmp_path / "b"
    killed_run(run, at_epoch=2)
    (run / "train.ckpt").unlink()
    with pytest.warns(UserWarning, match=r"train.ckpt is missing; resuming from .*train.ckpt.prev"):
        b, hb = resumed_run(run)
    assert_same_state(a, b)


def test_resume_starts_over_when_no_checkpoint_is_usable(tmp_path):
    a, ha = straight_run(tmp_path / "a")
    run = tmp_path / "b"
    killed_run(run, at_epoch=2)
    truncate(run / "train.ckpt")
    tamper(run / "train.ckpt.prev")
    with pytest.warns(UserWarning) as record:
        b = tiny()
        hb = train(b, loader(), CFG, eval_data=loader(shuffle=False), penalty=step_penalty,
                   out_dir=run, epoch_stats=fc_norm, resume=True, progress=False)
    assert_same_state(a, b)
    assert without_seconds(hb) == without_seconds(ha)
    messages = [str(w.message) for w in record]
    assert any(re.search(r"train.ckpt is unusable because it does not load: .*trying", m)
               for m in messages), messages
    assert any(re.search(r"train.ckpt.prev is unusable because its SHA-256 checksum does not "
                         r"match .*not using it either", m) for m in messages), messages
    assert any(re.search(r"no usable checkpoint for stage 'train' .*; starting the stage from "
                         r"scratch", m) for m in messages), messages
    assert not any("resume=False" in m for m in messages), messages
    assert (run / "train.ckpt.bad").exists() and (run / "train.ckpt.prev.bad").exists()
    assert without_seconds(read_jsonl(run / "train.jsonl")) == without_seconds(ha)


def test_resume_with_another_config_is_refused(tmp_path):
    killed_run(tmp_path, at_epoch=1)
    with pytest.raises(ValueError, match=r"was written with lr=0.05 but this call has lr=0.2; "
                                         r"resume with the TrainConfig the run started with"):
        train(tiny(), loader(), TrainConfig(epochs=3, lr=0.2), out_dir=tmp_path, resume=True,
              progress=False)


def test_a_config_field_the_checkpoint_predates_resumes_at_its_default(tmp_path):
    a, ha = straight_run(tmp_path / "a")
    killed_run(tmp_path / "b", at_epoch=1)
    ckpt = tmp_path / "b" / "train.ckpt"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    del raw["payload"]["config"]["compile"]  # as written before TrainConfig had compile
    raw["sha256"] = digest(raw["payload"])
    torch.save(raw, ckpt)
    b, hb = resumed_run(tmp_path / "b")
    assert_same_state(a, b)
    assert without_seconds(hb) == without_seconds(ha)
    with pytest.raises(ValueError, match=r"was written with compile=False but this call has compile=True"):
        train(tiny(), loader(), TrainConfig(epochs=3, lr=0.05, compile=True), out_dir=tmp_path / "b", resume=True,
              progress=False)


def test_warnings_point_at_the_caller_of_train(tmp_path):
    killed_run(tmp_path, at_epoch=2)
    raw = torch.load(tmp_path / "train.ckpt.prev", map_location="cpu", weights_only=True)
    raw["payload"]["rng"] = raw["payload"]["rng"] * 2  # as if written by two processes
    raw["sha256"] = digest(raw["payload"])
    torch.save(raw, tmp_path / "train.ckpt.prev")
    (tmp_path / "train.ckpt").write_bytes(b"garbage")
    with pytest.warns(UserWarning) as caught:
        resumed_run(tmp_path)
        straight_run(tmp_path)
    ours = [w for w in caught if str(w.message).startswith("train: ")]
    for kind in ("is unusable", "was written by 2 process(es)", "starts over"):  # load, restore, start_fresh
        assert any(kind in str(w.message) for w in ours), kind
    assert {w.filename for w in ours} == {__file__}


def test_resume_into_another_model_is_refused(tmp_path):
    killed_run(tmp_path, at_epoch=1)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    with pytest.raises(ValueError, match=r"does not fit this model .*resume with the model the "
                                         r"run started from"):
        train(other, loader(), CFG, out_dir=tmp_path, resume=True, progress=False)


# --- failed writes ---------------------------------------------------------------------------


def _fail_on_second_epoch(monkeypatch, target, attr, seen):
    """epoch_stats that, at epoch 1, remembers the checkpoint bytes and breaks ``target.attr``."""

    def stats(model):
        if stats.calls == 1:
            seen["bytes"] = seen["path"].read_bytes()

            def boom(*args, **kwargs):
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(target, attr, boom)
        stats.calls += 1
        return {}

    stats.calls = 0
    return stats


@pytest.mark.parametrize("target, attr", [(os, "replace"), (torch, "save")])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, target, attr):
    seen = {"path": tmp_path / "train.ckpt"}
    stats = _fail_on_second_epoch(monkeypatch, target, attr, seen)
    ckpt = re.escape(str(tmp_path / "train.ckpt"))
    with pytest.raises(OSError, match=rf"could not write {ckpt} after epoch 1 "
                                      rf"\(0-based\) of stage 'train': .*No space left on "
                                      rf"device.*; "
                                      rf"the previous checkpoint .* \(after 1 epoch\(s\)\) is left "
                                      rf"as it was.*resume=True"):
        train(tiny(), loader(), CFG, out_dir=tmp_path, epoch_stats=stats, progress=False)
    monkeypatch.undo()
    assert seen["path"].read_bytes() == seen["bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.ckpt", "train.jsonl"]
    history = train(tiny(), loader(), CFG, out_dir=tmp_path, resume=True, progress=False)
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "train.jsonl")] == [0, 1, 2]


def test_rotation_works_without_hard_links(tmp_path, monkeypatch):
    def no_link(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    train(tiny(), loader(), TrainConfig(epochs=2), out_dir=tmp_path, progress=False)
    assert load_payload(tmp_path / "train.ckpt")["epoch"] == 2
    assert load_payload(tmp_path / "train.ckpt.prev")["epoch"] == 1


# --- stateful callbacks ----------------------------------------------------------------------


class StatefulPenalty:
    """A penalty whose weight grows 1.5x every step: a resume that lost it would diverge."""

    def __init__(self) -> None:
        self.weight = 1e-4

    def __call__(self, model, epoch, step):
        self.weight *= 1.5
        return self.weight * (model.fc.weight ** 2).sum()

    def state_dict(self):
        return {"weight": self.weight}

    def load_state_dict(self, state):
        self.weight = state["weight"]


def test_stateful_penalty_is_checkpointed_and_restored(tmp_path):
    a = tiny()
    ha = train(a, loader(), CFG, penalty=StatefulPenalty(), out_dir=tmp_path / "a", progress=False)
    assert load_payload(tmp_path / "a" / "train.ckpt")["callbacks"]["penalty"]["weight"] == pytest.approx(1e-4 * 1.5 ** 12)
    b = tiny()
    with pytest.raises(KeyboardInterrupt):
        train(b, loader(), CFG, penalty=StatefulPenalty(), epoch_stats=InterruptAt(1), out_dir=tmp_path / "b",
              progress=False)
    b, pen = tiny(), StatefulPenalty()
    hb = train(b, loader(), CFG, penalty=pen, epoch_stats=fc_norm, out_dir=tmp_path / "b", resume=True, progress=False)
    assert pen.weight == pytest.approx(1e-4 * 1.5 ** 12)
    assert_same_state(a, b)
    assert [r["penalty"] for r in hb] == [r["penalty"] for r in ha]


def test_resume_without_the_stateful_penalty_state_is_refused(tmp_path):
    train(tiny(), loader(), TrainConfig(epochs=1, lr=0.05), penalty=step_penalty, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"holds no state for the stateful penalty"):
        train(tiny(), loader(), TrainConfig(epochs=1, lr=0.05), penalty=StatefulPenalty(), out_dir=tmp_path,
              resume=True, progress=False)
