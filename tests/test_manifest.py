"""fxtucker.manifest: a manifest reloads to the same model, node for node and bit for bit, by replaying
the passes with the recorded plan; a manifest that was tampered with is refused with a clear error."""

import copy
import importlib
import json
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxtucker
from fxtucker.compress import compress
from fxtucker.export import ExportError, ExportResult, export
from fxtucker.io import sha256_file
from fxtucker.manifest import MANIFEST_VERSION, load, read_manifest
from fxtucker.meta import graph_record
from fxtucker.passes import cost_model, decompose_conv, fold_bn, fold_or_restore, insert_gates, strip_gates
from fxtucker.passes.forms import ChannelsLinear
from tests.conftest import EXACT

manifest_module = sys.modules["fxtucker.manifest"]
EXPORT_MODULE = sys.modules["fxtucker.export"]  # fxtucker.export is the function; this is its module
TIME_MODULE = importlib.import_module("fxtucker.passes.time_forms")  # where plan_forms looks up time_chain


class Net(nn.Module):
    """conv-BN pairs (one kept decomposed, one restored), a grouped conv, a 1x1 conv and a Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(32)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
        self.p = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        x = torch.relu(self.g(x))
        return self.fc(self.p(x).mean((2, 3)))


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.normal_(1, 0.5)
            m.bias.data.normal_(0, 0.5)
    return model


def compressed_net(dtype=torch.float64, fold=False, **fold_or_restore_kw):
    """Net through the whole chain, with components pruned in b, g (a whole rank of g) and fc."""
    torch.manual_seed(0)
    model = randomize_bn(Net()).to(dtype).eval()
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    gm = cost_model(fxtucker.trace(model), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = insert_gates(decompose_conv(gm, ranks={"a": (3, 27), "b": (8, 8), "g": (4, 4), "p": 12, "fc": 8},
                                            linear=True))
    with torch.no_grad():  # stand-ins for training: some gates die
        gated.get_submodule("b.gate_in").weight[:5] = 0.0
        gated.get_submodule("g.gate_in").weight[:] = 0.0  # every input component of g: rank 0
        gated.get_submodule("fc.gate_in").weight[:3] = 0.0
    final = fold_or_restore(strip_gates(gated, 1e-6), x, **fold_or_restore_kw)
    return (fold_bn(final) if fold else final), x


@pytest.fixture(scope="module")
def compressed():
    return compressed_net()


def test_the_chain_in_the_fixture_prunes_and_restores(compressed):
    final, _ = compressed
    layers = {r.name: r for r in fxtucker.report(final).layers}
    assert layers["a"].decision == "restored" and layers["b"].decision == "decomposed"
    assert layers["b"].ranks == (3, 8) and layers["g"].ranks[0] == 0 and layers["fc"].ranks == (5,)


@pytest.mark.parametrize("fold", [False, True], ids=["bn-kept", "bn-folded"])
def test_manifest_round_trip(tmp_path, fold):
    final, x = compressed_net(fold=fold)
    config = fxtucker.CompressConfig(threshold=1e-6, seed=7)
    result = export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double(), config=config,
                    extra={"model": "Net"})
    assert isinstance(result, ExportResult) and result.method == "fxtucker.load"
    assert result.files == (tmp_path / "m" / "manifest.json", tmp_path / "m" / "weights.pt")
    assert result.max_abs_error == 0.0
    loaded = load(tmp_path / "m", lambda: Net().double())
    assert not loaded.training
    torch.testing.assert_close(loaded(x), final(x), **EXACT)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())
    assert loaded.state_dict().keys() == final.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in final.state_dict().items())
    assert loaded.code == final.code
    # The records come back: the report and each node's record are the exported ones.
    assert graph_record(loaded) == graph_record(final)
    assert [n.meta.get("fxtucker") for n in loaded.graph.nodes] == [n.meta.get("fxtucker") for n in final.graph.nodes]
    assert str(fxtucker.report(loaded)) == str(fxtucker.report(final))
    assert any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules()) != fold
    data = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert data["format_version"] == MANIFEST_VERSION and data["fxtucker_version"] == fxtucker.__version__
    assert data["torch_version"] == torch.__version__
    assert data["config"]["threshold"] == 1e-6 and data["seed"] == 7 and data["extra"] == {"model": "Net"}
    assert {l["name"]: (l["decision"], l["ranks"]) for l in data["layers"]}["b"] == ("decomposed", [3, 8])
    assert [b["folded"] for b in data["batchnorms"]] == ([True, True] if fold else [])
    assert data["state_dict"]["b.first.weight"] == {"shape": [3, 32, 1, 1], "dtype": "float64"}


@pytest.mark.parametrize("form", ["merge_first", "merge_last"])
def test_manifest_round_trip_of_latency_forms(tmp_path, monkeypatch, form):
    """fold_or_restore(cost="latency") may keep a Tucker-1 merge; load rebuilds it. The timings are
    stubbed so that ``form`` wins wherever it is offered (a merge is a 2-module chain with a kxk conv)."""
    def fake_time(chain, *args):
        kxk = [m for m in chain if getattr(m, "kernel_size", (1,)) != (1,) * len(getattr(m, "kernel_size", (1,)))]
        is_form = len(chain) == 2 and len(kxk) == 1 and (chain[0] is kxk[0]) == (form == "merge_first")
        return 1.0 if is_form else 2.0

    monkeypatch.setattr(TIME_MODULE, "time_chain", fake_time)
    final, x = compressed_net(fold=True, cost="latency")
    forms = {r.name: r.form for r in fxtucker.report(final).layers}
    assert forms["b"] == forms["g"] == form
    export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double())
    loaded = load(tmp_path / "m", lambda: Net().double())
    gone = "b_first" if form == "merge_first" else "b_last"
    assert gone not in final.code and loaded.code == final.code
    torch.testing.assert_close(loaded(x), final(x), **EXACT)
    assert graph_record(loaded) == graph_record(final)


def test_linear_forms_round_trip_and_export_to_every_format(tmp_path, monkeypatch):
    """The +linear forms (pointwise convs as nn.Linear between permutes): the manifest rebuilds them
    node for node, and every format's own parity check passes."""
    monkeypatch.setattr(TIME_MODULE, "time_chain",
                        lambda chain, *a: 1.0 if any(isinstance(m, ChannelsLinear) for m in chain) else 2.0)
    final, x = compressed_net(fold=True, cost="latency")
    forms = {r.name: r.form for r in fxtucker.report(final).layers}
    # ties at 1 ms go to the fewest MACs; g is grouped (no pointwise factor), p is restored as a Linear
    assert forms == {"a": "merge_last+linear", "b": "tucker2+linear", "g": "tucker2", "p": "dense+linear",
                     "fc": "svd"}
    export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double())
    loaded = load(tmp_path / "m", lambda: Net().double())
    assert "b_last_channels_first" in final.code and loaded.code == final.code
    torch.testing.assert_close(loaded(x), final(x), **EXACT)
    assert graph_record(loaded) == graph_record(final)
    final32 = copy.deepcopy(final).float()
    x32 = x.float()
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt"), ("torch.export", "m.pt2")):
        assert export(final32, x32, tmp_path / name, fmt).max_abs_error < 1e-5


