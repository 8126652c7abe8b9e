"""fxtucker.train: the loop, records, files, exact resume, failures, DDP and gated GraphModules."""

import io
import json
import math
import os
import random
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fxtucker
from fxtucker import regularizers
from fxtucker.optim import param_groups
from fxtucker.passes import decompose_conv, insert_gates
from tests.conftest import run_child
from fxtucker.train import (
    RECORD_KEYS,
    TrainConfig,
    TrainingDiverged,
    evaluate,
    recalibrate_batchnorm,
    train,
)

WORKER = Path(__file__).with_name("_ddp_worker.py")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors on a shared 2-core machine: intra-op threads only add contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- helpers ----------------------------------------------------------------------------------


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    """n random 1x8x8 images; the 4 classes are the signs of two half-image means."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() * 2 + (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def loader(n: int = 64, batch_size: int = 16, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=shuffle)


class Tiny(nn.Module):
    """Two convs, BN, dropout and a linear layer: every kind of state the loop must carry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def step_penalty(model, epoch, step):
    """Depends on the step and on python's and numpy's RNG, so a resume must restore both."""
    noise = 1.0 + random.random() + float(np.random.rand())
    return 1e-3 * noise * (1.0 + 0.1 * step) * (model.fc.weight ** 2).sum()


def fc_norm(model):
    return {"fc_norm": model.fc.weight.norm().item()}


