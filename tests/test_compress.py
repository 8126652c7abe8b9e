"""compress(): the four-step flow end to end, rank recovery, MAC budgets, configs and errors."""

import dataclasses
import importlib
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fxtucker
from fxtucker.compress import CompressConfig, compress

from .toys import Toy, toy_problem


def test_funnel_flow_recovers_a_known_tucker_rank(one_thread):
    model, train, test, x = toy_problem()
    config = CompressConfig(train_epochs=0, reg_epochs=12, finetune_epochs=0, reg_weight=0.05, reg_lr=0.01,
                            weight_decay=0.0, c_start=1.0, c_end=0.01, threshold=0.01)
    result = compress(model, train, x, eval_data=test, config=config, progress=False)
    (layer,) = [l for l in result.report["layers"] if l["name"] == "conv"]
    assert layer["ranks"] == [4, 6] and layer["decision"] == "decomposed"
    assert result.report["accuracy_after"] > 0.95


def test_svd_method_recovers_the_matrix_rank(one_thread):
    # The toy kernel's output mode has rank 6, so its (24, 16*3*3) reshaping has matrix rank 6.
    model, train, test, x = toy_problem()
    config = CompressConfig(method="svd", train_epochs=0, reg_epochs=12, finetune_epochs=0, reg_weight=0.05,
                            reg_lr=0.01, weight_decay=0.0, c_start=1.0, c_end=0.01, threshold=0.01)
    result = compress(model, train, x, eval_data=test, config=config, progress=False)
    (layer,) = [l for l in result.report["layers"] if l["name"] == "conv"]
    assert layer["kind"] == "svd" and layer["ranks"] == [6] and layer["decision"] == "decomposed"
    assert result.report["accuracy_after"] > 0.95


def test_pointwise_false_trains_and_cuts_the_kxk_convs_only(one_thread):
    class WithShortcut(nn.Module):
        def __init__(self):
            super().__init__()
            self.toy, self.short = Toy(), nn.Conv2d(16, 24, 1)

        def forward(self, x):
            return self.toy.fc(torch.relu(self.toy.conv(x) + self.short(x)).flatten(1))

    _, train, test, x = toy_problem()
    model = WithShortcut()
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, pointwise=False, target_speedup=1.5)
    result = compress(model, train, x, eval_data=test, config=config, progress=False)
    layers = {l["name"]: l for l in result.report["layers"]}
    assert layers["short"]["decision"] == "skipped" and "pointwise=False" in layers["short"]["reason"]
    assert isinstance(result.model.get_submodule("short"), nn.Conv2d)
    assert not result.report["skipped_layers"]  # left whole by choice: no warning
    assert result.report["macs_after"] < result.report["macs_before"]
    with pytest.raises(ValueError, match=r"cannot be met.*or set pointwise=True: 1 1x1 conv\(s\) are left whole"):
        compress(model, train, x, config=dataclasses.replace(config, target_speedup=50.0), progress=False)
    only = nn.Sequential(nn.Conv2d(16, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.warns(UserWarning, match=r"returned unchanged and untrained.*its 1 conv\(s\) are 1x1, left whole by "
                                         r"pointwise=False"):
        compress(only, train, x, config=config, progress=False)


def test_compress_end_to_end_report_history_and_files(one_thread, tmp_path):
    model, train, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=1, reg_epochs=2, finetune_epochs=1, reg_weight=0.05, target_speedup=2.0)
    result = compress(model, train, x, eval_data=test, config=config, out_dir=tmp_path, progress=False)
    rep = result.report
    for key in ("macs_before", "macs_after", "params_before", "params_after", "accuracy_before", "accuracy_after",
                "layers", "stages", "threshold"):
        assert key in rep
    assert rep["macs_after"] == fxtucker.count_macs(result.model, x) < rep["macs_before"] == fxtucker.count_macs(model, x)
    assert list(rep["stages"]) == ["decomposed", "trained", "regularized", "pruned", "finetuned"]
    assert [(h["stage"], h["epoch"]) for h in result.history] == [("decomposed", 0), ("regularize", 0), ("regularize", 1), ("finetune", 0)]
    assert all("macs_if_stripped" in h for h in result.history if h["stage"] == "regularize")
    assert {p.name for p in tmp_path.iterdir()} >= {"decomposed.jsonl", "regularize.jsonl", "finetune.jsonl",
                                                    "decomposed.ckpt", "regularize.ckpt", "finetune.ckpt"}
    standard = {m.__class__.__module__.split(".")[0] for m in result.model.modules() if m is not result.model}
    assert standard == {"torch"}
    assert rep["accuracy_after"] == fxtucker.train.evaluate(result.model, test)
    # the input model is untouched
    assert isinstance(model.conv, nn.Conv2d)
    # resuming a finished run trains nothing and gives the same model
    again = compress(model, train, x, eval_data=test, config=config, out_dir=tmp_path, resume=True, progress=False)
    for a, b in zip(again.model.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("distill,distill_reg", [(True, False), (False, True)])
def test_distillation_reaches_the_stages_it_is_asked_for(one_thread, distill, distill_reg):
    # lambda 0: the logged penalty of a stage is its distillation loss alone (0 without it)
    model, train, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=1, reg_weight=0.0, steer=False,
                            distill=distill, distill_reg=distill_reg, distill_weight=10.0)
    penalty = {h["stage"]: h["penalty"] for h in compress(model, train, x, config=config, progress=False).history}
    assert (penalty["regularize"] > 0, penalty["finetune"] > 0) == (distill_reg, distill), penalty
    assert min(penalty.values()) == 0.0


def test_distill_reg_weight_weighs_step_3_s_distillation_alone(one_thread):
    model, train, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=1, reg_weight=0.0, steer=False,
                            distill=True, distill_reg=True, distill_weight=10.0, distill_reg_weight=0.0)
    penalty = {h["stage"]: h["penalty"] for h in compress(model, train, x, config=config, progress=False).history}
    assert penalty["regularize"] == 0.0 < penalty["finetune"], penalty


