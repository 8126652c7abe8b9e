"""fxtucker.export and `fxtucker export`: every format reloads to the same function (manifests: test_manifest.py)."""

import sys
import warnings

import pytest
import torch
import torch.nn as nn

import fxtucker
from fxtucker import models
from fxtucker.cli import main
from fxtucker.export import ExportError, export, read_manifest
from fxtucker.passes import cost_model, decompose_conv, fold_or_restore, insert_gates, strip_gates
from tests.conftest import EXACT
from tests.test_manifest import Net, compressed_net

export_module = sys.modules["fxtucker.export"]  # fxtucker.export is the function; this is its module


@pytest.fixture(scope="module")
def compressed():
    return compressed_net()


@pytest.mark.parametrize("fmt", ["torchscript", "torch.export"])
def test_file_formats_never_write_through_a_planted_link(tmp_path, compressed32, fmt):
    final, x = compressed32
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "m.pt").symlink_to(victim)
    export(final, x, tmp_path / "m.pt", fmt)
    assert victim.read_text() == "precious" and not (tmp_path / "m.pt").is_symlink()


# ----------------------------------------------------------------------------- the other formats


@pytest.fixture(scope="module")
def compressed32():
    return compressed_net(torch.float32, fold=True)


def test_onnx_parity(tmp_path, compressed32):
    import onnx

    final, x = compressed32
    result = export(final, x, tmp_path / "m.onnx", "onnx")
    assert result.files == (tmp_path / "m.onnx",) and result.max_abs_error < 1e-5
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops


def test_torchscript_parity(tmp_path, compressed32):
    final, x = compressed32
    result = export(final, x, tmp_path / "m.pt", "torchscript")
    assert result.method == "script" and result.max_abs_error == 0.0
    assert torch.equal(torch.jit.load(str(tmp_path / "m.pt"))(x), final(x))


def test_torchscript_falls_back_to_trace(tmp_path):
    class Unscriptable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, *xs):
            return self.conv(xs[0])  # TorchScript has no *args

    model = Unscriptable().eval()
    x = torch.randn(1, 3, 6, 6)
    with pytest.warns(UserWarning, match="torch.jit.script failed"):
        result = export(model, x, tmp_path / "m.pt", "torchscript")
    assert result.method == "trace" and result.max_abs_error == 0.0


def test_torch_export_parity(tmp_path, compressed32):
    final, x = compressed32
    result = export(final, x, tmp_path / "m.pt2", "torch.export")
    assert result.max_abs_error == 0.0
    torch.testing.assert_close(torch.export.load(str(tmp_path / "m.pt2")).module()(x), final(x))


def test_export_puts_the_modes_back(tmp_path):
    model = Net().train()
    export(model, torch.randn(2, 3, 8, 8), tmp_path / "m.pt2", "torch.export")
    assert model.training and model.bn_a.training


# ----------------------------------------------------------------------------- the check can fail


def test_parity_failure_torchscript(tmp_path, compressed32, monkeypatch):
    final, x = compressed32
    real_load = torch.jit.load

    class Off(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            return out + (out.abs().max() * 1e-3)  # a 0.1% error everywhere

    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: Off(real_load(*a, **k)))
    with pytest.raises(ExportError, match=r"the reloaded torchscript model does not match the model on the example "
                                          r"inputs: max abs error [\d.e-]+, max rel error [\d.e+-]+, beyond the "
                                          r"tolerance .* atol=1e-05, rtol=0.0001 \(output 0: \d+ of 20 elements\)"
                       ) as info:
        export(final, x, tmp_path / "m.pt", "torchscript")
    ref = final(x).detach()
    assert info.value.max_abs_error == pytest.approx(float(ref.abs().max()) * 1e-3, rel=1e-3)
    assert isinstance(info.value, RuntimeError)
    # A looser tolerance accepts the same difference.
    assert export(final, x, tmp_path / "m.pt", "torchscript", atol=1.0).max_abs_error > 0


def test_parity_failure_onnx(tmp_path, compressed32, monkeypatch):
    import onnxruntime

    final, x = compressed32
    real_run = onnxruntime.InferenceSession.run

    def run(self, *args, **kwargs):
        outs = real_run(self, *args, **kwargs)
        outs[0][0, 0] += 1.0
        return outs

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", run)
    with pytest.raises(ExportError, match=r"reloaded onnx model does not match .* \(output 0: 1 of 20 elements\)"):
        export(final, x, tmp_path / "m.onnx", "onnx")