class InterruptAt:
    """epoch_stats that raises KeyboardInterrupt on its call for ``epoch`` (a simulated kill)."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.calls = epoch, 0

    def __call__(self, model):
        if self.calls == self.epoch:
            raise KeyboardInterrupt
        self.calls += 1
        return fc_norm(model)


def without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def load_payload(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["payload"]


CFG = TrainConfig(epochs=3, lr=0.05)


# --- configuration and argument errors --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(epochs=0), r"epochs must be an integer >= 1, got 0"),
        (dict(epochs=1.5), r"epochs must be an integer >= 1, got 1.5"),
        (dict(epochs=True), r"epochs must be an integer >= 1, got True"),
        (dict(epochs=1, lr=0), r"lr must be a finite number > 0, got 0"),
        (dict(epochs=1, lr=-0.1), r"lr must be a finite number > 0, got -0.1"),
        (dict(epochs=1, lr=float("nan")), r"lr must be a finite number > 0, got nan"),
        (dict(epochs=1, optimizer="adam"),
         r"unknown optimizer 'adam'; valid optimizers are \['sgd', 'adamw'\]"),
        (dict(epochs=1, schedule="poly"),
         r"unknown schedule 'poly'; valid schedules are \['cosine', 'step', 'constant'\]"),
        (dict(epochs=1, momentum=1.0), r"momentum must be a number in \[0, 1\), got 1.0"),
        (dict(epochs=1, weight_decay=-1e-4), r"weight_decay must be a finite number >= 0"),
        (dict(epochs=1, step_size=0), r"step_size must be an integer >= 1, got 0"),
        (dict(epochs=1, gamma=0.0), r"gamma must be a finite number > 0, got 0.0"),
        (dict(epochs=1, amp="yes"), r"amp must be True or False, got 'yes'"),
        (dict(epochs=1, channels_last=1), r"channels_last must be True or False, got 1"),
        (dict(epochs=1, compile="yes"), r"compile must be True or False, got 'yes'"),
        (dict(epochs=1, seed=-1), r"seed must be an integer in \[0, 2\*\*32\), got -1"),
        (dict(epochs=1, max_grad_norm=0.0), r"max_grad_norm must be a finite number > 0 or None"),
        (dict(epochs=1, first_epoch=-1), r"first_epoch must be an integer >= 0 \(where this stage starts in the run"),
        (dict(epochs=2, first_epoch=1, schedule_epochs=2),
         r"schedule_epochs must be None or an integer >= first_epoch \+ epochs = 3 \(the schedule's length in epochs\), got 2"),
        (dict(epochs=1, schedule_epochs=1.5), r"schedule_epochs must be None or an integer >= first_epoch \+ epochs = 1"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_compress_config_refuses_a_non_bool_compile():
    # CompressConfig passes compile to the TrainConfig of every stage; it checks it with its booleans.
    with pytest.raises(ValueError, match=r"CompressConfig.compile must be true or false, got 1"):
        fxtucker.CompressConfig(compile=1)
    assert fxtucker.CompressConfig(compile=True).stage_config(2, 0.1).compile is True


def test_config_normalizes_numbers():
    cfg = TrainConfig(epochs=np.int64(2), lr=1, max_grad_norm=2)
    assert type(cfg.epochs) is int and type(cfg.lr) is float and type(cfg.max_grad_norm) is float


def test_bad_arguments_are_reported(tmp_path):
    m = tiny()
    cfg = TrainConfig(epochs=1)
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got str"):
        train("model", loader(), cfg)
    with pytest.raises(TypeError, match=r"config must be a TrainConfig, got dict"):
        train(m, loader(), {"epochs": 1})
    with pytest.raises(ValueError, match=r"stage must be a name usable in a file name.*'\.\./x'"):
        train(m, loader(), cfg, stage="../x")
    with pytest.raises(ValueError, match=r"resume=True needs out_dir="):
        train(m, loader(), cfg, resume=True)
    with pytest.raises(TypeError, match=r"penalty must be a callable or None, got float"):
        train(m, loader(), cfg, penalty=0.1)
    with pytest.raises(TypeError, match=r"train_data must be an iterable of \(input, label\) "
                                        r"batches .* got Tensor"):
        train(m, torch.zeros(3), cfg)
    frozen = tiny().requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameter with requires_grad=True"):
        train(frozen, loader(), cfg)


def test_empty_train_data_is_rejected():
    m = tiny()
    with pytest.raises(ValueError, match=r"train_data \(list\) is empty"):
        train(m, [], TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match=r"train_data \(DataLoader\) is empty"):
        train(m, DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long())),
              TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match=r"yielded no batches in epoch 0 of stage 'train'"):
        train(m, iter([]), TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match=r"is an iterator \(generator\), which is used up after "
                                         r"one epoch, but config.epochs is 2"):
        train(m, (b for b in loader()), TrainConfig(epochs=2), progress=False)


def test_batches_must_be_input_label_pairs():
    x, y = next(iter(loader()))
    with pytest.raises(TypeError, match=r"must yield \(input, label\) pairs, but batch 0 is a "
                                        r"tuple of length 1"):
        train(tiny(), [(x,)], TrainConfig(epochs=1), progress=False)
    with pytest.raises(TypeError, match=r"the label of batch 0 is a list"):
        train(tiny(), [(x, y.tolist())], TrainConfig(epochs=1), progress=False)


def test_penalty_must_return_a_scalar_tensor():
    batches = [next(iter(loader()))]
    with pytest.raises(ValueError, match=r"penalty\(model, epoch=0, step=0\) returned a tensor of "
                                         r"shape \(3,\); it must return a scalar"):
        train(tiny(), batches, TrainConfig(epochs=1), penalty=lambda m, e, s: torch.ones(3),
              progress=False)
    with pytest.raises(TypeError, match=r"returned a float; it must return a scalar tensor"):
        train(tiny(), batches, TrainConfig(epochs=1), penalty=lambda m, e, s: 0.5,
              progress=False)
    with pytest.raises(TypeError, match=r"returned a torch.int64 tensor; it must be floating"):
        train(tiny(), batches, TrainConfig(epochs=1), penalty=lambda m, e, s: torch.tensor(1),
              progress=False)


def test_epoch_stats_is_checked():
    batches = [next(iter(loader()))]
    with pytest.raises(ValueError, match=r"returned keys \['loss'\] that the history record "
                                         r"already has"):
        train(tiny(), batches, TrainConfig(epochs=1), epoch_stats=lambda m: {"loss": 1},
              progress=False)
    with pytest.raises(TypeError, match=r"returned a dict that is not JSON-ready"):
        train(tiny(), batches, TrainConfig(epochs=1),
              epoch_stats=lambda m: {"w": torch.ones(2)}, progress=False)
    with pytest.raises(TypeError, match=r"epoch_stats\(model\) returned a list"):
        train(tiny(), batches, TrainConfig(epochs=1), epoch_stats=lambda m: [1], progress=False)


# --- the loop and its records -----------------------------------------------------------------


def test_learns_and_records_every_epoch():
    calls = []

    def pen(model, epoch, step):
        calls.append((model, epoch, step))
        return 0.01 * (model.fc.weight ** 2).sum()

    m = tiny()
    m.eval()
    history = train(m, loader(batch_size=8), TrainConfig(epochs=8, lr=0.1),
                    eval_data=loader(shuffle=False), penalty=pen, epoch_stats=fc_norm,
                    stage="warm", progress=False)
    assert [r["epoch"] for r in history] == list(range(8))
    for r in history:
        assert list(r)[: len(RECORD_KEYS)] == list(RECORD_KEYS)
        assert r["stage"] == "warm"
        assert r["loss"] == pytest.approx(r["ce"] + r["penalty"], rel=1e-12)
        assert r["penalty"] > 0
        assert 0.0 <= r["train_accuracy"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert r["seconds"] > 0
        assert r["fc_norm"] > 0
    json.dumps(history)
    assert history[-1]["ce"] < 0.8 * history[0]["ce"]
    assert history[-1]["accuracy"] > 0.7
    # The penalty sees the unwrapped model, the 0-based epoch and the stage's global step.
    assert all(c[0] is m for c in calls)
    assert [c[2] for c in calls] == list(range(64))
    assert [c[1] for c in calls] == [e for e in range(8) for _ in range(8)]
    assert not m.training, "train must leave the model in the mode it was given in"
    # The last record's accuracy is that of the final weights.
    assert history[-1]["accuracy"] == evaluate(m, loader(shuffle=False))


def test_records_penalty_and_ce_separately():
    m = tiny()
    h = train(m, loader(), TrainConfig(epochs=1, lr=0.01),
              penalty=lambda m, e, s: torch.tensor(0.25), progress=False)
    assert h[0]["penalty"] == pytest.approx(0.25)
    assert h[0]["loss"] == pytest.approx(h[0]["ce"] + 0.25)
    assert h[0]["accuracy"] is None


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("cosine", [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),
        ("step", [0.1, 0.1, 0.05, 0.05]),
        ("constant", [0.1] * 4),
    ],
)
def test_lr_schedules(schedule, expected):
    cfg = TrainConfig(epochs=4, lr=0.1, schedule=schedule, step_size=2, gamma=0.5)
    history = train(tiny(), loader(16), cfg, progress=False)
    assert [r["lr"] for r in history] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_a_stage_that_continues_a_run_goes_on_along_its_schedule_and_its_data_order(schedule):
    # Epochs 2-3 of a 4-epoch run, trained as a stage of their own (first_epoch=2): the rates and the
    # data orders of the whole run's last two epochs, not those of a run that starts again.
    whole = train(tiny(), loader(16), TrainConfig(epochs=4, lr=0.1, schedule=schedule, step_size=2, gamma=0.5),
                  progress=False)
    data = Recording(dataset())
    part = train(tiny(), DataLoader(data, batch_size=16, shuffle=True),
                 TrainConfig(epochs=2, lr=0.1, schedule=schedule, step_size=2, gamma=0.5, first_epoch=2, seed=7),
                 progress=False)
    assert [r["lr"] for r in part] == pytest.approx([r["lr"] for r in whole[2:]], rel=1e-12)
    assert [r["epoch"] for r in part] == [0, 1]  # the stage's own records count from 0
    assert data.seen == [i for e in (2, 3) for i in torch.randperm(64, generator=torch.Generator().manual_seed(7 + e)).tolist()]
    if schedule != "constant":
        assert part[0]["lr"] < 0.1
    # a schedule that ends with the stage is the default, so configs (and checkpoints) compare equal
    assert TrainConfig(epochs=2, first_epoch=1, schedule_epochs=3) == TrainConfig(epochs=2, first_epoch=1)
    # a longer schedule than the stage: the first half of a 4-epoch cosine, which has not reached 0
    first = train(tiny(), loader(16), TrainConfig(epochs=2, lr=0.1, schedule_epochs=4), progress=False)
    assert [r["lr"] for r in first] == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2], rel=1e-12)


class LrLog:
    """A zero penalty that records the learning rate of every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def __call__(self, model, epoch, step):
        return torch.zeros(())

    def after_step(self, model, epoch, step, lr):
        self.lrs.append(lr)