def test_a_threshold_that_cuts_every_path_is_refused_not_returned_as_a_constant_model(one_thread):
    model, train, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, reg_weight=0.0, steer=False, threshold=10.0)
    with pytest.raises(ValueError, match=r"the threshold 10 \(CompressConfig.threshold\) cuts every path from the "
                                         r"input to the output \(layers with a rank of 0: conv\), so the pruned model is "
                                         r"a constant function .*give a smaller threshold"):
        compress(model, train, x, config=config, progress=False)
    kept = compress(model, train, x, config=dataclasses.replace(config, threshold=0.01), progress=False)
    assert kept.report["macs_after"] > 0


@pytest.mark.parametrize("speedup", [2.0, 3.0])
def test_mac_budget_is_met_with_the_smallest_threshold(one_thread, speedup):
    model, train, test, x = toy_problem(2)
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, reg_weight=0.01, target_speedup=speedup)
    result = compress(model, train, x, config=config, progress=False)
    target = int(result.report["macs_before"] / speedup)
    assert result.report["target_macs"] == target
    assert result.report["macs_after"] <= target


def test_config_from_toml_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[compress]\nreg = 'l1'\nreg_weight = 0.001\nreg_epochs = 3\nc_schedule = 'exp'\nc_factor = 0.5\nc_every = 1\n")
    cfg = CompressConfig.from_toml(path)
    assert (cfg.reg, cfg.reg_weight, cfg.reg_epochs, cfg.c_schedule_fn()(2)) == ("l1", 0.001, 3, 0.25)
    path.write_text("lamda = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lamda'\]; valid keys: \["):
        CompressConfig.from_toml(path)
    with pytest.raises(FileNotFoundError, match=r"config file .*nope.toml' does not exist"):
        CompressConfig.from_toml(tmp_path / "nope.toml")
    with pytest.raises(ValueError, match=r"reg 'l3' is not known; valid: \['funnel', 'funnel_scaled', 'l1', 'l2'\]"):
        CompressConfig(reg="l3")
    with pytest.raises(ValueError, match=r"threshold must be a finite number >= 0"):
        CompressConfig(threshold=-1.0)
    with pytest.raises(ValueError, match=r"give CompressConfig.target_macs or target_speedup, not both"):
        CompressConfig(target_macs=10, target_speedup=2.0)
    with pytest.raises(ValueError, match=r"target_speedup must be a number >= 1"):
        CompressConfig(target_speedup=0.5)
    with pytest.raises(ValueError, match=r"reg_epochs must be >= 1"):
        CompressConfig(reg_epochs=0)
    with pytest.raises(ValueError, match=r"CompressConfig.method must be one of \['tucker2', 'svd'\].*got 'cp'"):
        CompressConfig(method="cp")
    model, train, _, x = toy_problem()
    with pytest.raises(ValueError, match=r"resume=True needs out_dir"):
        compress(model, train, x, resume=True)
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor or a tuple of tensors"):
        compress(model, train, [1, 2])