def test_manifest_when_fold_bn_ran_before_decompose_conv(tmp_path):
    # fold_bn's record outlives the later passes, and the manifest carries it; loading folds by the node list.
    model = randomize_bn(Net()).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decomposed = decompose_conv(cost_model(fold_bn(fxtucker.trace(model)), x), ranks=0.5, linear=True)
    final = fold_or_restore(strip_gates(insert_gates(decomposed), 0.0), x)
    assert [(r.name, r.folded) for r in graph_record(final).batchnorms] == [("bn_a", True), ("bn_b", True)]
    export(final, x, tmp_path / "m", "manifest", model_factory=Net)
    loaded = load(tmp_path / "m", Net)
    torch.testing.assert_close(loaded(x), final(x), **EXACT)
    assert loaded.code == final.code
    assert graph_record(loaded).batchnorms == graph_record(final).batchnorms


def test_manifest_of_a_model_fold_bn_alone_touched(tmp_path):
    model = randomize_bn(Net()).eval()
    x = torch.randn(1, 3, 8, 8)
    folded = fold_bn(fxtucker.trace(model))
    export(folded, x, tmp_path / "m", "manifest", model_factory=Net)
    loaded = load(tmp_path / "m", Net)
    torch.testing.assert_close(loaded(x), folded(x), **EXACT)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())