class Batches:
    """A list of batches that, like a loader, has a len() but yields fewer in its first epoch."""

    def __init__(self, batches, first) -> None:
        self.batches, self.first, self.epochs = batches, first, 0

    def __len__(self):
        return len(self.batches) if self.epochs else self.first

    def __iter__(self):
        n = len(self)
        self.epochs += 1
        return iter(self.batches[:n])


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_per_step_sets_each_step_s_rate_from_its_place_in_the_schedule(schedule, tmp_path):
    # 64 items in batches of 16: 4 steps an epoch; step i of epoch e sits at e + i / 4 of the 2 epochs
    cfg = dict(lr=0.1, schedule=schedule, step_size=1, gamma=0.5, per_step=True)
    rate = {"cosine": lambda p: 0.1 * (1 + math.cos(math.pi * p / 2)) / 2, "step": lambda p: 0.1 * 0.5 ** math.floor(p),
            "constant": lambda p: 0.1}[schedule]
    expected = [rate(e + i / 4) for e in range(2) for i in range(4)]
    log = LrLog()
    history = train(tiny(), loader(), TrainConfig(epochs=2, **cfg), penalty=log, progress=False)
    assert log.lrs == pytest.approx(expected, rel=1e-12)
    assert [r["lr"] for r in history] == pytest.approx(expected[::4], rel=1e-12)  # each epoch's first step
    if schedule == "cosine":  # once an epoch, the last epoch would run at 0.05 throughout
        assert log.lrs[-1] < 0.02 and log.lrs == sorted(log.lrs, reverse=True)
    # the second epoch as a stage of its own (first_epoch=1) runs the run's last 4 steps' rates
    part = LrLog()
    train(tiny(), loader(), TrainConfig(epochs=1, first_epoch=1, schedule_epochs=2, **cfg), penalty=part,
          progress=False)
    assert part.lrs == pytest.approx(expected[4:], rel=1e-12)
    # an epoch of other length than the first: each epoch's steps spread over that epoch alone
    short = LrLog()
    data = list(loader(shuffle=False))
    train(tiny(), Batches(data, 2), TrainConfig(epochs=2, **cfg), penalty=short, progress=False)
    assert short.lrs == pytest.approx([rate(0), rate(0.5)] + expected[4:], rel=1e-12)
    # killed after its first epoch and resumed: the same rates and the same weights as straight through
    a = tiny()
    train(a, loader(), TrainConfig(epochs=2, **cfg), penalty=LrLog(), out_dir=tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), loader(), TrainConfig(epochs=2, **cfg), penalty=LrLog(), epoch_stats=InterruptAt(1),
              out_dir=tmp_path / "b", progress=False)
    b, resumed = tiny(seed=99), LrLog()
    train(b, loader(), TrainConfig(epochs=2, **cfg), penalty=resumed, out_dir=tmp_path / "b", resume=True,
          progress=False)
    assert resumed.lrs == pytest.approx(expected[4:], rel=1e-12)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_per_step_needs_data_with_a_length():
    with pytest.raises(ValueError, match=r"train: TrainConfig.per_step needs each epoch's batches to have a len\(\)"):
        train(tiny(), (b for b in loader()), TrainConfig(epochs=1, per_step=True), progress=False)
    # a constant rate has nothing to place: any iterable trains
    train(tiny(), (b for b in loader()), TrainConfig(epochs=1, per_step=True, schedule="constant"), progress=False)
    with pytest.raises(ValueError, match=r"TrainConfig: per_step must be True or False, got 1"):
        TrainConfig(epochs=1, per_step=1)


