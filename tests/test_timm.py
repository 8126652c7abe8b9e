"""A timm model through the main flows: inspect, compress on synthetic data, export with parity."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxtucker
from fxtucker import CompressConfig, compress
from fxtucker.cli import main
from fxtucker.models import get_model
from tests.conftest import EXACT

timm = pytest.importorskip("timm")

NAME = "timm:resnet10t"


def test_inspect_timm_model(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert main(["inspect", "--model", NAME, "--input-size", "32", "--num-classes", "10", "--ranks", "0.5",
                 "--json", str(out_json)]) == 0
    assert "layer1.0.conv1" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    decided = {l["name"]: l["decision"] for l in data["report"]["layers"]}
    assert decided["layer4.0.conv2"] == "decomposed"
    assert data["macs_after"] < data["macs_before"]


def test_compress_and_export_timm_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = get_model(NAME, num_classes=4, in_channels=3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 4, (32,), generator=g)
    config = CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=1, target_speedup=1.5, steer_every=1)
    result = compress(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), x[:2],
                      eval_data=DataLoader(TensorDataset(x, y), batch_size=16), config=config,
                      out_dir=tmp_path / "run", progress=False)
    rep = result.report
    assert rep["macs_after"] <= rep["macs_before"] / 1.5
    assert any(l["decision"] == "decomposed" for l in rep["layers"])
    final = result.model.eval()
    extra = {"model": NAME, "model_kwargs": {}, "num_classes": 4, "in_channels": 3, "input_shape": [2, 3, 32, 32]}
    fxtucker.export(final, x[:2], tmp_path / "run" / "manifest", "manifest",
                    model_factory=lambda: get_model(NAME, num_classes=4), extra=extra)
    reloaded = fxtucker.load(tmp_path / "run" / "manifest", lambda: get_model(NAME, num_classes=4)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x[:4]), final(x[:4]), **EXACT)
    # The CLI rebuilds the timm model from the name in the manifest and checks the file it writes.
    capsys.readouterr()
    out = tmp_path / "final.pt"
    assert main(["export", "--from", str(tmp_path / "run"), "--format", "torchscript", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"rebuilt {NAME} from" in text and "reloaded and checked on a 1x3x32x32 input" in text
    scripted = torch.jit.load(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x[:4]), final(x[:4]))
