"""The fxtucker command line: the inspect job and bad input."""

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