class ZeroGrad(nn.Module):
    """A linear classifier plus a 2-d and a 1-d parameter whose gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)
        self.w2 = nn.Parameter(torch.ones(3, 3))
        self.w1 = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x.flatten(1)) + 0.0 * (self.w2.sum() + self.w1.sum())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_skips_one_dimensional_parameters(optimizer):
    m = ZeroGrad()
    cfg = TrainConfig(epochs=1, lr=0.1, weight_decay=0.5, optimizer=optimizer,
                      schedule="constant")
    train(m, [next(iter(loader()))], cfg, progress=False)
    # One step of decay alone: w <- w - lr * wd * w (SGD's first momentum step is the gradient;
    # AdamW's update of a zero gradient is zero and its decay is decoupled).
    torch.testing.assert_close(m.w2.detach(), torch.full((3, 3), 1 - 0.1 * 0.5))
    assert torch.equal(m.w1.detach(), torch.ones(3))


def gated_model():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"decompose_conv left 1 layer"):  # conv1: 1 input channel
        return insert_gates(decompose_conv(fxtucker.trace(Tiny())))


def test_gates_are_not_weight_decayed():
    gm = gated_model()
    groups = param_groups(gm, 5e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    gate_params = [p for roles in fxtucker.gates(gm).values() for p in roles.values()]
    assert gate_params and all(id(p) not in decayed for p in gate_params)
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    original = gm.conv2.core.parametrizations.weight.original
    assert id(original) in decayed
    # A gate is recognised through node.meta, not only by being 1-d.
    gm.conv2.gate_in.weight = nn.Parameter(gm.conv2.gate_in.weight.detach().view(-1, 1))
    decayed = {id(p) for p in param_groups(gm, 5e-4)[0]["params"]}
    assert id(gm.conv2.gate_in.weight) not in decayed


def test_max_grad_norm_clips_the_update():
    batch = [next(iter(loader()))]

    def update_norm(max_grad_norm):
        m = tiny()
        m.drop.p = 0.0
        before = [p.detach().clone() for p in m.parameters()]
        cfg = TrainConfig(epochs=1, lr=1.0, momentum=0.0, weight_decay=0.0,
                          max_grad_norm=max_grad_norm)
        train(m, batch, cfg, progress=False)
        deltas = [p.detach() - b for p, b in zip(m.parameters(), before)]
        return torch.sqrt(sum((d ** 2).sum() for d in deltas))

    assert update_norm(None) > 0.01
    assert update_norm(1e-3) <= 1e-3 * (1 + 1e-5)


def test_amp_is_ignored_on_cpu():
    a, b = tiny(), tiny()
    ha = train(a, loader(), TrainConfig(epochs=2), progress=False, device="cpu")
    hb = train(b, loader(), TrainConfig(epochs=2, amp=True), progress=False, device="cpu")
    assert_same_state(a, b)
    assert without_seconds(ha) == without_seconds(hb)


def test_channels_last_trains_the_same_function_in_that_format_and_puts_the_model_back():
    formats, strides = [], []

    def watch(model, epoch, step):  # sees the model each step: its conv weights in the channels-last format
        w = model.conv2.weight
        formats.append((w.is_contiguous(memory_format=torch.channels_last), w.is_contiguous()))
        # a one-input-channel kernel passes for either format: it gets the format's own strides, so
        # the conv it feeds runs channels-last too
        strides.append(model.conv1.weight.stride())
        return torch.zeros(())

    a, b = tiny(), tiny()
    ha = train(a, loader(), TrainConfig(epochs=2), progress=False, device="cpu", penalty=watch,
               eval_data=loader(shuffle=False))
    assert set(formats) == {(False, True)} and set(strides) == {(9, 9, 3, 1)}
    formats.clear()
    strides.clear()
    hb = train(b, loader(), TrainConfig(epochs=2, channels_last=True), progress=False, device="cpu",
               penalty=watch, eval_data=loader(shuffle=False))
    assert formats and set(formats) == {(True, False)}
    assert set(strides) == {(9, 1, 3, 1)}
    assert all(p.is_contiguous() for p in b.parameters())  # given in the default format, returned in it
    for key, value in a.state_dict().items():  # the same function; gradients near (BatchNorm's less exact)
        torch.testing.assert_close(b.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert [h["accuracy"] for h in hb] == [h["accuracy"] for h in ha]
    assert [h["loss"] for h in hb] == pytest.approx([h["loss"] for h in ha], rel=1e-5)
    c = tiny().to(memory_format=torch.channels_last)  # given in channels-last, left in it
    train(c, loader(), TrainConfig(epochs=1, channels_last=True), progress=False, device="cpu")
    assert c.conv2.weight.is_contiguous(memory_format=torch.channels_last) and not c.conv2.weight.is_contiguous()


def test_channels_last_puts_every_tensor_back_however_the_stage_ends(tmp_path):
    def strides(m):
        return {k: v.stride() for k, v in m.state_dict().items()}

    config = TrainConfig(epochs=1, channels_last=True)
    m = tiny()
    before = strides(m)
    train(m, loader(), config, progress=False, device="cpu", out_dir=tmp_path)
    assert strides(m) == before
    train(m, loader(), config, progress=False, device="cpu", out_dir=tmp_path, resume=True)  # already finished
    assert strides(m) == before
    # refused before the first epoch: another learning rate than the checkpoint's
    with pytest.raises(ValueError, match=r"was written with .*lr=.* but this call has .*lr=0\.5"):
        train(m, loader(), TrainConfig(epochs=2, lr=0.5, channels_last=True), progress=False, device="cpu",
              out_dir=tmp_path, resume=True)
    assert strides(m) == before
    # 1x1 and depthwise kernels pass for either format: each keeps its exact strides
    thin = nn.Sequential(nn.Conv2d(1, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(512, 4))
    before = strides(thin)
    train(thin, loader(), config, progress=False, device="cpu")
    assert strides(thin) == before
    # a Conv3d model trains: channels-last is a 4-D format, so its 5-D weights are left as they are
    cube = nn.Sequential(nn.Unflatten(1, (1, 1)), nn.Conv3d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(128, 4))
    before = strides(cube)
    train(cube, loader(), config, progress=False, device="cpu")
    assert strides(cube) == before


def test_float64_model_trains_in_float64():
    m = tiny().double()
    x, y = dataset()[:16]
    h = train(m, [(x.double(), y)], TrainConfig(epochs=2), progress=False,
              penalty=lambda model, e, s: 1e-3 * (model.fc.weight ** 2).sum())
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert h[1]["ce"] < h[0]["ce"]


class Recording(Dataset):
    def __init__(self, base: Dataset) -> None:
        self.base, self.seen = base, []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return self.base[i]


@pytest.mark.parametrize("shuffle", [True, False])
def test_dataloader_order_comes_from_seed_plus_epoch(shuffle):
    data = Recording(dataset())
    torch.manual_seed(123)  # the caller's RNG state must not matter
    train(tiny(), DataLoader(data, batch_size=16, shuffle=shuffle), TrainConfig(epochs=2, seed=7),
          progress=False)
    if shuffle:
        expected = [torch.randperm(64, generator=torch.Generator().manual_seed(7 + e)).tolist()
                    for e in range(2)]
    else:
        expected = [list(range(64))] * 2
    assert data.seen == expected[0] + expected[1]


def test_runs_are_repeatable():
    a, b = tiny(), tiny()
    torch.manual_seed(1)
    ha = train(a, loader(), CFG, penalty=step_penalty, progress=False)
    torch.manual_seed(2)
    np.random.seed(3)
    hb = train(b, loader(), CFG, penalty=step_penalty, progress=False)
    assert_same_state(a, b)
    assert without_seconds(ha) == without_seconds(hb)


# --- evaluate ---------------------------------------------------------------------------------


class Spy(nn.Module):
    """Logits are the input; remembers the mode each forward ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.modes = []
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        self.modes.append(self.training)
        return x * self.scale


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_top1_and_mode(training):
    pred = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 1, 3])  # 6 of 8 right
    data = DataLoader(TensorDataset(F.one_hot(pred, 4).float(), labels), batch_size=3)
    m = Spy().train(training)
    assert evaluate(m, data) == 0.75
    assert m.modes == [False, False, False]
    assert m.training is training
    with pytest.raises(ValueError, match=r"evaluate: data \(list\) yielded no labels"):
        evaluate(m, [])