@pytest.mark.parametrize("c_follows_budget,live,one", [(False, False, False), (True, False, False), (False, True, False),
                                                       (False, False, True)])
def test_killed_run_resumes_to_the_same_result(one_thread, tmp_path, monkeypatch, c_follows_budget, live, one):
    model, train, test, x = toy_problem(4)
    # With c following the budget: a budget the zeros cannot meet by the checkpoint, and a tiny c_end,
    # so that c is the cut the last steering step saw. With live MAC weights: the whole flow resumes
    # with them (that their state is saved and restored is test_budget's).
    config = CompressConfig(train_epochs=1, reg_epochs=3, finetune_epochs=1, reg_weight=0.05,
                            target_speedup=4.0 if c_follows_budget else 2.0, c_follows_budget=c_follows_budget,
                            c_end=1e-9 if c_follows_budget else 0.01, live_mac_weights=live, one_schedule=one)
    straight = compress(model, train, x, eval_data=test, config=config, out_dir=tmp_path / "a", progress=False)

    flow = importlib.import_module("fxtucker.compress")  # fxtucker.compress is the function

    real = flow.gate_stats

    def dies_after_first_regularized_epoch(*args):
        stats, calls = real(*args), []

        def wrapped(model):
            calls.append(1)
            if len(calls) == 2:  # end of epoch 1, before its checkpoint: epoch 0's is on disk
                raise KeyboardInterrupt
            return stats(model)
        return wrapped

    monkeypatch.setattr(flow, "gate_stats", dies_after_first_regularized_epoch)
    with pytest.raises(KeyboardInterrupt):
        compress(model, train, x, eval_data=test, config=config, out_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(flow, "gate_stats", real)
    assert len((tmp_path / "b" / "regularize.jsonl").read_text().splitlines()) == 1
    resumed = compress(model, train, x, eval_data=test, config=config, out_dir=tmp_path / "b", resume=True,
                       progress=False)
    assert resumed.report["macs_after"] == straight.report["macs_after"]
    assert resumed.report["threshold"] == straight.report["threshold"]
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    # lambda was steered in epoch 0, so the resumed run only matches because its value was restored
    reg = [r for r in straight.history if r["stage"] == "regularize"]
    assert reg[0]["reg_weight"] != config.reg_weight


@pytest.mark.parametrize("one", [False, True])
def test_one_schedule_runs_the_stages_as_one_run(one_thread, one):
    # Each stage at its own base rate; with one_schedule the cosine's position carries on across the
    # stages (1 + 2 + 1 epochs: one cosine over 4), without it every stage starts it again.
    model, train, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=1, reg_epochs=2, finetune_epochs=1, train_lr=0.02, reg_lr=0.01,
                            finetune_lr=0.04, target_speedup=2.0, one_schedule=one)
    lrs = [h["lr"] for h in compress(model, train, x, config=config, progress=False).history]
    cos = [(1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)] if one else [1.0, 1.0, 0.5, 1.0]
    assert lrs == pytest.approx([0.02 * cos[0], 0.01 * cos[1], 0.01 * cos[2], 0.04 * cos[3]], rel=1e-12)
    stage = config.stage_config(2, 0.01, 1)  # step 3: epochs 1-2 of the 4
    assert (stage.first_epoch, stage.schedule_epochs) == ((1, 4) if one else (0, None))
    with pytest.raises(ValueError, match=r"CompressConfig.one_schedule must be true or false, got 'yes'"):
        CompressConfig(one_schedule="yes")