@pytest.fixture()
def manifest_dir(tmp_path, compressed):
    final, x = compressed
    export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double())
    return tmp_path / "m"


def _edit(folder, change):
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _set_layer_ranks(data, name, ranks):
    next(l for l in data["layers"] if l["name"] == name)["ranks"] = ranks


@pytest.mark.parametrize("change,match", [
    (lambda d: d.update(format_version=2), r"format_version 2 is not supported: this fxtucker reads version 1"),
    (lambda d: d.update(format="something"), r"'format' must be 'fxtucker-manifest', got 'something'"),
    (lambda d: d.pop("layers"), r"required key\(s\) \['layers'\] are missing"),
    (lambda d: d.pop("weights_sha256"), r"required key\(s\) \['weights_sha256'\] are missing"),
    (lambda d: d.update(layers="b"), r"'layers' must be list, got str"),
    (lambda d: d["layers"][1].update(ranks="3x8"), r"layers\[1\].ranks must be list, got str"),
    (lambda d: d["layers"][1].update(ranks=[3, True]), r"layers\[1\].ranks\[1\] must be int, got bool"),
    (lambda d: _set_layer_ranks(d, "b", [-3, 8]), r"layers\[1\].ranks\[0\] is -3; it must be >= 0"),
    (lambda d: d["layers"][1].pop("name"), r"layers\[1\] lacks the key\(s\) \['name'\]"),
    (lambda d: d["layers"][1].update(code="import os"), r"layers\[1\] has unknown key\(s\) \['code'\]"),
    (lambda d: d["nodes"][1].update(record={"type": "Evil"}), r"nodes\[1\].record.type must be one of"),
    (lambda d: d.update(weights="../../etc/passwd"), r"'weights' must be a file name inside the manifest's directory"),
    (lambda d: d["state_dict"]["b.first.weight"].update(shape=[4, 32, 1, 1]),
     r"weight 'b.first.weight' is \(3, 32, 1, 1\) torch.float64, the manifest says \(4, 32, 1, 1\) float64"),
    (lambda d: _set_layer_ranks(d, "b", [4, 8]),
     r"weight 'b.first.weight' has shape \(3, 32, 1, 1\) in the manifest, the rebuilt model's is \(4, 32, 1, 1\): "
     r"the recorded ranks and the weights disagree"),
], ids=["version", "format", "missing-layers", "missing-sha", "layers-type", "ranks-type", "ranks-bool", "ranks-negative",
        "missing-name", "unknown-key", "record-type", "weights-path", "state-dict-shape", "ranks-vs-weights"])
def test_tampered_manifest_is_refused_with_a_clear_error(manifest_dir, change, match):
    _edit(manifest_dir, change)
    with pytest.raises(ValueError, match=match):
        load(manifest_dir, lambda: Net().double())


def test_not_a_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fxtucker manifest at"):
        load(tmp_path, Net)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON manifest"):
        load(tmp_path, Net)