# --- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, bad):
    m = tiny()

    def pen(model, epoch, step):
        return torch.tensor(bad) if step == 5 else torch.zeros(())

    with pytest.raises(TrainingDiverged) as info:
        train(m, loader(), CFG, penalty=pen, out_dir=tmp_path, stage="reg", progress=False)
    ckpt = tmp_path / "reg.ckpt"
    msg = str(info.value)
    assert "stage 'reg' diverged in epoch 1 (0-based) at step 5 (batch 1 of the epoch)" in msg
    assert f"the last good checkpoint, after 1 epoch(s), is kept at {ckpt}" in msg
    assert (info.value.stage, info.value.epoch, info.value.step) == ("reg", 1, 5)
    assert info.value.checkpoint == ckpt
    payload = load_payload(ckpt)
    assert payload["epoch"] == 1 and payload["step"] == 4
    assert not (tmp_path / "reg.ckpt.prev").exists()
    assert len(read_jsonl(tmp_path / "reg.jsonl")) == 1
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_divergence_without_out_dir_says_nothing_is_saved():
    lr_huge = TrainConfig(epochs=1, lr=1e30, momentum=0.0, weight_decay=0.0)
    with pytest.raises(TrainingDiverged, match=r"nothing is saved because out_dir was not given. "
                                               r"Lower lr \(it is 1e\+30\)"):
        train(tiny(), loader(), lr_huge, progress=False)