def test_lr_per_step_moves_every_stage_s_rate_every_step(one_thread):
    # 1 + 2 + 1 epochs, each stage its own cosine, moved every step: an epoch's record holds the rate of
    # its first step, so one-epoch stages start at their base rate and step 3's second epoch halfway
    # down, as once an epoch; what differs is within the epochs (TrainConfig.per_step, test_train).
    model, train, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=1, reg_epochs=2, finetune_epochs=1, reg_lr=0.01, finetune_lr=0.04,
                            target_speedup=2.0, lr_per_step=True)
    assert config.stage_config(1, 0.04).per_step and not CompressConfig().stage_config(1, 0.04).per_step
    result = compress(model, train, x, config=config, progress=False)
    lrs = [h["lr"] for h in result.history]
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.04], rel=1e-12)
    plain = compress(toy_problem(1)[0], train, x, config=dataclasses.replace(config, lr_per_step=False),
                     progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(result.model.state_dict().values(),
                                                     plain.model.state_dict().values()))
    with pytest.raises(ValueError, match=r"CompressConfig.lr_per_step must be true, false or 'reg' \(step 3 only\), got 1"):
        CompressConfig(lr_per_step=1)


def test_lr_per_step_reg_moves_step_3_s_rate_every_step_and_no_other_stage_s(one_thread):
    # 0 + 2 + 1 epochs on one schedule: with "reg", step 3 runs exactly as with True (same losses, same
    # rates), and fine-tuning starts from where it left the model yet runs once an epoch, as with False.
    model, train, test, x = toy_problem(1)
    base = CompressConfig(train_epochs=0, reg_epochs=2, finetune_epochs=1, target_speedup=2.0, one_schedule=True)
    runs = {v: compress(toy_problem(1)[0], train, x, config=dataclasses.replace(base, lr_per_step=v), progress=False)
            for v in (False, True, "reg")}
    def stage(v, name):
        return [(h["lr"], h["loss"]) for h in runs[v].history if h["stage"] == name]
    assert stage("reg", "regularize") == stage(True, "regularize") != stage(False, "regularize")
    assert stage("reg", "finetune") != stage(True, "finetune")
    assert [lr for lr, _ in stage("reg", "finetune")] == [lr for lr, _ in stage(False, "finetune")]
    assert base.stage_config(2, 0.01, reg=True).per_step is False
    reg = dataclasses.replace(base, lr_per_step="reg")
    assert reg.stage_config(2, 0.01, reg=True).per_step and not reg.stage_config(1, 0.01).per_step
    with pytest.raises(ValueError, match=r"CompressConfig.lr_per_step must be true, false or 'reg' \(step 3 only\), "
                                         r"got 'finetune'"):
        CompressConfig(lr_per_step="finetune")


def test_channels_last_runs_every_stage_and_the_teacher_in_that_format(one_thread):
    model, train, test, x = toy_problem(1)
    config = CompressConfig(train_epochs=1, reg_epochs=1, finetune_epochs=1, target_speedup=2.0, distill=True,
                            distill_reg=True, channels_last=True)
    assert config.stage_config(1, 0.01).channels_last and not CompressConfig().stage_config(1, 0.01).channels_last
    result = compress(model, train, x, eval_data=test, config=config, progress=False)
    plain = compress(toy_problem(1)[0], train, x, eval_data=test,
                     config=dataclasses.replace(config, channels_last=False), progress=False)
    # the decomposed model's epoch (no cut yet, no BatchNorm) is the same function and gradients, to float rounding
    assert result.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], rel=1e-5)
    assert [h["stage"] for h in result.history] == ["decomposed", "regularize", "finetune"]
    assert result.report["macs_after"] <= result.report["target_macs"]
    assert all(p.is_contiguous() for p in result.model.parameters())
    assert result.report["accuracy_after"] == fxtucker.train.evaluate(result.model, test)
    with pytest.raises(ValueError, match=r"CompressConfig.channels_last must be true or false, got 'no'"):
        CompressConfig(channels_last="no")


def test_steering_can_be_switched_off(one_thread):
    model, train, test, x = toy_problem()
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, reg_weight=0.01, target_speedup=1.5,
                            steer=False)
    result = compress(model, train, x, config=config, progress=False)
    assert [r["reg_weight"] for r in result.history if r["stage"] == "regularize"] == [0.01]
    with pytest.raises(ValueError, match=r"steer_every must be an integer >= 1"):
        CompressConfig(steer_every=0)