class _Evil:
    """Unpickling this would run code: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _replace_weights(folder, obj):
    torch.save(obj, folder / "weights.pt")
    _edit(folder, lambda d: d.update(weights_sha256=sha256_file(folder / "weights.pt")))


def test_weights_file_with_pickled_code_is_refused(manifest_dir, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(manifest_dir / "weights.pt", weights_only=True)
    _replace_weights(manifest_dir, {**state, "b.first.weight": _Evil(str(marker))})
    with pytest.raises(ValueError, match=r"refused: not a plain state_dict of tensors: refused to unpickle the "
                                         r"global 'io.open'.* never runs code from a file") as info:
        load(manifest_dir, lambda: Net().double())
    assert "weights_only" not in str(info.value)  # torch's advice to load it unsafely is not repeated
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"PK\x03\x04" + b"\x00" * 40, b"garbage, not a zip" * 50, None],
                         ids=["torn-zip", "garbage", "truncated"])
def test_weights_file_truncated_or_garbage_with_its_checksum_is_refused(manifest_dir, content):
    weights = manifest_dir / "weights.pt"
    data = weights.read_bytes()
    weights.write_bytes(content if content is not None else data[: len(data) // 2])
    _edit(manifest_dir, lambda d: d.update(weights_sha256=sha256_file(weights)))
    with pytest.raises(ValueError, match=r"weights.pt: refused: not a plain state_dict of tensors: it cannot be read "
                                         r"\(.*\); the file is truncated or not a torch.save file"):
        load(manifest_dir, lambda: Net().double())


@pytest.mark.parametrize("name", ["weights.pt", "manifest.json"])
def test_manifest_files_that_link_out_of_the_directory_are_refused(manifest_dir, tmp_path, name):
    outside = tmp_path / f"outside-{name}"
    (manifest_dir / name).rename(outside)
    (manifest_dir / name).symlink_to(outside)
    with pytest.raises(ValueError, match=rf"{name}: refused: the manifest's .* resolves to '.*outside-{name}', outside "
                                         rf"the manifest directory"):
        load(manifest_dir, lambda: Net().double())


def test_export_never_writes_through_links_planted_in_the_output(tmp_path, compressed):
    final, x = compressed
    out = tmp_path / "m"
    out.mkdir()
    victims = {}
    for name in ("weights.pt", "manifest.json"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("precious")
        (out / name).symlink_to(victims[name])
    export(final, x, out, "manifest", model_factory=lambda: Net().double())
    for name, victim in victims.items():
        assert victim.read_text() == "precious"
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "weights.pt"]  # no temp file left
    load(out, lambda: Net().double())


def test_deeply_nested_or_huge_manifest_json_is_refused(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"manifest.json: refused: its JSON is nested too deeply"):
        read_manifest(tmp_path)
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 1000)
    (tmp_path / "manifest.json").write_text(" " * 1001)
    with pytest.raises(ValueError, match=r"manifest.json: refused: larger than 1,000 bytes"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("extra,match", [
    ({"num_classes": 10**12}, r"extra.num_classes must be an integer in \[1, 1,000,000\], got 1,000,000,000,000"),
    ({"num_classes": "10"}, r"extra.num_classes must be int, got str"),
    ({"in_channels": 0}, r"extra.in_channels must be an integer in \[1, 65,536\], got 0"),
    ({"input_shape": [1, 1, 10**7, 10**7]}, r"extra.input_shape \[1, 1, 10000000, 10000000\] has "
                                            r"100,000,000,000,000 elements, above the 67,108,864"),
    ({"input_shape": [1, 1, 0, 28]}, r"extra.input_shape must be 3 to 5 sizes >= 1"),
    ({"input_shape": "1x1x28x28"}, r"extra.input_shape must be list, got str"),
    ({"input_shape": [1, 1, 28.0, 28]}, r"extra.input_shape\[2\] must be int, got float"),
    ({"model": ["resnet20"]}, r"extra.model must be str, got list"),
], ids=["classes-huge", "classes-str", "channels-0", "shape-huge", "shape-0", "shape-str", "shape-float", "model-list"])
def test_manifest_extra_is_type_and_bound_checked(manifest_dir, extra, match):
    _edit(manifest_dir, lambda d: d.update(extra=extra))
    with pytest.raises(ValueError, match=r"invalid fxtucker manifest: " + match):
        read_manifest(manifest_dir)


def test_weights_file_with_non_tensors_is_refused(manifest_dir):
    state = torch.load(manifest_dir / "weights.pt", weights_only=True)
    _replace_weights(manifest_dir, {**state, "b.first.weight": [1, 2, 3]})  # allowed by weights_only
    with pytest.raises(ValueError, match=r"must hold a dict of name -> tensor, found 'b.first.weight': list"):
        load(manifest_dir, lambda: Net().double())


def test_weights_changed_after_export_are_refused(manifest_dir):
    state = torch.load(manifest_dir / "weights.pt", weights_only=True)
    state["b.first.weight"] = state["b.first.weight"] + 1
    torch.save(state, manifest_dir / "weights.pt")
    with pytest.raises(ValueError, match="does not match the SHA-256 recorded in the manifest"):
        load(manifest_dir, lambda: Net().double())
    (manifest_dir / "weights.pt").unlink()
    with pytest.raises(FileNotFoundError, match="names the weights file 'weights.pt', which is missing"):
        load(manifest_dir, lambda: Net().double())


def test_wrong_architecture_is_refused(manifest_dir):
    class Other(Net):
        def forward(self, x):
            return self.fc(self.p(torch.relu(self.g(self.b(self.a(x))))).mean((2, 3)))

    with pytest.raises(ValueError, match=r"the rebuilt graph differs from the exported one at node 2: the manifest "
                                         r"has \('bn_a', 'call_module', 'bn_a'\)"):
        load(manifest_dir, lambda: Other().double())
    with pytest.raises(ValueError, match=r"the manifest does not fit the model that model_factory\(\) returned: "
                                         r"ranks names \['a', 'b'"):
        load(manifest_dir, lambda: nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(TypeError, match="model_factory\\(\\) must return an nn.Module, got str"):
        load(manifest_dir, lambda: "Net")


def test_manifest_refuses_gates_and_bad_arguments(tmp_path, compressed):
    final, x = compressed
    gated = insert_gates(decompose_conv(fxtucker.trace(Net().eval())))
    with pytest.raises(ValueError, match=r"'a' still has gate node 'a_gate_in': run strip_gates"):
        export(gated, torch.randn(1, 3, 8, 8), tmp_path / "g", "manifest", model_factory=Net)
    with pytest.raises(TypeError, match="format='manifest' needs model_factory="):
        export(final, x, tmp_path / "m", "manifest")
    with pytest.raises(TypeError, match="format='manifest' needs a torch.fx.GraphModule"):
        export(Net(), x, tmp_path / "m", "manifest", model_factory=Net)
    with pytest.raises(ValueError, match="config and extra must hold JSON values only"):
        export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double(), extra={"x": object()})
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is an existing file; give a directory path"):
        export(final, x, tmp_path / "file", "manifest", model_factory=lambda: Net().double())


def test_parity_failure_manifest_and_shapes(tmp_path, compressed, monkeypatch):
    final, x = compressed
    real = EXPORT_MODULE.load
    monkeypatch.setattr(EXPORT_MODULE, "load", lambda *a, **k: nn.Sequential(real(*a, **k), nn.Dropout(0.5).train()))
    with pytest.raises(ExportError, match="reloaded manifest model does not match"):
        export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double())
    monkeypatch.setattr(EXPORT_MODULE, "load", lambda *a, **k: nn.Sequential(real(*a, **k), nn.Flatten(0)))
    with pytest.raises(ExportError, match=r"output 0 of the reloaded manifest model has shape \(20,\), the model's \(2, 10\)"):
        export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double())


PLANS = [
    {"a": "dense", "b": "tucker2", "g": "merge_first", "p": "svd", "fc": "dense"},
    {"a": "merge_first+linear", "b": "merge_last+linear", "g": "merge_last", "p": "dense+linear", "fc": "svd"},
    {"a": "tucker2+linear", "b": "merge_first", "g": "tucker2", "p": "svd+linear", "fc": "svd"},
    {"a": "merge_last", "b": "dense", "g": "dense", "p": "dense", "fc": "dense"},
]


@pytest.mark.parametrize("fold", [False, True], ids=["bn-kept", "bn-folded"])
@pytest.mark.parametrize("plan", PLANS, ids=["plan0", "plan1", "plan2", "plan3"])
def test_manifest_replays_every_form_bit_for_bit(tmp_path, plan, fold):
    """load replays decompose_conv, fold_bn and fold_or_restore(plan=the recorded forms): every form
    (dense, tucker2, merge_first, merge_last, svd, each +linear) comes back node for node, bit for bit."""
    final, x = compressed_net(fold=fold, plan=plan)
    assert {r.name: r.form for r in fxtucker.report(final).layers} == plan
    export(final, x, tmp_path / "m", "manifest", model_factory=lambda: Net().double())
    loaded = load(tmp_path / "m", lambda: Net().double())
    assert loaded.code == final.code
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in final.state_dict().items())
    torch.testing.assert_close(loaded(x), final(x), **EXACT)
    assert graph_record(loaded) == graph_record(final)
    assert [n.meta.get("fxtucker") for n in loaded.graph.nodes] == [n.meta.get("fxtucker") for n in final.graph.nodes]


class FunctionalNet(nn.Module):
    """A module conv, then two functional convs on parameters of their own (issue 16): a 3x3 one with
    stride 2 in ``block`` and a 1x1 head on the root, and a BatchNorm after the first."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Module()
        self.block.weight = nn.Parameter(torch.randn(32, 16, 3, 3) / 12)
        self.block.bias = nn.Parameter(torch.randn(32))
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Parameter(torch.randn(10, 32, 1, 1) / 6)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(F.conv2d(x, self.block.weight, self.block.bias, stride=2, padding=1)))
        return F.conv2d(x, self.head).mean((2, 3))