# --- progress ---------------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_shows_loss_and_accuracy(monkeypatch, progress):
    pytest.importorskip("tqdm")
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    train(tiny(), loader(), TrainConfig(epochs=1), eval_data=loader(), stage="ft",
          progress=progress)
    text = err.getvalue()
    if progress:
        assert "ft:" in text and "epoch=1/1" in text and "loss=" in text and "acc=" in text and "eval_acc=" in text
    else:
        assert text == ""


def test_one_progress_bar_per_stage_with_its_name_and_eta(monkeypatch, tmp_path):
    """Every epoch of a stage advances one bar (total: epochs x batches), so its ETA covers the stage;
    a resumed stage's bar starts at the epochs already done."""
    tqdm = pytest.importorskip("tqdm")
    made = []
    real = tqdm.tqdm

    def spy(*args, **kwargs):
        bar = real(*args, **kwargs)
        made.append(bar)
        return bar

    monkeypatch.setattr("tqdm.tqdm", spy)  # progress_bar imports tqdm when it makes a bar
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    train(tiny(), loader(), TrainConfig(epochs=2), stage="regularize", out_dir=tmp_path)
    assert len(made) == 1  # not one per epoch
    bar = made[0]
    assert bar.desc == "regularize" and bar.total == 2 * 4 and bar.n == 2 * 4  # 64 images in batches of 16
    last = err.getvalue().split("\r")[-1]
    assert last.startswith("regularize: 100%") and "8/8 [" in last and "<00:00" in last  # elapsed<ETA
    assert "epoch=2/2" in last
    train(tiny(), loader(), TrainConfig(epochs=3), stage="more", out_dir=tmp_path)  # a new stage: a new bar
    assert len(made) == 2 and made[1].desc == "more" and made[1].total == 12

    def stop_in_epoch_1(model, epoch, step):
        if epoch == 1:
            raise KeyboardInterrupt
        return torch.zeros(())

    with pytest.raises(KeyboardInterrupt):
        train(tiny(), loader(), TrainConfig(epochs=2), stage="killed", out_dir=tmp_path, penalty=stop_in_epoch_1)
    assert made[2].n == 4  # the first epoch's steps, then the interrupt
    train(tiny(), loader(), TrainConfig(epochs=2), stage="killed", out_dir=tmp_path, resume=True)
    assert made[3].initial == 4 and made[3].n == 8 and made[3].total == 8