def test_reach_sets_when_the_zeros_meet_the_budget(one_thread):
    # By default the zeros meet the budget at the end of step 3's first of two epochs; with reach=2
    # the path is half as steep, so after the first epoch lambda has pulled fewer gates to 0.
    model, train, test, x = toy_problem()
    first = {}
    for reach in (None, 2.0):
        config = CompressConfig(train_epochs=0, reg_epochs=2, finetune_epochs=0, target_speedup=2.0, reach=reach)
        result = compress(model, train, x, config=config, progress=False)
        first[reach] = [r for r in result.history if r["stage"] == "regularize"][0]
        assert result.report["macs_after"] <= result.report["target_macs"]
    assert first[2.0]["reg_weight"] < first[None]["reg_weight"]
    assert first[2.0]["macs_if_stripped"] == first[None]["macs_if_stripped"]  # the threshold meets the budget either way


def test_an_impossible_budget_fails_before_any_training(monkeypatch):
    flow = importlib.import_module("fxtucker.compress")
    model, train, _, x = toy_problem()
    monkeypatch.setattr(flow, "train", lambda *a, **k: pytest.fail("trained before checking the budget"))
    with pytest.raises(ValueError, match=r"the MAC budget 10 cannot be met"):
        compress(model, train, x, config=CompressConfig(target_macs=10), progress=False)


def test_auto_reg_weight_is_calibrated_from_the_learning_rate_and_the_steps():
    flow = importlib.import_module("fxtucker.compress")
    config = CompressConfig(reg_epochs=2, reg_lr=0.01)
    assert config.reg_weight == "auto"
    lam = flow.auto_reg_weight(config, 100)
    assert lam * (0.01 / 2) * 100 * 2 == pytest.approx(flow.AUTO_SHRINK)  # cosine: the mean lr is half
    assert flow.auto_reg_weight(config, 400) == pytest.approx(lam / 4)  # 4x the steps: a quarter of lambda
    constant = CompressConfig(reg_epochs=2, reg_lr=0.01, schedule="constant")
    assert flow.auto_reg_weight(constant, 100) == pytest.approx(lam / 2)
    assert flow.auto_reg_weight(CompressConfig(reg_weight=0.3), None) == 0.3
    with pytest.raises(ValueError, match=r"reg_weight='auto' needs train_data with a len\(\)"):
        flow.auto_reg_weight(config, None)
    with pytest.raises(ValueError, match=r"reg_weight \(lambda\) must be 'auto' or a finite number >= 0, got 'big'"):
        CompressConfig(reg_weight="big")


