"""--model beyond the built-in names: timm:NAME, module.path:callable, path/to/file.py:callable,
--model-kwargs, --checkpoint with them, and `python -m fxtucker`."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from fxtucker.cli import main
from fxtucker.models import VGGSmall, get_model, model_label

FACTORY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, width, num_classes, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def build(width=8, num_classes=10, in_channels=3):
    return Tiny(width, num_classes, in_channels)


def fixed():
    return Tiny(4, 2, 1)


def not_a_module():
    return {"conv": 1}


NOT_CALLABLE = 3
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_net.py"
    path.write_text(FACTORY)
    return path


def test_file_spec_passes_kwargs_and_dataset_sizes(factory_file):
    model = get_model(f"{factory_file}:build", num_classes=5, in_channels=1, model_kwargs={"width": 6})
    assert type(model).__name__ == "Tiny"
    assert model.conv.in_channels == 1 and model.conv.out_channels == 6 and model.fc.out_features == 5
    # A factory without num_classes / in_channels parameters is called with model_kwargs alone.
    assert get_model(f"{factory_file}:fixed", num_classes=7).fc.out_features == 2
    # model_kwargs win over the dataset's sizes.
    assert get_model(f"{factory_file}:build", num_classes=5, model_kwargs={"num_classes": 3}).fc.out_features == 3


def test_module_spec_builds_a_class_and_a_torchvision_function():
    model = get_model("fxtucker.models:VGGSmall", num_classes=4, in_channels=1)
    assert isinstance(model, VGGSmall) and model.classifier.out_features == 4
    assert model.features[0].in_channels == 1
    tv = get_model("torchvision.models:resnet18", model_kwargs={"num_classes": 6})
    assert tv.fc.out_features == 6


@pytest.mark.parametrize("spec, error, pattern", [
    ("nosuchpkg.models:build", ValueError,
     r"--model 'nosuchpkg.models:build': no module named 'nosuchpkg' can be imported; install the package"),
    ("fxtucker.nosuch:build", ValueError, r"no module named 'fxtucker.nosuch' can be imported"),
    ("fxtucker.models:VGGSmal", ValueError,
     r"'fxtucker.models' has no attribute 'VGGSmal' \(close matches: VGGSmall\); name a function or class"),
    ("fxtucker.models:CIFAR_MODELS", ValueError, r"'CIFAR_MODELS' is a dict, not a callable"),
    ("fxtucker.models:", ValueError, r"give module.path:callable or path/to/file.py:callable"),
    ("missing_dir/net.py:build", FileNotFoundError,
     r"the model file 'missing_dir/net.py' does not exist or is not a file"),
])
def test_bad_specs_name_what_was_tried(spec, error, pattern):
    with pytest.raises(error, match=pattern):
        get_model(spec)


def test_file_spec_errors(factory_file, tmp_path):
    with pytest.raises(ValueError, match=r"not_a_module\(\*\*\{\}\) returned a dict, not an nn.Module"):
        get_model(f"{factory_file}:not_a_module")
    with pytest.raises(ValueError, match=r"'NOT_CALLABLE' is a int, not a callable"):
        get_model(f"{factory_file}:NOT_CALLABLE")
    with pytest.raises(ValueError, match=r"has no attribute 'buidl' \(close matches: build\)"):
        get_model(f"{factory_file}:buidl")
    with pytest.raises(ValueError, match=r"build\(width=8, num_classes=10, in_channels=3\) cannot be called with "
                                         r"keyword arguments \{'depth': 3\}.*change the model kwargs"):
        get_model(f"{factory_file}:build", model_kwargs={"depth": 3})
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_for_fxtucker\n")
    with pytest.raises(ValueError, match=r"running the model file '.*broken.py' raised ModuleNotFoundError: No module "
                                         r"named 'no_such_module_for_fxtucker'; fix the file"):
        get_model(f"{broken}:build")


def test_torchvision_model_kwargs_override_num_classes_and_bad_ones_are_named():
    model = get_model("resnet18", num_classes=10, model_kwargs={"num_classes": 5})
    assert model.fc.out_features == 5
    with pytest.raises(ValueError, match=r"get_model\('resnet18'\) with weights='DEFAULT' in the model kwargs: fxtucker "
                                         r"builds torchvision models without downloading weights"):
        get_model("resnet18", model_kwargs={"weights": "DEFAULT"})
    with pytest.raises(ValueError, match=r"torchvision's resnet18 does not take the model kwargs \{'bogus': 5\} .*"
                                         r"valid: the keyword parameters of torchvision.models.resnet18"):
        get_model("resnet18", model_kwargs={"bogus": 5})
    for bad in (0, 2.0, "5"):
        with pytest.raises(ValueError, match=r"num_classes in the model kwargs must be an integer >= 1, got "):
            get_model("resnet18", model_kwargs={"num_classes": bad})
    with pytest.raises(ValueError, match=r"torchvision's resnet18 refused the model kwargs \{'norm_layer': 5\} \('int' object is not callable\)"):
        get_model("resnet18", model_kwargs={"norm_layer": 5})


def test_cifar_models_refuse_kwargs():
    with pytest.raises(ValueError, match=r"the CIFAR models take no model_kwargs, got \{'width': 2\}"):
        get_model("resnet20", model_kwargs={"width": 2})
    with pytest.raises(ValueError, match=r"model_kwargs must be a mapping"):
        get_model("resnet20", model_kwargs=[1])


def test_model_label_is_a_file_name():
    assert model_label("resnet20") == "resnet20"
    assert model_label("timm:resnet10t") == "timm-resnet10t"
    assert model_label("path/to/my_net.py:build") == "my_net-build"
    assert model_label("pkg.models:Net") == "pkg.models-Net"


def test_checkpoint_with_a_file_spec(factory_file, tmp_path):
    torch.manual_seed(1)
    trained = get_model(f"{factory_file}:build", num_classes=3, in_channels=1)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, path)
    loaded = get_model(f"{factory_file}:build", num_classes=3, in_channels=1, checkpoint=path)
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"has 2 tensors whose shape differs from the model: 'fc.bias': checkpoint "
                                         r"\(3,\) vs model \(4,\), 'fc.weight'"):
        get_model(f"{factory_file}:build", num_classes=4, in_channels=1, checkpoint=path)


def test_timm_model_without_pretrained_weights():
    timm = pytest.importorskip("timm")
    model = get_model("timm:resnet10t", num_classes=7, in_channels=1)
    assert isinstance(model, timm.models.ResNet) and model.fc.out_features == 7
    assert model.conv1[0].in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match=r"timm [\d.]+ has no model 'resnet10x' \(close matches: 'timm:resnet10t'"):
        get_model("timm:resnet10x")
    with pytest.raises(ValueError, match=r"without pretrained weights and downloads nothing"):
        get_model("timm:resnet10t", model_kwargs={"pretrained": True})


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match=r"needs timm, which is not installed.*pip install fxtucker\[timm\]"):
        get_model("timm:resnet10t")


def test_cli_model_kwargs_and_spec_errors(factory_file, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert main(["inspect", "--model", f"{factory_file}:build", "--model-kwargs", '{"width": 16}', "--input-size",
                 "8", "--in-channels", "2", "--num-classes", "3", "--json", str(out_json)]) == 0
    layers = json.loads(out_json.read_text())["report"]["layers"]
    assert [l["name"] for l in layers] == ["conv"] and layers[0]["full_ranks"] == [2, 16]
    capsys.readouterr()
    assert main(["inspect", "--model", "nosuchpkg:build"]) == 2
    assert "no module named 'nosuchpkg'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--model", "resnet20", "--model-kwargs", "{width: 1}"])
    assert info.value.code == 2
    assert "--model-kwargs '{width: 1}' is not JSON" in capsys.readouterr().err
    monkey = {"timm": None}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in monkey.items():
            mp.setitem(sys.modules, k, v)
        assert main(["bench", "--model", "timm:resnet10t"]) == 2
    assert "pip install fxtucker[timm]" in capsys.readouterr().err


def test_python_dash_m_fxtucker(tmp_path):
    version = subprocess.run([sys.executable, "-m", "fxtucker", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("fxtucker ")
    bad = subprocess.run([sys.executable, "-m", "fxtucker", "inspect", "--model", "resnet19"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown model 'resnet19'. Did you mean resnet18" in bad.stderr
    assert "timm:NAME, module.path:callable, path/to/file.py:callable" in bad.stderr