@pytest.mark.parametrize("form", ["tucker2", "dense", "merge_last"])
def test_functional_convs_round_trip(tmp_path, form):
    torch.manual_seed(0)
    model = randomize_bn(FunctionalNet()).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    gm = cost_model(fxtucker.trace(model), x)
    gated = insert_gates(decompose_conv(gm, ranks={"block.conv2d": (8, 16), "conv2d_1": 6}))
    with torch.no_grad():
        gated.get_submodule("block.conv2d.gate_in").weight[:2] = 0.0
    final = fold_bn(fold_or_restore(strip_gates(gated, 1e-6), plan={"block.conv2d": form, "conv2d_1": "svd"}))
    layers = {r.name: r for r in fxtucker.report(final).layers}
    assert layers["block.conv2d"].ranks == (6, 16) and layers["block.conv2d"].functional
    assert "block.weight" not in final.state_dict() and "head" not in final.state_dict()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in final.modules())  # folded into the functional layer
    export(final, x, tmp_path / "m", "manifest", model_factory=lambda: FunctionalNet().double())
    loaded = load(tmp_path / "m", lambda: FunctionalNet().double())
    assert torch.equal(loaded(x), final(x))
    assert loaded.code == final.code and graph_record(loaded) == graph_record(final)
    assert str(fxtucker.report(loaded)) == str(fxtucker.report(final))


