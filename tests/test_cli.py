"""The fxtucker command line: the inspect job and bad input."""

import importlib.util
import json
import subprocess
import sys

import pytest

from fxtucker.cli import main


def test_inspect_small_model_prints_report_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    rc = main(["inspect", "--model", "resnet20", "--input-size", "32", "--num-classes", "10", "--ranks", "0.5",
               "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "decomposed" in out
    assert "MACs" in out and "latency, eager, batch 1 (ms)" in out
    # what was timed: the deployable forms, BatchNorm folded on both sides, alternating rounds
    assert ("latency: eager, cpu, batch 1 (1x3x32x32)" in out and "timed alternately over 7 round(s)" in out
            and "original: BatchNorm folded; compressed: BatchNorm folded, each layer's form chosen by "
                "optimize_for_inference on eager" in out)
    data = json.loads(out_json.read_text())
    assert data["macs_after"] < data["macs_before"]
    timing = data["latency"]
    assert timing["backend"] == "eager" and len(timing["ratios"]) == 7
    assert sum(timing["forms"].values()) == 21  # every decomposed layer (all 21 here) got a form chosen by timing
    assert timing["reliable"] == (timing["speedup"] is not None) == (data["latency_ms_after"] is not None)
    assert data["report"]["stage"] == "fold_or_restore" and len(data["report"]["layers"]) == 21  # stem + 18 in blocks + 2 downsample
    assert f"{data['macs_before']:,}" in out


@pytest.mark.parametrize("command", ["inspect", "bench"])
def test_a_json_path_that_cannot_be_a_file_is_refused_before_any_work(tmp_path, capsys, command):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    for path, want in ((tmp_path, "is a directory; give the path of a file"),
                       (tmp_path / "afile" / "r.json", "which is an existing file, not a directory"),
                       (tmp_path / "dangling" / "r.json", "which is a link to nothing, not a directory")):
        argv = [command, "--model", "no_such_model_so_any_work_would_fail_first", "--ranks", "0.5", "--json", str(path)]
        assert main(argv) == 2
        assert want in capsys.readouterr().err


def test_inspect_refuses_a_threshold_that_makes_the_model_a_constant_function(capsys, tmp_path):
    argv = ["inspect", "--model", "resnet20", "--input-size", "16", "--in-channels", "1", "--num-classes", "10",
            "--rounds", "1", "--repeats", "1"]
    assert main(argv + ["--threshold", "5"]) == 2
    err = capsys.readouterr().err
    assert ("--threshold 5 cuts every path from the input to the output (layers with a rank of 0: layer1.0.conv1, "
            in err) and "so the compressed model is a constant function; give a smaller --threshold" in err
    assert main(argv + ["--threshold", "0.01"]) == 0  # a cut that keeps a path is reported as before
    capsys.readouterr()
    assert main(argv + ["--no-pointwise", "--json", str(tmp_path / "r.json")]) == 0  # the 1x1 shortcuts stay whole
    layers = {l["name"]: l for l in json.loads((tmp_path / "r.json").read_text())["report"]["layers"]}
    assert {n: layers[n]["reason"] for n in ("layer2.0.downsample.0", "layer3.0.downsample.0")} == dict.fromkeys(
        ("layer2.0.downsample.0", "layer3.0.downsample.0"), "not selected: a 1x1 conv, left whole (pointwise=False)")
    assert layers["layer2.0.conv1"]["decision"] == "decomposed"


def test_inspect_full_rank_restores_everything_and_shows_graphs(capsys):
    assert main(["inspect", "--model", "resnet20", "--input-size", "32", "--ranks", "full", "--graph"]) == 0
    out = capsys.readouterr().out
    assert "== graph before ==" in out and "== graph after ==" in out
    assert "restored" in out and " decomposed " not in out
    assert "relative output change (untrained, ranks=None): " in out


def test_unknown_model_exits_2_with_choices_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fxtucker.cli", "inspect", "--model", "resnet19"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown model 'resnet19'. Did you mean resnet18" in proc.stderr and "Choices: alexnet" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("ranks, message", [("1.5", "a fraction must be in (0, 1]"), ("abc", "give a fraction in (0, 1], 'vbmf' or 'full'")])
def test_bad_ranks_exit_2(ranks, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--model", "resnet20", "--ranks", ranks])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


FASHION = __import__("pathlib").Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")


@needs_fashion
def test_compress_small_run_writes_reports(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text("train_epochs = 1\nreg_epochs = 1\nfinetune_epochs = 1\nreg_weight = 0.01\ntarget_speedup = 1.5\n")
    out = tmp_path / "run"
    argv = ["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--config", str(config),
            "--train-subset", "256", "--eval-subset", "128", "--baseline-epochs", "1", "--no-progress", "--out", str(out),
            "--backend", "eager", "--latency-batch", "4", "--rounds", "2", "--repeats", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for row in ("accuracy (128 test images)", "MACs", "params", "latency, eager, batch 1 (ms)",
                "latency, eager, batch 4 (ms)", "epochs: original 1 epoch(s), trained here; compressed: 1 decomposed "
                "+ 1 regularized + 1 fine-tuning on top of it, each epoch 256 training images",
                "deployed: deployed/ (manifest), reloaded and checked"):
        assert row in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["macs_after"] <= rep["macs_before"] / 1.5
    assert rep["epochs"] == {"baseline": 1, "baseline_from": "trained here", "decomposed": 1, "regularize": 1,
                             "finetune": 1, "finetune_distilled": False, "images_per_epoch": 256,
                             "images_drawn_from": 256, "images_augmented": False}
    assert rep["accuracy_images"] == rep["stage_accuracy_images"] == 128
    assert list(rep["latency"]) == ["batch_1", "batch_4"] and rep["latency"]["batch_4"]["input_shape"] == [4, 1, 28, 28]
    dep = rep["deployed"]
    assert dep["backend"] == "eager" and dep["macs"] <= rep["macs_after"] and dep["parity"]["max_abs_error"] <= 1e-5
    import fxtucker
    from fxtucker.models import get_model

    deployed = fxtucker.load(out / "deployed", lambda: get_model("resnet20", num_classes=10, in_channels=1))
    assert not any("bn" in name for name, _ in deployed.named_modules())  # BatchNorm folded
    assert rep["model"] == "resnet20" and len(rep["baseline_history"]) == 1
    assert list(rep["stages"]) == ["decomposed", "trained", "regularized", "pruned", "recalibrated", "finetuned"]
    md = (out / "report.md").read_text()
    assert md.startswith("# fxtucker compress") and "| layer1.0.conv1 |" in md
    state = __import__("torch").load(out / "compressed_state_dict.pt", weights_only=True)
    assert any(k.endswith(".core.weight") for k in state)
    if importlib.util.find_spec("matplotlib"):
        assert (out / "gates_regularized.png").stat().st_size > 1000
    # a rerun with --resume trains nothing new and reproduces the report
    assert main(argv + ["--resume"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["macs_after"] == rep["macs_after"] and again["accuracy_after"] == rep["accuracy_after"]


@needs_fashion
def test_compress_nan_loss_exits_1_with_message(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("train_epochs = 1\nreg_epochs = 1\nfinetune_epochs = 0\ntrain_lr = 1e30\n")
    rc = main(["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--config", str(config),
               "--train-subset", "128", "--eval-subset", "64", "--baseline-epochs", "1", "--no-progress",
               "--out", str(tmp_path / "run")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "diverged in epoch 0" in err and "Lower lr" in err


def test_compress_bad_dataset_and_missing_root(tmp_path, capsys):
    assert main(["compress", "--model", "resnet20", "--dataset", "fashion_mnist", "--out", str(tmp_path)]) == 2
    assert "unknown dataset 'fashion_mnist'. Did you mean fashion-mnist? Choices: fashion-mnist, cifar10" in capsys.readouterr().err
    assert main(["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--root", str(tmp_path / "none"),
                 "--out", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_inspect_method_svd_decomposes_kxk_convs_as_svd_pairs(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    rc = main(["inspect", "--model", "resnet20", "--input-size", "32", "--num-classes", "10", "--ranks", "0.5",
               "--method", "svd", "--json", str(out_json)])
    assert rc == 0
    layers = {l["name"]: l for l in json.loads(out_json.read_text())["report"]["layers"]}
    assert layers["layer1.0.conv1"]["kind"] == "svd" and layers["layer1.0.conv1"]["ranks"] == [8]  # half of 16
    with pytest.raises(SystemExit):  # argparse: an invalid choice
        main(["inspect", "--model", "resnet20", "--method", "cp"])
    assert "invalid choice: 'cp'" in capsys.readouterr().err


def _compressed_resnet20(x):
    """resnet20 through the pass chain at ranks 0.5 (untrained): a compressed model as compress() returns one."""
    import fxtucker
    from fxtucker.models import get_model
    from fxtucker.passes import cost_model, decompose_conv, fold_or_restore, insert_gates, strip_gates

    model = get_model("resnet20", num_classes=10, in_channels=1).eval()
    with pytest.warns(UserWarning, match="one input channel per group"):  # the 1-channel stem
        gm = decompose_conv(cost_model(fxtucker.trace(model), x), ranks=0.5)
    return model, fold_or_restore(strip_gates(insert_gates(gm), 0.0), x).eval()


def _deploy_args(**kw):
    import argparse

    base = dict(backend="onnxruntime", latency_batch=3, rounds=3, repeats=2, max_spread=1.2, max_others=0.25,
                threads=1, no_progress=True, model="resnet20", model_kwargs=None)
    return argparse.Namespace(**{**base, **kw})


def test_compress_deploys_an_onnx_file_that_matches_and_times_it_side_by_side(tmp_path, monkeypatch):
    """The end of the main job: deployed.onnx reloads in onnxruntime and computes what the compressed model
    computes; both batches are timed, the BN-folded original against the deployed model, alternately."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import torch

    import fxtucker.latency
    from fxtucker.cli import deploy_step

    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 16)
    model, compressed = _compressed_resnet20(x)
    timed = []
    real = fxtucker.latency.measure_latency
    monkeypatch.setattr(fxtucker.latency, "measure_latency",
                        lambda m, xb, **k: timed.append((m, tuple(xb.shape), k["backend"])) or real(m, xb, **k))
    info, latency = deploy_step(_deploy_args(), model, compressed, x, 10, tmp_path, lambda *a: None)
    assert info["file"] == "deployed.onnx" and info["format"] == "onnx" and info["forms_chosen_at_batch"] == 3
    assert info["macs"] <= fxtucker.count_macs(compressed, x)  # forms kept within the compressed model's MACs
    session = ort.InferenceSession(str(tmp_path / "deployed.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = compressed(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - want).max() <= 1e-4
    assert list(latency) == ["batch_1", "batch_3"]
    assert [shape for _, shape, _ in timed] == [(1, 1, 16, 16)] * 6 + [(3, 1, 16, 16)] * 6  # 3 rounds x 2 models
    assert {b for _, _, b in timed} == {"onnxruntime"}
    baseline, deployed = timed[0][0], timed[1][0]
    assert baseline is not deployed and [m for m, _, _ in timed[:6]] == [baseline, deployed, deployed, baseline,
                                                                        baseline, deployed]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in baseline.modules())  # the original, BN folded
    for t in latency.values():
        assert t["backend"] == "onnxruntime" and t["rounds"] == 3 and len(t["ratios"]) == 3


def test_compress_report_says_unreliable_instead_of_a_number(tmp_path, monkeypatch):
    """A busy machine (scripted here: the rounds' speed-ups 2x, 0.5x, 1x) gives no latency number."""
    import torch

    import fxtucker.latency
    from fxtucker.cli import deploy_step
    from fxtucker.run_report import summary_text as _summary_text

    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path / "cache"))
    x = torch.randn(1, 1, 16, 16)
    model, compressed = _compressed_resnet20(x)
    clock = iter([2.0, 1.0, 2.0, 1.0, 1.0, 1.0] * 2)  # per batch: A=2 B=1 | B=2 A=1 | A=1 B=1
    monkeypatch.setattr(fxtucker.latency, "measure_latency", lambda *a, **k: next(clock))
    info, latency = deploy_step(_deploy_args(backend="eager"), model, compressed, x, 10, tmp_path, lambda *a: None)
    assert all(not t["reliable"] and t["speedup"] is None for t in latency.values())
    summary = dict(accuracy_before=0.9, accuracy_after=0.89, accuracy_images=10000, stage_accuracy_images=2000,
                   macs_before=100, macs_after=50, params_before=10, params_after=5, deployed=info, latency=latency,
                   epochs=dict(baseline=None, baseline_from="given by --checkpoint", decomposed=1, regularize=4,
                               finetune=2))
    text = _summary_text(summary)
    rows = {line.split("  ")[0]: line.split() for line in text.splitlines()[:7]}
    assert rows["latency, eager, batch 1 (ms)"][-3:] == ["unreliable"] * 3
    assert rows["latency, eager, batch 3 (ms)"][-3:] == ["unreliable"] * 3
    assert ("latency at batch 1: timing unreliable: the 3 rounds' speed-ups range from 0.50x to 2.00x (spread 4.00x "
            "> 1.20x allowed)") in text
    assert "epochs: original given by --checkpoint; compressed: 1 decomposed + 4 regularized + 2 fine-tuning" in text
    assert "accuracy (10,000 test images)" in text and "accuracy after each stage (report.md) on 2,000" in text
    assert "rank floor" not in text  # none set
    text = _summary_text({**summary, "rank_floor": 11 / 24, "floor_share": 0.9})
    assert ("rank floor: 0.458 of every mode's rank kept whatever the budget (the largest floor within "
            "floor_share=0.9 of it)") in text


def test_quick_measures_accuracy_before_and_after_on_the_whole_test_set(tmp_path, monkeypatch, capsys):
    """--quick watches the stages on a subset but judges the models on every test image."""
    import torch

    import fxtucker.cli as cli
    from fxtucker import data
    from fxtucker.models import get_model
    from fxtucker.train import evaluate
    from tests.test_robustness import _fake_fashion_mnist

    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path / "cache"))
    root = _fake_fashion_mnist(tmp_path / "fm")  # 96 training, 48 test images
    monkeypatch.setattr(cli.pretrained, "SHIPPED", ())  # no shipped weights: the baseline is trained here
    # Each epoch 32 of the 64 training images, drawn afresh (what --epoch-images asks for), shifted and flipped.
    monkeypatch.setattr(cli, "QUICK", dict(train_subset=64, epoch_images=32, augment=True, eval_subset=16,
                                           baseline_epochs=1))
    monkeypatch.setattr(cli, "QUICK_CONFIG", dict(train_epochs=0, reg_epochs=1, finetune_epochs=1, target_speedup=1.2,
                                                  distill=cli.QUICK_CONFIG.get("distill", False)))
    out = tmp_path / "run"
    assert main(["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--root", str(root), "--quick",
                 "--batch-size", "32", "--no-progress", "--threads", "1", "--backend", "eager", "--latency-batch", "2",
                 "--rounds", "1", "--repeats", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["accuracy_images"] == 48 and rep["stage_accuracy_images"] == 16
    baseline = get_model("resnet20", num_classes=10, in_channels=1)
    baseline.load_state_dict(torch.load(out / "baseline_state_dict.pt", weights_only=True))
    full = data.make_loader(data.get_dataset("fashion-mnist", False, root=str(root)), 256, False)
    assert rep["accuracy_before"] == evaluate(baseline, full)
    distilled = cli.QUICK_CONFIG["distill"]
    assert rep["epochs"] == {"baseline": 1, "baseline_from": "trained here", "decomposed": 0, "regularize": 1,
                             "finetune": 1, "finetune_distilled": distilled, "images_per_epoch": 32,
                             "images_drawn_from": 64, "images_augmented": True}
    run = json.loads((out / "run.json").read_text())
    assert run["epoch_images"] == 32 and run["augment"] is True
    epochs_line = "compressed: 0 decomposed + 1 regularized + 1 fine-tuning" + (" (distilled from the original)" if distilled else "")
    assert (epochs_line + " on top of it, each epoch 32 training images (shifted and flipped) drawn afresh from 64"
            in capsys.readouterr().out)


def test_quick_on_a_dataset_smaller_than_its_draws_uses_all_of_it(tmp_path, monkeypatch):
    import fxtucker.cli as cli
    from tests.test_robustness import _fake_fashion_mnist

    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path / "cache"))
    root = _fake_fashion_mnist(tmp_path / "fm")  # 96 training images, under --quick's 10,000 a draw
    monkeypatch.setattr(cli.pretrained, "SHIPPED", ())
    assert cli.QUICK["epoch_images"] > 96 and cli.QUICK["train_subset"] is None
    monkeypatch.setattr(cli, "QUICK", dict(cli.QUICK, baseline_epochs=1))
    monkeypatch.setattr(cli, "QUICK_CONFIG", dict(train_epochs=0, reg_epochs=1, finetune_epochs=1, target_speedup=1.2))
    out = tmp_path / "run"
    assert main(["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--root", str(root), "--quick",
                 "--batch-size", "32", "--no-progress", "--threads", "1", "--backend", "eager", "--latency-batch", "2",
                 "--rounds", "1", "--repeats", "1", "--channels-last", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["epoch_images"] is None and run["train_subset"] is None
    # --channels-last reaches the run's config (this test's --quick recipe leaves it off)
    assert "channels_last" not in cli.QUICK_CONFIG and run["config"]["channels_last"] is True
    args = cli._parser().parse_args(["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--quick",
                                          "--no-channels-last"])
    assert args.channels_last is False  # turns --quick's channels-last off
    report = json.loads((out / "report.json").read_text())
    assert report["epochs"]["images_per_epoch"] == 96
    assert report["stage_accuracy_images"] == report["accuracy_images"] == 48  # fewer than --quick's 2,000 watched


def test_epoch_images_beyond_the_training_images_exits_2(tmp_path, capsys):
    from tests.test_robustness import _fake_fashion_mnist

    root = _fake_fashion_mnist(tmp_path / "fm")  # 96 training images
    argv = ["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--root", str(root), "--baseline-epochs", "1",
            "--out", str(tmp_path / "run")]
    assert main(argv + ["--epoch-images", "500"]) == 2
    assert ("--epoch-images 500 is more than the 96 training images there are to draw from (fashion-mnist's training "
            "split); give at most 96") in capsys.readouterr().err
    assert main(argv + ["--epoch-images", "50", "--train-subset", "40"]) == 2
    assert "--epoch-images 50 is more than the 40 training images there are to draw from (--train-subset 40)" in capsys.readouterr().err


def test_augment_is_for_fashion_mnist_only(capsys):
    assert main(["compress", "--model", "resnet20", "--dataset", "cifar10", "--augment"]) == 2
    assert "--augment shifts and flips Fashion-MNIST's training images; cifar10's are augmented already" in capsys.readouterr().err


TINY_FACTORY = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def build(num_classes=10, in_channels=1):
    return Tiny(num_classes, in_channels)


def five(in_channels=1):  # a factory that takes no num_classes: always 5 outputs
    return Tiny(5, in_channels)
"""


def test_a_model_with_other_classes_than_the_dataset_exits_2_before_writing(tmp_path, capsys):
    import torch

    import fxtucker.cli as cli
    from tests.test_robustness import _fake_fashion_mnist

    root = _fake_fashion_mnist(tmp_path / "fm")
    factory = tmp_path / "tiny.py"
    factory.write_text(TINY_FACTORY)
    common = ["--dataset", "fashion-mnist", "--root", str(root), "--batch-size", "32", "--threads", "1", "--no-progress"]
    why = "the model outputs 5 scores per image but fashion-mnist has 10 classes: "
    for model, fix in (
            (["--model", f"{factory}:build", "--model-kwargs", '{"num_classes": 5}'],
             "give --model-kwargs num_classes 10, or leave it out and fxtucker passes 10"),
            (["--model", f"{factory}:five"],
             f"{factory}:five is given num_classes=10 only when it takes a num_classes argument: make it take one, "
             f"or build 10 outputs")):
        for command in (["train", "--epochs", "1"], ["compress", "--baseline-epochs", "1"]):
            out = tmp_path / command[0]
            assert main([*command, *model, *common, "--out", str(out)]) == 2
            assert why + fix in capsys.readouterr().err
            assert not out.exists()
    # the dataset's own count, given or left to fxtucker, is fine: the check reads the model's outputs,
    # and draws nothing from the seeded run (the same weights as a run without the check)
    for kwargs in ([], ["--model-kwargs", '{"num_classes": 10}']):
        assert main(["train", "--epochs", "1", "--model", f"{factory}:build", *kwargs, *common,
                     "--out", str(tmp_path / f"ok{len(kwargs)}")]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_check_classes", lambda *a: None)
        assert main(["train", "--epochs", "1", "--model", f"{factory}:build", *common,
                     "--out", str(tmp_path / "unchecked")]) == 0
    checked = torch.load(tmp_path / "ok0" / "state_dict.pt", weights_only=True)
    unchecked = torch.load(tmp_path / "unchecked" / "state_dict.pt", weights_only=True)
    assert checked.keys() == unchecked.keys() and all(torch.equal(checked[k], unchecked[k]) for k in checked)


_SPREAD_NEED = "the largest max/min of the rounds' speed-ups still counted as reliable, a finite number >= 1 (default 1.2)"


@pytest.mark.parametrize("value, message", [("0.5", f"'0.5': give {_SPREAD_NEED}"),
                                            ("nan", f"'nan': give {_SPREAD_NEED}"),
                                            ("x", f"'x' is not a number; give {_SPREAD_NEED}")])
def test_bad_max_spread_exits_2(value, message, capsys):
    for command in (["inspect", "--model", "resnet20"], ["bench", "--model", "resnet20"],
                    ["compress", "--model", "resnet20", "--dataset", "fashion-mnist"]):
        with pytest.raises(SystemExit) as info:
            main(command + ["--max-spread", value])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "x"])
def test_bad_max_others_exits_2(value, capsys):
    for command in (["inspect", "--model", "resnet20"], ["bench", "--model", "resnet20"],
                    ["compress", "--model", "resnet20", "--dataset", "fashion-mnist"]):
        with pytest.raises(SystemExit) as info:
            main(command + ["--max-others", value])
        assert info.value.code == 2
        said = f"{value!r} is not a number; give " if value == "x" else f"{value!r}: give "
        assert (f"{said}the largest share of the machine's CPU time other processes may use while timing, "
                f"a number from 0 to 1 (default 0.25)") in capsys.readouterr().err


def _train_tiny(root, out, *extra):
    return main(["train", "--model", "resnet20", "--dataset", "fashion-mnist", "--root", str(root), "--epochs", "1",
                 "--batch-size", "32", "--threads", "1", "--no-progress", "--out", str(out), *extra])


def test_train_writes_weights_with_their_hash_and_resumes_only_the_same_run(tmp_path, monkeypatch, capsys):
    import hashlib

    import torch

    from fxtucker import data
    from fxtucker.models import get_model
    from fxtucker.train import evaluate
    from tests.test_robustness import _fake_fashion_mnist

    root = _fake_fashion_mnist(tmp_path / "fm")
    out = tmp_path / "train"
    assert _train_tiny(root, out) == 0
    info = json.loads((out / "train.json").read_text())
    weights = (out / "state_dict.pt").read_bytes()
    assert info["sha256"] == hashlib.sha256(weights).hexdigest()
    assert (info["epochs"], info["seed"], info["threads"], info["test_images"]) == (1, 0, 1, 48)
    model = get_model("resnet20", num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(out / "state_dict.pt", weights_only=True))
    test = data.make_loader(data.get_dataset("fashion-mnist", False, root=str(root)), 256, False)
    assert info["test_accuracy"] == evaluate(model, test)
    assert f"SHA-256 {info['sha256']}" in capsys.readouterr().out
    # the same command gives the same weights; --resume of a finished run changes nothing
    assert _train_tiny(root, tmp_path / "again") == 0
    assert (tmp_path / "again" / "state_dict.pt").read_bytes() == weights
    assert _train_tiny(root, out, "--resume") == 0
    assert (out / "state_dict.pt").read_bytes() == weights
    # --resume with other settings is refused, naming the key
    assert _train_tiny(root, out, "--resume", "--lr", "0.05") == 2
    assert "lr" in capsys.readouterr().err


def test_train_channels_last_saves_weights_in_the_default_format_and_resumes_only_with_it(tmp_path, capsys):
    import torch

    from tests.test_robustness import _fake_fashion_mnist

    root = _fake_fashion_mnist(tmp_path / "fm")
    assert _train_tiny(root, tmp_path / "cl", "--channels-last") == 0
    weights = torch.load(tmp_path / "cl" / "state_dict.pt", weights_only=True)
    assert weights["conv1.weight"].dim() == 4 and all(w.is_contiguous() for w in weights.values())
    capsys.readouterr()
    assert _train_tiny(root, tmp_path / "cl", "--resume") == 2  # the checkpoint was trained channels-last
    assert "channels_last" in capsys.readouterr().err


def test_train_draws_augmented_images_afresh_each_epoch_and_resumes_only_the_same_draws(tmp_path, capsys):
    from tests.test_robustness import _fake_fashion_mnist

    root = _fake_fashion_mnist(tmp_path / "fm")  # 96 training images
    out = tmp_path / "train"
    assert _train_tiny(root, out, "--epoch-images", "64", "--augment") == 0
    assert "(64 images an epoch, drawn afresh from 96, shifted and flipped, 1 thread(s))" in capsys.readouterr().out
    info = json.loads((out / "train.json").read_text())
    assert (info["epoch_images"], info["augment"]) == (64, True)
    plain = tmp_path / "plain"
    assert _train_tiny(root, plain) == 0  # other images: other weights
    assert (plain / "state_dict.pt").read_bytes() != (out / "state_dict.pt").read_bytes()
    stored = json.loads((plain / "train-run.json").read_text())
    del stored["epoch_images"], stored["augment"]  # a run stored before the flags existed
    (plain / "train-run.json").write_text(json.dumps(stored))
    assert _train_tiny(root, plain, "--resume") == 0  # reads them at their defaults
    capsys.readouterr()
    assert _train_tiny(root, out, "--resume") == 2  # without the flags it is another run
    assert "augment: True then, False now; epoch_images: 64 then, None now" in capsys.readouterr().err
    assert _train_tiny(root, out, "--epoch-images", "200") == 2
    assert "--epoch-images 200 is more than the 96 training images" in capsys.readouterr().err


def test_compress_starts_from_shipped_weights_and_refuses_a_changed_file(tmp_path, monkeypatch, capsys):
    import shutil

    import fxtucker.cli as cli
    from fxtucker import pretrained
    from fxtucker.io import sha256_file
    from tests.test_robustness import _fake_fashion_mnist

    monkeypatch.setenv("FXTUCKER_CACHE_DIR", str(tmp_path / "cache"))
    root = _fake_fashion_mnist(tmp_path / "fm")
    assert _train_tiny(root, tmp_path / "train") == 0
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tmp_path / "train" / "state_dict.pt", weights / "r20.pt")
    entry = pretrained.Shipped("resnet20", "fashion-mnist", "r20.pt", sha256_file(weights / "r20.pt"), 0.5, 1,
                               "fxtucker train --model resnet20 --dataset fashion-mnist --epochs 1")
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", weights)
    monkeypatch.setattr(pretrained, "SHIPPED", (entry,))
    monkeypatch.setattr(cli, "QUICK", dict(train_subset=64, eval_subset=16, baseline_epochs=1))
    monkeypatch.setattr(cli, "QUICK_CONFIG", dict(train_epochs=0, reg_epochs=1, finetune_epochs=1, target_speedup=1.2))
    argv = ["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--root", str(root), "--quick",
            "--batch-size", "32", "--no-progress", "--threads", "1", "--backend", "eager", "--latency-batch", "2",
            "--rounds", "1", "--repeats", "1"]
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "starting from fxtucker's shipped resnet20 for fashion-mnist" in printed and "training the baseline" not in printed
    assert not (out / "baseline.jsonl").exists()  # nothing trained before compressing
    rep = json.loads((out / "report.json").read_text())
    assert rep["epochs"]["baseline"] == 1 and rep["epochs"]["baseline_from"].startswith("shipped with fxtucker")
    assert rep["accuracy_before"] == json.loads((tmp_path / "train" / "train.json").read_text())["test_accuracy"]
    # --baseline-epochs trains a baseline instead, and says that the shipped weights were set aside
    assert main(argv + ["--out", str(tmp_path / "run3"), "--baseline-epochs", "1"]) == 0
    assert ("training the baseline resnet20 for 1 epochs (fxtucker ships trained weights for resnet20 on fashion-mnist, "
            "set aside because --baseline-epochs was given)") in capsys.readouterr().out
    # a changed file is refused before anything runs
    (weights / "r20.pt").write_bytes(b"not the weights")
    assert main(argv + ["--out", str(tmp_path / "run2")]) == 2
    assert "have SHA-256" in capsys.readouterr().err and not (tmp_path / "run2").exists()
    assert pretrained.shipped("ResNet20", "fashion-mnist") is entry and pretrained.shipped("resnet32", "fashion-mnist") is None