# --- gated GraphModules -----------------------------------------------------------------------


def test_funnel_penalty_shrinks_gates_of_a_gated_graph_module(tmp_path):
    gm = gated_model()
    gate_params = [p for roles in fxtucker.gates(gm).values() for p in roles.values()]
    assert gate_params
    before = sum(p.detach().abs().sum() for p in gate_params)

    def pen(model, epoch, step):
        gates = [p for roles in fxtucker.gates(model).values() for p in roles.values()]
        return 2.0 * regularizers.penalty(gates, "funnel", c=0.5)

    history = train(gm, loader(), TrainConfig(epochs=2, lr=0.05), penalty=pen, out_dir=tmp_path,
                    progress=False)
    after = sum(p.detach().abs().sum() for p in gate_params)
    assert after < 0.7 * before
    assert history[1]["penalty"] < history[0]["penalty"]
    for name in ("first", "core", "last"):
        module = gm.get_submodule(f"conv2.{name}")
        unit = module.parametrizations["weight"][0]
        norms = unit.component_norms(module.weight.detach())
        torch.testing.assert_close(norms, torch.ones_like(norms))
    # The checkpoint restores the parametrized GraphModule.
    fresh = gated_model()
    fresh.load_state_dict(load_payload(tmp_path / "train.ckpt")["model"])
    x = dataset()[:8][0]
    torch.testing.assert_close(fresh.eval()(x), gm.eval()(x), rtol=0, atol=0)