def test_compress_a_model_with_functional_convs_to_a_mac_budget_and_reload(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = FunctionalNet().eval()
    with torch.no_grad():
        data = torch.randn(128, 3, 8, 8)
        labels = model(data).argmax(1)
    loader = DataLoader(TensorDataset(data, labels), batch_size=32)
    config = fxtucker.CompressConfig(train_epochs=0, reg_epochs=1, finetune_epochs=0, reg_weight=0.01,
                                     target_speedup=2.0)
    result = compress(model, loader, data[:1], config=config, progress=False)
    assert result.report["macs_after"] <= result.report["target_macs"] == int(result.report["macs_before"] / 2.0)
    # the functional convs' MACs are counted before and after, and they were decomposed like modules
    assert result.report["macs_before"] == fxtucker.count_macs(model, data[:1])
    assert result.report["macs_after"] == fxtucker.count_macs(result.model, data[:1])
    layers = {r["name"]: r for r in result.report["layers"]}
    assert {"block.conv2d", "conv2d_1"} <= set(layers)
    assert all(layers[n]["decision"] in ("decomposed", "restored") for n in ("block.conv2d", "conv2d_1"))
    assert not any(n.op == "get_attr" for n in result.model.graph.nodes)
    export(result.model, data[:1], tmp_path / "m", "manifest", model_factory=FunctionalNet)
    loaded = load(tmp_path / "m", FunctionalNet)
    assert torch.equal(loaded(data), result.model.eval()(data))