def test_a_plain_threshold_prunes_with_the_defaults(one_thread):
    # The paper's own mode: no budget, a threshold. With the default lambda (calibrated to the
    # steps of step 3), the funnel pulls part of the gates of a full-rank conv to 0 and the
    # threshold removes them; with lambda 0 nothing is removed.
    torch.manual_seed(0)
    model = Toy()  # random weights: full Tucker rank, no gate starts at 0
    with torch.no_grad():
        x = torch.randn(1024, 16, 4, 4)
        y = model(x).argmax(1)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    macs = {}
    for lam in ("auto", 0.0):
        config = CompressConfig(train_epochs=0, reg_epochs=2, finetune_epochs=0, reg_weight=lam)
        result = compress(model, train, x[:1], config=config, progress=False)
        macs[lam] = result.report["macs_after"]
        zeros = result.report["stages"]["regularized"]["gate_histogram"]["zeros"]
        assert (zeros > 0) == (lam == "auto")
    assert macs[0.0] == result.report["macs_before"] > macs["auto"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("relative_gates", [True, False])
def test_the_whole_flow_runs_on_cuda_with_a_budget_distillation_and_the_proximal_step(relative_gates):
    # The proximal step builds its per-gate scales from Python lists: on the GPU they must be made there.
    model, train, test, x = toy_problem(2)
    config = CompressConfig(train_epochs=1, reg_epochs=1, finetune_epochs=1, target_speedup=2.0, distill=True,
                            distill_reg=True, relative_gates=relative_gates)
    result = compress(model.cuda(), train, x.cuda(), eval_data=test, config=config, progress=False)
    assert result.report["macs_after"] <= result.report["target_macs"]
    assert {"regularize", "finetune"} <= {h["stage"] for h in result.history}
    assert result.report["accuracy_after"] == fxtucker.train.evaluate(result.model, test)
    assert {p.device.type for p in result.model.parameters()} == {"cuda"}


def test_rank_floor_keeps_a_share_of_every_mode_through_the_flow(one_thread):
    model, train, test, x = toy_problem(2)
    # conv is 16 -> 24 (Tucker-2); a floor of half of each mode still fits a 2.3x budget only just
    config = CompressConfig(train_epochs=0, reg_epochs=2, finetune_epochs=1, target_speedup=2.3, rank_floor=0.5)
    result = compress(model, train, x, eval_data=test, config=config, progress=False)
    (layer,) = [l for l in result.report["layers"] if l["name"] == "conv"]
    assert layer["decision"] == "decomposed" and layer["ranks"][0] >= 8 and layer["ranks"][1] >= 12
    assert result.report["macs_after"] <= result.report["macs_before"] / 2.3
    with pytest.raises(ValueError, match=r"cannot be met: .*rank_floor=0.9 of each mode's rank"):
        compress(model, train, x, config=CompressConfig(target_speedup=2.3, rank_floor=0.9), progress=False)
    # The floor as a share of the budget: the largest floor within it, reported, and kept through the cut
    config = dataclasses.replace(config, rank_floor=0.0, floor_share=0.9)
    result = compress(model, train, x, config=config, progress=False)
    f = result.report["rank_floor"]  # 0.9 of the budget holds 8 of 16 and 11 of 24, not 12 of 24 (0.5, 31,104 MACs)
    assert f == 11 / 24 and (result.report["macs_before"] // 2.3) * 0.9 < 31_104
    (layer,) = [l for l in result.report["layers"] if l["name"] == "conv"]
    assert layer["ranks"][0] >= 8 and layer["ranks"][1] >= 11
    assert result.report["macs_after"] <= result.report["macs_before"] / 2.3
    with pytest.warns(UserWarning, match=r"floor_share=0.01 of the budget \(.* MACs\) does not hold one component of "
                                         r"every mode, so there is no floor; raise floor_share"):
        compress(model, train, x, config=dataclasses.replace(config, floor_share=0.01, reg_epochs=1, finetune_epochs=0),
                 progress=False)


class _ToyBN(nn.Module):
    def __init__(self, toy):
        super().__init__()
        self.conv, self.bn, self.fc = toy.conv, nn.BatchNorm2d(24), toy.fc

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_batchnorm_is_recalibrated_after_the_cut_and_fine_tuning_trains_the_same_weights(one_thread):
    toy, train, test, x = toy_problem(1)
    model = _ToyBN(toy)
    fxtucker.train.train(model, train, fxtucker.train.TrainConfig(epochs=1, lr=0.01), progress=False)  # BN statistics
    base = dict(train_epochs=0, reg_epochs=1, reg_weight=0.01, target_speedup=3.0)
    runs = {(n, ft): compress(model, train, x, eval_data=test, progress=False,
                              config=CompressConfig(**base, recalibrate_bn=n, finetune_epochs=ft))
            for n in (0, 50) for ft in (0, 1)}
    assert list(runs[50, 1].report["stages"]) == ["decomposed", "regularized", "pruned", "recalibrated", "finetuned"]
    assert "recalibrated" not in runs[0, 1].report["stages"]
    # Without fine-tuning the recalibrated model is what comes back, with other statistics than the cut's.
    rep = runs[50, 0].report
    assert rep["accuracy_after"] == rep["stages"]["recalibrated"]["accuracy"] == fxtucker.train.evaluate(runs[50, 0].model, test)
    assert rep["stages"]["pruned"] == runs[0, 0].report["stages"]["pruned"]
    assert not torch.equal(runs[50, 0].model.bn.running_var, runs[0, 0].model.bn.running_var)
    # Fine-tuning normalises by batch statistics and draws its own batches: the same weights either way.
    tuned, plain = dict(runs[50, 1].model.named_parameters()), dict(runs[0, 1].model.named_parameters())
    assert tuned.keys() == plain.keys() and all(torch.equal(tuned[k], plain[k]) for k in tuned)
    with pytest.raises(ValueError, match=r"recalibrate_bn must be an integer >= 0 \(training batches"):
        CompressConfig(recalibrate_bn=-1)
