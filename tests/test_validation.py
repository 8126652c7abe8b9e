"""Bad input to every public function and CLI argument: the error type and a message that names
the value at fault and what would be valid.

One table per surface: the passes, the tracing and report helpers, CompressConfig and compress,
TrainConfig/train/evaluate, measure_latency, get_model, get_dataset/make_loader and the CLI.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn as nn

import fxtucker
from fxtucker import data, models
from fxtucker.cli import main
from fxtucker.compress import CompressConfig, compress
from fxtucker.latency import measure_latency
from fxtucker.passes import (
    cost_model,
    decompose_conv,
    fold_or_restore,
    insert_gates,
    kept_ranks,
    plan_decomposition,
    predict_macs,
    strip_gates,
)
from fxtucker.train import TrainConfig, evaluate, train

NAN, INF = float("nan"), float("inf")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


X = torch.randn(1, 3, 8, 8)


@functools.lru_cache(maxsize=None)
def _stages():
    """The model at each stage of the chain (built once; the passes never change their input)."""
    gm = cost_model(fxtucker.trace(Net()), X)
    gated = cost_model(insert_gates(decompose_conv(gm)), X)
    return gm, gated


def gm():
    return _stages()[0]


def gated():
    return _stages()[1]


# (id, callable, exception type, regex the message must match)
PASSES = [
    ("trace-not-a-module", lambda: fxtucker.trace(None), TypeError, r"trace expects an nn.Module, got NoneType"),
    ("trace-untraceable", lambda: fxtucker.trace(Untraceable()), fxtucker.TraceError,
     r"could not trace Untraceable: .*concrete_args"),
    ("trace-unknown-leaf", lambda: fxtucker.trace(Net(), leaf_modules=["nope"]), ValueError,
     r"leaf_modules names \['nope'\] that are not submodules of Net"),
    ("count_macs-untraceable", lambda: fxtucker.count_macs(Untraceable(), X), fxtucker.TraceError,
     r"could not trace Untraceable"),
    ("cost_model-not-a-graph", lambda: cost_model(Net(), X), TypeError,
     r"cost_model expects a torch.fx.GraphModule, got Net; trace the model first"),
    ("cost_model-no-inputs", lambda: cost_model(fxtucker.trace(Net())), ValueError,
     r"cost_model needs example inputs"),
    ("cost_model-wrong-shape", lambda: cost_model(fxtucker.trace(Net()), torch.randn(1, 4, 8, 8)), ValueError,
     r"could not run the model on the example inputs \(tensor \(1, 4, 8, 8\) float32 on cpu\) at node 'conv1' "
     r"\(call_module conv1\): RuntimeError: .*expected input\[1, 4, 8, 8\] to have 3 channels.*pass one batch"),
    ("cost_model-wrong-dtype", lambda: cost_model(fxtucker.trace(Net()), X.double()), TypeError,
     r"example input 0 has dtype torch.float64 but the model's parameters are torch.float32; pass the input as "
     r"x.to\(torch.float32\)"),
    ("cost_model-wrong-device", lambda: cost_model(fxtucker.trace(Net().to("meta")), X), ValueError,
     r"example input 0 is on cpu but the model's parameters are on meta; pass the input as x.to\('meta'\)"),
    ("cost_model-not-a-tensor", lambda: cost_model(fxtucker.trace(Net()), 3), ValueError,
     r"could not run the model on the example inputs \(int\) at node 'conv1'"),
    ("cost_model-elementwise-flag", lambda: cost_model(fxtucker.trace(Net()), X, include_elementwise="yes"),
     TypeError, r"include_elementwise must be True or False, got 'yes'"),
    ("ranks-zero", lambda: decompose_conv(gm(), ranks=0), ValueError,
     r"ranks=0: a fraction of each mode must be in \(0, 1\]"),
    ("ranks-negative", lambda: decompose_conv(gm(), ranks=-0.5), ValueError, r"ranks=-0.5: .* in \(0, 1\]"),
    ("ranks-nan", lambda: decompose_conv(gm(), ranks=NAN), ValueError, r"ranks=nan: .* in \(0, 1\]"),
    ("ranks-above-one", lambda: decompose_conv(gm(), ranks=1.5), ValueError, r"ranks=1.5: .* in \(0, 1\]"),
    ("ranks-bool", lambda: decompose_conv(gm(), ranks=True), TypeError,
     r"ranks must be None \(full rank\), a float in \(0, 1\], 'vbmf', a dict .* got bool"),
    ("ranks-unknown-string", lambda: decompose_conv(gm(), ranks="svd"), ValueError,
     r"ranks='svd' is not known: the only string accepted is 'vbmf'"),
    ("ranks-unknown-layer", lambda: decompose_conv(gm(), ranks={"conv9": (1, 1)}), ValueError,
     r"ranks names \['conv9'\], which are not conv modules called in the graph; known: \['conv1', 'conv2'\]"),
    ("ranks-zero-for-layer", lambda: decompose_conv(gm(), ranks={"conv1": (0, 2)}), ValueError,
     r"ranks \(0, 2\) for 'conv1' out of range: valid are 1 <= R1 <= 3 and 1 <= R2 <= 8"),
    ("ranks-above-full", lambda: decompose_conv(gm(), ranks={"conv2": (9, 8)}), ValueError,
     r"ranks \(9, 8\) for 'conv2' out of range: valid are 1 <= R1 <= 8 and 1 <= R2 <= 8"),
    ("ranks-not-a-pair", lambda: decompose_conv(gm(), ranks={"conv1": 2}), ValueError,
     r"ranks for 'conv1' \(Conv2d, decomposed by tucker2\) must be a pair \(R1, R2\), got 2"),
    ("ranks-float-pair", lambda: decompose_conv(gm(), ranks={"conv1": (1.5, 2)}), ValueError,
     r"must be a pair \(R1, R2\), got \(1.5, 2\)"),
    ("ranks-callable-bad", lambda: decompose_conv(gm(), ranks=lambda name, m: (100, 1)), ValueError,
     r"ranks \(100, 1\) for 'conv1' out of range: valid are 1 <= R1 <= 3"),
    ("decompose-linear-flag", lambda: decompose_conv(gm(), linear="no"), TypeError,
     r"linear must be True or False, got 'no'"),
    ("decompose-not-a-graph", lambda: decompose_conv(Net()), TypeError,
     r"decompose_conv expects a torch.fx.GraphModule, got Net"),
    ("plan-ranks-nan", lambda: plan_decomposition(gm(), ranks=NAN), ValueError, r"ranks=nan"),
    ("insert_gates-undecomposed", lambda: insert_gates(gm()), ValueError,
     r"insert_gates found no decomposed layers: run decompose_conv\(gm\) first"),
    ("insert_gates-balance-flag", lambda: insert_gates(decompose_conv(gm()), balance=1), TypeError,
     r"balance must be True or False, got 1"),
    ("gates-not-a-graph", lambda: fxtucker.gates(Net()), TypeError, r"gates expects a torch.fx.GraphModule, got Net"),
    ("threshold-negative", lambda: strip_gates(gated(), -0.1), ValueError,
     r"threshold must be a finite number >= 0 .*got -0.1"),
    ("threshold-nan", lambda: strip_gates(gated(), NAN), ValueError, r"threshold must be a finite number >= 0 .*got nan"),
    ("threshold-inf", lambda: strip_gates(gated(), INF), ValueError, r"threshold must be a finite number >= 0 .*got inf"),
    ("threshold-string", lambda: strip_gates(gated(), "0.1"), ValueError, r"threshold must be .*got '0.1'"),
    ("strip-ungated", lambda: strip_gates(gm(), 0.1), ValueError, r"strip_gates found no gates: run insert_gates"),
    ("kept_ranks-nan", lambda: kept_ranks(gated(), NAN), ValueError, r"threshold must be a finite number >= 0"),
    ("predict_macs-negative", lambda: predict_macs(gated(), -1), ValueError, r"threshold must be a finite number >= 0"),
    ("predict_macs-no-costs", lambda: predict_macs(insert_gates(decompose_conv(fxtucker.trace(Net()))), 0.1),
     ValueError, r"predict_macs needs cost-model annotations: run cost_model"),
    ("fold-still-gated", lambda: fold_or_restore(gated(), X), ValueError,
     r"'conv1' still has gate node 'conv1_gate_in': run strip_gates\(gm, threshold\) before fold_or_restore"),
    ("fold-wrong-shape", lambda: fold_or_restore(strip_gates(gated(), 0.0), torch.randn(1, 5, 8, 8)), ValueError,
     r"could not run the model on the example inputs \(tensor \(1, 5, 8, 8\) .*at node 'conv1_first'"),
    ("report-not-a-graph", lambda: fxtucker.report(Net()), TypeError,
     r"report expects a GraphModule that went through fxtucker passes, got Net"),
]

CONFIGS = [
    ("threshold-nan", dict(threshold=NAN), r"CompressConfig.threshold must be a finite number >= 0 .*got nan"),
    ("threshold-negative", dict(threshold=-1), r"CompressConfig.threshold must be a finite number >= 0 .*got -1"),
    ("ranks-zero", dict(ranks=0), r"CompressConfig.ranks must be None \(full rank\), a fraction in \(0, 1\] or 'vbmf', got 0"),
    ("ranks-above-one", dict(ranks=2.0), r"CompressConfig.ranks must be .* got 2.0"),
    ("ranks-unknown", dict(ranks="foo"), r"CompressConfig.ranks must be .*'vbmf', got 'foo'"),
    ("target_speedup-below-one", dict(target_speedup=0.5), r"target_speedup must be a number >= 1, got 0.5"),
    ("target_speedup-nan", dict(target_speedup=NAN), r"target_speedup must be a number >= 1, got nan"),
    ("target_speedup-inf", dict(target_speedup=INF), r"target_speedup must be a finite number >= 1, got inf"),
    ("target_macs-zero", dict(target_macs=0), r"target_macs must be a positive integer, got 0"),
    ("target_macs-bool", dict(target_macs=True), r"target_macs must be a positive integer, got True"),
    ("target_macs-float", dict(target_macs=1.5), r"target_macs must be a positive integer, got 1.5"),
    ("both-targets", dict(target_macs=10, target_speedup=2.0), r"give CompressConfig.target_macs or target_speedup, not both"),
    ("reg_weight-nan", dict(reg_weight=NAN), r"reg_weight \(lambda\) must be 'auto' or a finite number >= 0, got nan"),
    ("reg-unknown", dict(reg="l3"), r"CompressConfig.reg 'l3' is not known; valid: \["),
    ("lr-bool", dict(train_lr=True), r"CompressConfig.train_lr must be a number, got True"),
    ("lr-zero", dict(reg_lr=0.0), r"CompressConfig.reg_lr must be a finite number > 0, got 0.0"),
    ("epochs-negative", dict(finetune_epochs=-1), r"CompressConfig.finetune_epochs must be an integer >= 0, got -1"),
    ("optimizer-unknown", dict(optimizer="adam"), r"CompressConfig: unknown optimizer 'adam'; valid optimizers are \['sgd', 'adamw'\]"),
    ("schedule-unknown", dict(schedule="poly"), r"CompressConfig: unknown schedule 'poly'; valid schedules are"),
    ("momentum-too-big", dict(momentum=1.5), r"CompressConfig: momentum must be a number in \[0, 1\), got 1.5"),
    ("weight_decay-negative", dict(weight_decay=-1e-4), r"CompressConfig: weight_decay must be a finite number >= 0"),
    ("seed-negative", dict(seed=-1), r"CompressConfig: seed must be an integer in \[0, 2\*\*32\), got -1"),
    ("distill-not-bool", dict(distill="yes"), r"CompressConfig.distill must be true or false, got 'yes'"),
    ("linear-not-bool", dict(linear=1), r"CompressConfig.linear must be true or false, got 1"),
    ("pointwise-not-bool", dict(pointwise="no"), r"CompressConfig.pointwise must be true or false, got 'no'"),
    ("live-mac-weights-not-bool", dict(live_mac_weights="yes"),
     r"CompressConfig.live_mac_weights must be true or false, got 'yes'"),
    ("rank_floor-one", dict(rank_floor=1.0), r"CompressConfig.rank_floor must be a number in \[0, 1\) \(the share of each "
                                             r"mode's rank always kept; 0: none\), got 1.0"),
    ("rank_floor-bool", dict(rank_floor=True), r"CompressConfig.rank_floor must be a number in \[0, 1\)"),
    ("floor_share-zero", dict(floor_share=0, target_speedup=2), r"CompressConfig.floor_share must be None or a number "
                                                                r"in \(0, 1\] \(the share of the MAC budget"),
    ("floor_share-above-one", dict(floor_share=1.5, target_speedup=2), r"CompressConfig.floor_share must be None or a "
                                                                       r"number in \(0, 1\]"),
    ("floor_share-bool", dict(floor_share=True, target_speedup=2), r"CompressConfig.floor_share must be None or a number"),
    ("floor_share-no-budget", dict(floor_share=0.8), r"CompressConfig.floor_share needs a MAC budget \(target_macs or "
                                                     r"target_speedup\)"),
    ("floor_share-and-rank_floor", dict(floor_share=0.8, rank_floor=0.3, target_speedup=2),
     r"give CompressConfig.rank_floor or floor_share, not both \(rank_floor=0.3, floor_share=0.8\)"),
    ("reach-past-step-3", dict(reach=3, reg_epochs=2, target_speedup=2), r"CompressConfig.reach must be None or a "
                                                                         r"number in \(0, reg_epochs=2\] \(the epoch"),
    ("reach-zero", dict(reach=0, target_speedup=2), r"CompressConfig.reach must be None or a number in \(0, "),
    ("reach-bool", dict(reach=True, target_speedup=2), r"CompressConfig.reach must be None or a number"),
    ("reach-no-budget", dict(reach=1.0), r"CompressConfig.reach needs a MAC budget \(target_macs or target_speedup\)"),
    ("max_shrink-zero", dict(max_shrink=0), r"CompressConfig.max_shrink must be a finite number > 0 \(the share of a "),
    ("max_shrink-inf", dict(max_shrink=float("inf")), r"CompressConfig.max_shrink must be a finite number > 0"),
    ("distill_weight-nan", dict(distill_weight=NAN), r"CompressConfig.distill_weight must be a finite number >= 0, got nan"),
    ("distill_reg_weight-negative", dict(distill_reg_weight=-1, distill_reg=True), r"CompressConfig.distill_reg_weight "
                                                                                  r"must be None \(distill_weight\) or a finite"),
    ("distill_reg_weight-without-distill_reg", dict(distill_reg_weight=1.0), r"CompressConfig.distill_reg_weight=1.0 "
                                                                             r"weighs step 3's distillation, which is off"),
    ("distill_temperature-zero", dict(distill_temperature=0), r"CompressConfig.distill_temperature must be a finite number > 0, got 0"),
    ("c_schedule-unknown", dict(c_schedule="cubic"), r"unknown c_schedule kind 'cubic'; valid kinds are"),
]

BATCHES = [(X, torch.tensor([0]))]
TRAINING = [
    ("compress-not-a-module", lambda: compress(None, BATCHES, X), TypeError,
     r"compress: model must be an nn.Module \(the trained network\), got NoneType"),
    ("compress-no-inputs", lambda: compress(Net(), BATCHES, None), TypeError,
     r"example_inputs must be a tensor or a tuple of tensors .*got NoneType"),
    ("compress-bad-config", lambda: compress(Net(), BATCHES, X, config={"threshold": 0.1}), TypeError,
     r"config must be a CompressConfig, got dict"),
    ("compress-resume-without-dir", lambda: compress(Net(), BATCHES, X, resume=True), ValueError,
     r"resume=True needs out_dir"),
    ("compress-untraceable", lambda: compress(Untraceable(), BATCHES, X), fxtucker.TraceError,
     r"could not trace Untraceable"),
    ("compress-wrong-dtype", lambda: compress(Net(), BATCHES, X.double()), TypeError,
     r"example input 0 has dtype torch.float64 but the model's parameters are torch.float32"),
    ("trainconfig-epochs", lambda: TrainConfig(epochs=0), ValueError, r"TrainConfig: epochs must be an integer >= 1, got 0"),
    ("trainconfig-lr-nan", lambda: TrainConfig(epochs=1, lr=NAN), ValueError, r"lr must be a finite number > 0, got nan"),
    ("train-bad-device", lambda: train(Net(), BATCHES, TrainConfig(epochs=1), device="gpu7"), ValueError,
     r"device='gpu7' is not a device .*pass e.g. 'cpu', 'cuda'"),
    ("train-not-a-config", lambda: train(Net(), BATCHES, {"epochs": 1}), TypeError,
     r"train: config must be a TrainConfig, got dict"),
    ("evaluate-not-a-module", lambda: evaluate(None, BATCHES), TypeError, r"evaluate: model must be an nn.Module"),
    ("latency-not-a-module", lambda: measure_latency(None, X), TypeError, r"measure_latency: model must be an nn.Module, got NoneType"),
    ("latency-no-inputs", lambda: measure_latency(Net(), None), TypeError,
     r"example_inputs must be a tensor or a tuple/list of positional inputs, got NoneType"),
    ("latency-threads-zero", lambda: measure_latency(Net(), X, threads=0), ValueError,
     r"threads must be a positive int or None .*got 0"),
    ("latency-repeats-zero", lambda: measure_latency(Net(), X, repeats=0), ValueError,
     r"repeats must be >= 1 and warmup >= 0, got repeats=0"),
    ("latency-warmup-bool", lambda: measure_latency(Net(), X, warmup=True), ValueError,
     r"repeats must be >= 1 and warmup >= 0, got repeats=20, warmup=True"),
    ("latency-backend", lambda: measure_latency(Net(), X, backend="tvm"), ValueError, r"'tvm'.*\['eager'"),
    ("get_model-unknown", lambda: models.get_model("resnet21"), ValueError,
     r"unknown model 'resnet21' \(close matches: .*'resnet20'"),
    ("get_model-classes-zero", lambda: models.get_model("resnet20", num_classes=0), ValueError,
     r"num_classes must be an integer >= 1, got 0"),
    ("get_model-channels-nan", lambda: models.get_model("resnet20", in_channels=NAN), ValueError,
     r"in_channels must be an integer >= 1, got nan"),
    ("get_model-checkpoint-type", lambda: models.get_model("resnet20", checkpoint=3), TypeError,
     r"get_model: checkpoint must be a path \(str or os.PathLike\) or None, got int 3"),
    ("get_dataset-unknown", lambda: data.get_dataset("mnist2", True), ValueError,
     r"unknown dataset 'mnist2'; valid names are \['fashion-mnist'"),
    ("get_dataset-train-flag", lambda: data.get_dataset("fashion-mnist", "yes"), TypeError,
     r"get_dataset: train must be True or False, got 'yes'"),
    ("get_dataset-root-type", lambda: data.get_dataset("fashion-mnist", True, root=3), TypeError,
     r"get_dataset: root must be a path .*got int 3"),
    ("make_loader-subset-zero", lambda: data.make_loader(list(range(4)), 2, True, subset=0), ValueError,
     r"subset must be an integer in 1..4 \(the dataset's size\) or None for all items, got 0"),
    ("make_loader-batch-zero", lambda: data.make_loader(list(range(4)), 0, True), ValueError,
     r"batch_size must be an integer >= 1, got 0"),
]

CLI = [
    (["train", "--model", "resnet20", "--dataset", "fashion-mnist", "--lr", "-1"],
     r"argument --lr: '-1': give the initial learning rate, a finite number > 0"),
    (["train", "--model", "resnet20", "--dataset", "fashion-mnist", "--lr", "nan"],
     r"argument --lr: 'nan': give the initial learning rate, a finite number > 0"),
    (["inspect", "--model", "resnet20", "--input-size", "0"], r"argument --input-size: '0': give an integer >= 1"),
    (["inspect", "--model", "resnet20", "--batch", "-1"], r"argument --batch: '-1': give an integer >= 1"),
    (["inspect", "--model", "resnet20", "--batch", "two"], r"argument --batch: 'two' is not an integer"),
    (["inspect", "--model", "resnet20", "--in-channels", "0"], r"argument --in-channels: '0': give an integer >= 1"),
    (["inspect", "--model", "resnet20", "--num-classes", "0"], r"argument --num-classes: '0': give an integer >= 1"),
    (["inspect", "--model", "resnet20", "--threads", "0"], r"argument --threads: '0': give an integer >= 1"),
    (["inspect", "--model", "resnet20", "--threshold", "nan"], r"argument --threshold: 'nan': give a finite number >= 0"),
    (["inspect", "--model", "resnet20", "--threshold", "-0.1"], r"argument --threshold: '-0.1': give a finite number >= 0"),
    (["inspect", "--model", "resnet20", "--ranks", "0"], r"argument --ranks: --ranks '0': a fraction must be in \(0, 1\]"),
    (["inspect", "--model", "resnet20", "--ranks", "nan"], r"argument --ranks: --ranks 'nan': a fraction must be in \(0, 1\]"),
    (["inspect", "--model", "resnet20", "--seed", "-1"], r"argument --seed: '-1': give a seed in \[0, 2\*\*32\)"),
    (["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--baseline-epochs", "0"],
     r"argument --baseline-epochs: '0': give an integer >= 1"),
    (["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--batch-size", "0"],
     r"argument --batch-size: '0': give an integer >= 1"),
    (["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--train-subset", "0"],
     r"argument --train-subset: '0': give an integer >= 1"),
    (["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--eval-subset", "-5"],
     r"argument --eval-subset: '-5': give an integer >= 1"),
    (["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--threads", "-2"],
     r"argument --threads: '-2': give an integer >= 1"),
    (["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--seed", "x"],
     r"argument --seed: 'x' is not an integer"),
]


@pytest.mark.parametrize("fn, error, match", [pytest.param(*c[1:], id=c[0]) for c in PASSES])
def test_passes_refuse_bad_input(fn, error, match):
    with pytest.raises(error, match=match):
        fn()


def test_passes_leave_their_input_unchanged_when_they_refuse():
    before = gated().code, dict(gated().state_dict())
    for bad in (-1, NAN, INF):
        with pytest.raises(ValueError, match=r"threshold must be a finite number >= 0 .*, got"):
            strip_gates(gated(), bad)
    assert gated().code == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in gated().state_dict().items())


@pytest.mark.parametrize("kwargs, match", [pytest.param(*c[1:], id=c[0]) for c in CONFIGS])
def test_compress_config_refuses_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressConfig(**kwargs)


def test_compress_config_from_toml_refuses_bad_fields(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("threshold = -0.5\n")
    with pytest.raises(ValueError, match=r"threshold must be a finite number >= 0 .*got -0.5"):
        CompressConfig.from_toml(path)
    path.write_text("thresold = 0.5\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['thresold'\]; valid keys: \["):
        CompressConfig.from_toml(path)


@pytest.mark.parametrize("fn, error, match", [pytest.param(*c[1:], id=c[0]) for c in TRAINING])
def test_training_and_helpers_refuse_bad_input(fn, error, match):
    with pytest.raises(error, match=match):
        fn()


@pytest.mark.parametrize("argv, match", [pytest.param(a, m, id=" ".join(a[3:] if a[0] == "inspect" else a[5:]))
                                         for a, m in CLI])
def test_cli_refuses_bad_arguments_before_doing_anything(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # compress would write runs/ here if the argument were accepted
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_cli_reports_an_unmeetable_input_size_without_a_traceback(capsys):
    # resnet20 at 1x1 works (the pooling adapts); a vgg_small at 1x1 would not reach its classifier.
    assert main(["inspect", "--model", "resnet20", "--input-size", "1", "--in-channels", "1", "--num-classes", "3"]) == 0
    code = main(["inspect", "--model", "alexnet", "--input-size", "8"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"fxtucker inspect: error: cost_model could not run the model on the example inputs "
                     r"\(tensor \(1, 3, 8, 8\) float32 on cpu\) at node '\w+'", err), err
    assert "Traceback" not in err
