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
    assert "MACs" in out and "CPU latency, batch 1 (ms)" in out
    data = json.loads(out_json.read_text())
    assert data["macs_after"] < data["macs_before"]
    assert data["report"]["stage"] == "fold_or_restore" and len(data["report"]["layers"]) == 21  # stem + 18 in blocks + 2 downsample
    assert f"{data['macs_before']:,}" in out


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
            "--train-subset", "256", "--eval-subset", "128", "--baseline-epochs", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for row in ("accuracy", "MACs", "params", "CPU latency, batch 1 (ms)"):
        assert row in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["macs_after"] <= rep["macs_before"] / 1.5
    assert rep["model"] == "resnet20" and len(rep["baseline_history"]) == 1
    assert list(rep["stages"]) == ["decomposed", "trained", "regularized", "pruned", "finetuned"]
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