# --- torch.compile ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiler():
    """Skips the test when torch.compile cannot compile on this machine (no C++ compiler, say)."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(2))
    except Exception as e:  # noqa: BLE001 - whatever inductor raises, compile cannot be tested here
        pytest.skip(f"torch.compile does not work on this machine: {type(e).__name__}: {str(e)[:200]}")


def test_compile_trains_like_eager_resumes_and_checkpoints_the_plain_module(tmp_path, compiler):
    from tests.conftest import TRAIN_COMPILE

    eager, compiled = tiny(), tiny()
    eager.drop = compiled.drop = nn.Identity()  # inductor draws dropout masks from its own generator
    cfg = TrainConfig(epochs=2, lr=0.05, seed=1)
    expected = train(eager, loader(), cfg, eval_data=loader(shuffle=False), progress=False)
    ccfg = TrainConfig(epochs=2, lr=0.05, seed=1, compile=True)
    with pytest.raises(KeyboardInterrupt):
        train(compiled, loader(), ccfg, eval_data=loader(shuffle=False), out_dir=tmp_path, progress=False,
              epoch_stats=InterruptAt(1))
    payload = load_payload(tmp_path / "train.ckpt")
    assert not [k for k in payload["model"] if "_orig_mod" in k]
    # The checkpoint is the plain module's: it loads strictly into a fresh, uncompiled Tiny.
    fresh = tiny(seed=7)
    fresh.drop = nn.Identity()
    fresh.load_state_dict(payload["model"])
    with pytest.raises(ValueError, match=r"was written with compile=True but this call has compile=False"):
        train(fresh, loader(), cfg, out_dir=tmp_path, resume=True, progress=False)
    history = train(fresh, loader(), ccfg, eval_data=loader(shuffle=False), out_dir=tmp_path, resume=True,
                    progress=False, epoch_stats=fc_norm)
    assert type(fresh) is Tiny and [r["epoch"] for r in history] == [0, 1]
    for got, want in zip(history, expected):
        for key in ("loss", "ce", "train_accuracy", "accuracy", "lr"):
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), **TRAIN_COMPILE)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, **TRAIN_COMPILE)
    assert list(load_payload(tmp_path / "train.ckpt")["model"]) == list(eager.state_dict())


def test_compile_that_fails_says_so_and_how_to_train_without_it(monkeypatch):
    class Broken(nn.Module):  # what torch.compile returns on a machine whose C++ compiler fails
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            raise RuntimeError("CppCompileError: C++ compile error\n(details)")

    def broken_compile(net):
        return Broken(net)

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(RuntimeError, match=r"config.compile=True, but torch.compile could not compile the training "
                                           r"step of Tiny on cpu \(RuntimeError: CppCompileError: C\+\+ compile "
                                           r"error\); train without it \(compile=False, or drop --compile\)"):
        train(tiny(), loader(), TrainConfig(epochs=1, compile=True), progress=False)


# --- DDP --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_ddp_two_processes(tmp_path, request, compiled):
    if compiled:
        request.getfixturevalue("compiler")  # torch.compile around DistributedDataParallel, as train() wraps it
    run, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_child(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(run),
         str(results)] + (["compile"] if compiled else []),
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    s0 = torch.load(results / "rank0.pt", weights_only=True)
    s1 = torch.load(results / "rank1.pt", weights_only=True)
    # The ranks started from different weights: equal ends mean broadcast and averaged grads.
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    r0 = json.loads((results / "rank0.json").read_text())
    r1 = json.loads((results / "rank1.json").read_text())
    # Each epoch, the two ranks served disjoint halves of the 64 items.
    for e in range(2):
        a, b = r0["seen"][32 * e: 32 * (e + 1)], r1["seen"][32 * e: 32 * (e + 1)]
        assert len(r0["seen"]) == len(r1["seen"]) == 64
        assert set(a).isdisjoint(b) and set(a) | set(b) == set(range(64))
    # Logged metrics are averaged over the ranks, so both return the same history.
    assert without_seconds(r0["history"]) == without_seconds(r1["history"])
    assert all(r["accuracy"] is not None for r in r0["history"])
    # Only rank 0 wrote, and what it wrote is its history and final weights.
    assert sorted(p.name for p in run.iterdir()) == ["train.ckpt", "train.ckpt.prev", "train.jsonl"]
    assert read_jsonl(run / "train.jsonl") == r0["history"]
    payload = load_payload(run / "train.ckpt")
    assert payload["epoch"] == 2 and len(payload["rng"]) == 2 and payload["config"]["compile"] is compiled
    assert list(payload["model"]) == list(s0) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    for k in s0:
        assert torch.equal(payload["model"][k], s0[k]), k


def test_penalty_after_step_is_called_after_every_optimizer_step_with_its_lr():
    calls = []

    class Prox:
        def __call__(self, model, epoch, step):
            return torch.zeros(())

        def after_step(self, model, epoch, step, lr):
            calls.append((epoch, step, lr, torch.is_grad_enabled()))

    cfg = TrainConfig(epochs=2, lr=0.05, schedule="constant")
    train(tiny(), loader(), cfg, penalty=Prox(), progress=False)
    assert [(e, s) for e, s, _, _ in calls] == [(e, s) for e in range(2) for s in range(4 * e, 4 * e + 4)]
    assert all(lr == 0.05 and not grad for _, _, lr, grad in calls)


# --- recalibrate_batchnorm ----------------------------------------------------------------------


def _conv_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    return model


def test_recalibrate_batchnorm_averages_the_statistics_of_the_batches_and_touches_no_weight():
    model = _conv_bn().eval()
    x = torch.randn(40, 3, 6, 6) * 3 + 1
    data = DataLoader(TensorDataset(x, torch.zeros(40, dtype=torch.long)), batch_size=8, shuffle=True)
    weights = {k: v.clone() for k, v in model.named_parameters()}
    rng = torch.get_rng_state()
    assert recalibrate_batchnorm(model, data, batches=3, seed=5) == 3
    assert torch.equal(torch.get_rng_state(), rng)  # the order comes from the seed, not the global state
    # The expected statistics: the mean over the first 3 batches (the loader's order drawn from seed 5)
    # of each batch's per-channel mean and unbiased variance of the conv's output.
    order = list(torch.utils.data.RandomSampler(range(40), generator=torch.Generator().manual_seed(5)))
    out = model[0](x[order[:24]]).detach().view(3, 8, 4, 4, 4).transpose(1, 2).reshape(3, 4, -1)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, out.mean(2).mean(0))
    torch.testing.assert_close(bn.running_var, out.var(2).mean(0))
    assert bn.momentum == 0.1 and not model.training and int(bn.num_batches_tracked) == 3
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())


def test_recalibrate_batchnorm_restores_the_statistics_when_it_fails_and_checks_its_arguments():
    model = _conv_bn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"data \(list\) yielded no batches"):
        recalibrate_batchnorm(model, [], batches=2)
    with pytest.raises(TypeError, match=r"batch 0 is a str"):
        recalibrate_batchnorm(model, ["x"], batches=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training
    assert model[1].momentum == 0.1
    with pytest.raises(TypeError, match=r"data must be an iterable of \(input, label\) batches .* got Tensor"):
        recalibrate_batchnorm(model, torch.randn(2, 3, 6, 6))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"batches must be an integer >= 1, got"):
            recalibrate_batchnorm(model, [(torch.randn(2, 3, 6, 6), torch.zeros(2))], batches=bad)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert recalibrate_batchnorm(plain, [], batches=1) == 0  # no BatchNorm: nothing to do, data not read