def test_compare_handles_nan_and_tuples():
    a = torch.tensor([1.0, float("nan"), 3.0])
    assert export_module.compare_outputs((a, a), (a.clone(), a.clone()), "f", 0.0, 0.0) == (0.0, 0.0)
    b = a.clone()
    b[0] = float("nan")
    with pytest.raises(ExportError, match="output 0: 1 of 3 elements"):
        export_module.compare_outputs(a, b, "f", 1e-4, 1e-5)
    with pytest.raises(ExportError, match="returns 1 tensor\\(s\\), the model 2"):
        export_module.compare_outputs((a, a), (a,), "f", 1e-4, 1e-5)


# ----------------------------------------------------------------------------- argument errors


def test_argument_errors(tmp_path, compressed):
    final, x = compressed
    with pytest.raises(ValueError, match="format 'tflite' is not known; valid: 'onnx', 'torchscript', 'torch.export', "
                                         "'manifest'"):
        export(final, x, tmp_path / "m", "tflite")
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple of tensors"):
        export(final, [1, 2], tmp_path / "m.pt", "torchscript")
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0, got -1"):
        export(final, x, tmp_path / "m.pt", "torchscript", rtol=-1)
    with pytest.raises(ValueError, match="model_factory is only used by format='manifest', not 'onnx'"):
        export(final, x, tmp_path / "m.onnx", "onnx", model_factory=Net)
    with pytest.raises(ValueError, match="format='torchscript' writes a file, but .* is a directory"):
        export(final, x, tmp_path, "torchscript")
    with pytest.raises(TypeError, match="export expects an nn.Module"):
        export(lambda t: t, x, tmp_path / "m.pt", "torchscript")


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime", "onnxscript"])
def test_missing_onnx_packages_name_the_extra(tmp_path, compressed32, monkeypatch, missing):
    final, x = compressed32
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    with pytest.raises(ImportError, match=rf"format='onnx' needs {missing}, which is not installed: "
                                          rf"pip install fxtucker\[export\]"):
        export(final, x, tmp_path / "m.onnx", "onnx")
    assert not (tmp_path / "m.onnx").exists()


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def resnet20_run(tmp_path_factory):
    """A compressed resnet20 written the way `fxtucker compress` writes it: out/manifest/ with the model named."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    model = models.get_model("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.randn(1, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = insert_gates(decompose_conv(cost_model(fxtucker.trace(model), x), ranks=0.5))
    final = fold_or_restore(strip_gates(gated, 0.0), x)
    torch.save(final.state_dict(), out / "compressed_state_dict.pt")
    export(final, x, out / "manifest", "manifest",
           model_factory=lambda: models.get_model("resnet20", num_classes=10, in_channels=1),
           extra={"model": "resnet20", "num_classes": 10, "in_channels": 1, "input_shape": [1, 1, 28, 28]})
    return out, final, x


def test_cli_export_from_a_run_to_each_format(tmp_path, resnet20_run, capsys):
    run, final, x = resnet20_run
    assert main(["export", "--from", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert f"rebuilt resnet20 from {run / 'manifest'}: {sum(p.numel() for p in final.parameters()):,} parameters" in out
    assert f"wrote {tmp_path / 'm.pt'} (torchscript, script)" in out
    assert "reloaded and checked on a 1x1x28x28 input: max abs error 0, max rel error 0 (atol=1e-05, rtol=0.0001)" in out
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.pt"))(x), final(x))


def test_cli_export_onnx_with_fold_bn(tmp_path, resnet20_run, capsys):
    run, _, _ = resnet20_run
    # --compressed is the same option; a file inside the run directory finds the manifest too.
    assert main(["export", "--compressed", str(run / "compressed_state_dict.pt"), "--format", "onnx", "--fold-bn",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "folded 21 BatchNorm layer(s) into their convs" in out and "(onnx, torch.onnx.export(dynamo=True))" in out


def test_cli_fold_bn_counts_only_its_own_folds(tmp_path, resnet20_run, capsys):
    run, final, x = resnet20_run
    assert main(["export", "--from", str(run), "--format", "manifest", "--fold-bn", "--out", str(tmp_path / "a")]) == 0
    assert "folded 21 BatchNorm layer(s) into their convs" in capsys.readouterr().out
    # the folded manifest's record holds those 21 folds; folding it again folds nothing
    assert main(["export", "--from", str(tmp_path / "a"), "--format", "manifest", "--fold-bn",
                 "--out", str(tmp_path / "b")]) == 0
    assert "folded 0 BatchNorm layer(s) into their convs" in capsys.readouterr().out
    assert sum(b.folded for b in read_manifest(tmp_path / "b")["batchnorms"]) == 21


def test_cli_export_manifest_again(tmp_path, resnet20_run):
    run, final, x = resnet20_run
    assert main(["export", "--from", str(run), "--format", "manifest", "--out", str(tmp_path / "again")]) == 0
    again = fxtucker.load(tmp_path / "again", lambda: models.get_model("resnet20", num_classes=10, in_channels=1))
    torch.testing.assert_close(again(x), final(x), **EXACT)
    assert read_manifest(tmp_path / "again")["extra"]["model"] == "resnet20"


def test_cli_export_uncompressed_model(tmp_path, capsys):
    model = models.get_model("resnet20", num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert main(["export", "--model", "resnet20", "--checkpoint", str(tmp_path / "weights.pt"), "--num-classes", "10",
                 "--input-size", "16", "--format", "torch.export", "--out", str(tmp_path / "m.pt2")]) == 0
    assert "reloaded and checked on a 1x3x16x16 input" in capsys.readouterr().out
    x = torch.randn(1, 3, 16, 16)  # torch.export fixed the batch size of the example input
    torch.testing.assert_close(torch.export.load(str(tmp_path / "m.pt2")).module()(x), model(x))


@pytest.mark.parametrize("argv,message", [
    (["--from", "NOPE", "--format", "onnx"], "--from 'NOPE' does not exist"),
    (["--from", ".", "--format", "onnx"], "--from '.' holds no fxtucker manifest (manifest.json)"),
    (["--format", "onnx"], "give --from DIR (the output of `fxtucker compress`) or --model NAME"),
    (["--model", "resnet19", "--format", "onnx"], "unknown model 'resnet19'. Did you mean resnet18"),
    (["--from", "RUN", "--checkpoint", "x.pt", "--format", "onnx"], "give --from (a compressed model) or --checkpoint"),
    (["--from", "RUN", "--model", "resnet32", "--format", "onnx"], "--model 'resnet32' differs from the model 'resnet20'"),
    (["--from", "RUN", "--num-classes", "5", "--format", "onnx"], "--num-classes 5 differs from the 10 the manifest in"),
    (["--from", "RUN", "--in-channels", "3", "--format", "onnx"], "--in-channels 3 differs from the 1 the manifest in"),
], ids=["missing", "no-manifest", "nothing", "unknown-model", "both", "other-model", "other-classes", "other-channels"])
def test_cli_bad_input_exits_2(tmp_path, resnet20_run, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    argv = [str(resnet20_run[0]) if a == "RUN" else a for a in argv]
    assert main(["export", *argv, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxtucker export: error: ") and message in err


def test_cli_torchscript_export_says_once_that_torch_deprecates_it(tmp_path, resnet20_run, capsys):
    run, _, _ = resnet20_run
    assert main(["export", "--from", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    out, err = capsys.readouterr()
    assert out.count("note: this torch deprecates TorchScript (torch.jit.script, save and load warn so)") == 1
    assert "FutureWarning" not in err and "is deprecated" not in out.replace("deprecates", "")


def test_cli_unknown_format_and_parity_failure(tmp_path, resnet20_run, monkeypatch, capsys):
    run, _, _ = resnet20_run
    with pytest.raises(SystemExit) as info:
        main(["export", "--from", str(run), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: (lambda m: (lambda x: m(x) + 1.0))(real_load(*a, **k)))
    assert main(["export", "--from", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err
    assert "fxtucker export: parity check failed: the reloaded torchscript model does not match" in err
    assert "note: this torch deprecates TorchScript" in err  # torch's warnings are kept when the check fails


FASHION = __import__("pathlib").Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_cli_compress_writes_a_manifest_that_export_reads(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text("train_epochs = 0\nreg_epochs = 1\nfinetune_epochs = 0\ntarget_speedup = 1.5\n")
    run = tmp_path / "run"
    assert main(["compress", "--model", "resnet20", "--dataset", "fashion-mnist", "--config", str(config),
                 "--train-subset", "128", "--eval-subset", "64", "--baseline-epochs", "1", "--no-progress",
                 "--backend", "eager", "--latency-batch", "2", "--rounds", "1", "--repeats", "1", "--out", str(run)]) == 0
    assert "compressed_state_dict.pt, manifest/" in capsys.readouterr().out
    manifest = read_manifest(run / "manifest")
    assert manifest["extra"] == {"model": "resnet20", "model_kwargs": {}, "num_classes": 10, "in_channels": 1,
                                 "input_shape": [1, 1, 28, 28], "dataset": "fashion-mnist"}
    assert manifest["config"]["target_speedup"] == 1.5 and manifest["seed"] == 0
    assert any(r.decision == "decomposed" for r in manifest["layers"])
    state = torch.load(run / "compressed_state_dict.pt", weights_only=True)
    loaded = fxtucker.load(run / "manifest", lambda: models.get_model("resnet20", num_classes=10, in_channels=1))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    assert main(["export", "--from", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "reloaded and checked on a 1x1x28x28 input" in capsys.readouterr().out
