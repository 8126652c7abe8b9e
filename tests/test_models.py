"""Tests for fxtucker.models: CIFAR models, torchvision models by name, checkpoints, errors."""

import operator

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

from fxtucker.models import CIFAR_MODELS, CifarResNet, get_model, list_models
from tests.conftest import EXACT

CIFAR_NAMES = ["resnet20", "resnet32", "resnet56", "vgg_small", "mobilenet_v2_cifar"]


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _conv_macs(model, x):
    """Multiply-accumulates of every Conv2d and Linear for input ``x`` (bias excluded)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total += out.numel() * k
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def test_cifar_registry():
    assert sorted(CIFAR_MODELS) == sorted(CIFAR_NAMES)


@pytest.mark.parametrize("name", CIFAR_NAMES)
@pytest.mark.parametrize("shape, num_classes", [((2, 1, 28, 28), 10), ((2, 3, 32, 32), 100)])
def test_cifar_model_forward(name, shape, num_classes):
    torch.manual_seed(0)
    model = get_model(name, num_classes=num_classes, in_channels=shape[1]).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_model_symbolic_trace_matches_eager(name):
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, in_channels=1).eval()
    gm = torch.fx.symbolic_trace(model)
    gm.graph.lint()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), **EXACT)
    # Only modules, add and flatten (and torchvision's functional pool): nothing like option A's
    # slice-and-pad shortcut.
    functions = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert functions <= {torch.flatten, operator.add, nn.functional.adaptive_avg_pool2d}


def test_mobilenet_v2_cifar_downsamples_8x_with_depthwise_convs():
    model = get_model("mobilenet_v2_cifar", num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        features = model.features(torch.randn(2, 1, 28, 28))
    assert features.shape == (2, 1280, 4, 4)  # torchvision's mobilenet_v2 ends on 1x1 here
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 17 and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert model.features[0][0].in_channels == 1
    assert _conv_macs(model, torch.randn(1, 1, 28, 28)) == pytest.approx(12.4e6, rel=0.01)


def test_resnet_depths_and_names():
    for name, n in [("resnet20", 3), ("resnet32", 5), ("resnet56", 9)]:
        model = get_model(name)
        assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        # 6n + 1 3x3 convs (the stem and two per block) plus two 1x1 option-B shortcuts.
        assert sum(c.kernel_size == (3, 3) for c in convs) == 6 * n + 1
        assert sum(c.kernel_size == (1, 1) for c in convs) == 2
    model = get_model("resnet20")
    names = dict(model.named_modules())
    assert isinstance(names["layer1.0.conv1"], nn.Conv2d)
    assert isinstance(names["layer2.0.downsample.0"], nn.Conv2d)
    assert names["layer2.0.downsample.0"].stride == (2, 2)
    assert [names[f"layer{i}.0.conv2"].out_channels for i in (1, 2, 3)] == [16, 32, 64]
    assert model.layer1[0].downsample is None and model.layer2[1].downsample is None


def test_resnet20_parameter_count():
    n = _n_params(get_model("resnet20", num_classes=10, in_channels=3))
    # Option A (zero-padded identity shortcuts) has 269,722; option B adds two 1x1 conv + BN.
    assert n == 272_474


def test_parameter_counts_grow_with_depth():
    counts = [_n_params(get_model(n)) for n in ("resnet20", "resnet32", "resnet56")]
    assert counts == [272_474, 466_906, 855_770]


def test_vgg_small_cost():
    model = get_model("vgg_small").eval()
    macs = _conv_macs(model, torch.randn(1, 3, 32, 32))
    # 3x3 convs with padding 1, 64-64 at 32x32, a 2x2 pool, 128-128 at 16x16, a pool, 256-256 at 8x8;
    # then a global pool and a 256-to-10 linear layer
    convs = [(3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8)]
    assert macs == sum(9 * c_in * c_out * side * side for c_in, c_out, side in convs) + 256 * 10 == 152_766_976
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6


def test_cifar_resnet_bad_depth():
    with pytest.raises(ValueError, match=r"depth must be 6n \+ 2 with n >= 1 .*got 21"):
        CifarResNet(21)


def test_name_is_case_insensitive():
    assert isinstance(get_model("ResNet20"), CifarResNet)


def test_torchvision_resnet18_one_channel():
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=7, in_channels=1).eval()
    assert isinstance(model, torchvision.models.ResNet)
    conv = model.conv1
    reference = torchvision.models.resnet18(weights=None).conv1
    assert conv.in_channels == 1
    for attr in ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(conv, attr) == getattr(reference, attr), attr
    assert (conv.bias is None) == (reference.bias is None)
    assert model.fc.out_features == 7
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)


def test_torchvision_first_conv_keeps_bias_and_stride():
    # squeezenet's first conv has a bias and stride 2; both must survive the rebuild.
    model = get_model("squeezenet1_1", num_classes=3, in_channels=2)
    conv = model.features[0]
    assert conv.in_channels == 2 and conv.bias is not None and conv.stride == (2, 2)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 2, 64, 64)).shape == (1, 3)


def test_torchvision_three_channels_untouched():
    model = get_model("mobilenet_v3_small", num_classes=4)
    assert model.features[0][0].in_channels == 3
    assert model.classifier[-1].out_features == 4


def test_list_models():
    names = list_models()
    assert names == sorted(names)
    assert set(CIFAR_NAMES) <= set(names)
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", CIFAR_NAMES + ["resnet18"])
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(0)
    source = get_model(name, num_classes=5, in_channels=1)
    # Make the BN running statistics non-trivial so that buffers are checked too.
    with torch.no_grad():
        source.train()(torch.randn(4, 1, 32, 32))
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    loaded = get_model(name, num_classes=5, in_channels=1, checkpoint=path)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), source.eval()(x), **EXACT)


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_checkpoint_wrapped_in_dict(tmp_path, key):
    source = get_model("resnet20")
    path = tmp_path / "ckpt.pth"
    torch.save({key: source.state_dict(), "epoch": 3}, str(path))
    loaded = get_model("resnet20", checkpoint=str(path))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=r"checkpoint file '.*nope\.pt' does not exist"):
        get_model("resnet20", checkpoint=path)


def test_checkpoint_wrong_keys(tmp_path):
    path = tmp_path / "vgg.pt"
    torch.save(get_model("vgg_small").state_dict(), path)
    with pytest.raises(
        ValueError,
        match=r"checkpoint '.*vgg\.pt' does not match the model: \d+ missing keys "
        r"\['bn1\.bias', .* and \d+ more\], \d+ unexpected keys \['classifier\.bias', ",
    ):
        get_model("resnet20", checkpoint=path)


def test_checkpoint_data_parallel_hint(tmp_path):
    path = tmp_path / "dp.pt"
    state = {f"module.{k}": v for k, v in get_model("resnet20").state_dict().items()}
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"every key starts with 'module\.'"):
        get_model("resnet20", checkpoint=path)


def test_checkpoint_wrong_shapes(tmp_path):
    path = tmp_path / "c100.pt"
    torch.save(get_model("resnet20", num_classes=100).state_dict(), path)
    with pytest.raises(
        ValueError,
        match=r"has 2 tensors whose shape differs from the model: 'fc\.bias': checkpoint "
        r"\(100,\) vs model \(10,\), 'fc\.weight'.*check num_classes",
    ):
        get_model("resnet20", num_classes=10, checkpoint=path)


def test_checkpoint_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"holds a list that is not a state_dict"):
        get_model("resnet20", checkpoint=path)


def test_checkpoint_full_module_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(get_model("resnet20"), path)
    with pytest.raises(ValueError, match=r"could not load checkpoint '.*module\.pt' with "
                       r"torch\.load\(weights_only=True\)"):
        get_model("resnet20", checkpoint=path)


def test_unknown_name():
    with pytest.raises(
        ValueError,
        match=r"unknown model 'resnet2O' \(close matches: .*'resnet20'.*\); list_models\(\) "
        r"lists all \d+ valid names",
    ):
        get_model("resnet2O")


def test_unknown_name_without_close_match():
    with pytest.raises(ValueError, match=r"unknown model 'zzz'; list_models\(\) lists all"):
        get_model("zzz")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"num_classes": 0}, r"num_classes must be an integer >= 1, got 0"),
        ({"in_channels": 2.0}, r"in_channels must be an integer >= 1, got 2.0"),
    ],
)
def test_bad_counts(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_model("resnet20", **kwargs)


def test_first_conv_groups_must_divide_in_channels(monkeypatch):
    # No torchvision classifier has a grouped first conv, so build one to reach the check.
    class Grouped(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, groups=3)

    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kw: Grouped())
    with pytest.raises(ValueError, match=r"first conv 'stem' has groups=3, which does not divide "
                       r"in_channels=1; use a multiple of 3"):
        get_model("resnet18", in_channels=1)



TORCHVISION_NAMES = torchvision.models.list_models(module=torchvision.models)
# One small model per family runs by default; the rest of the sweep is marked slow.
TORCHVISION_FAST = {
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
    "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small",
    "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5",
    "squeezenet1_0", "swin_t", "swin_v2_t", "vgg11", "vit_b_32", "wide_resnet50_2",
}


def test_fast_sweep_names_exist():
    assert TORCHVISION_FAST <= set(TORCHVISION_NAMES)


def _one_channel_model_on_meta(name):
    """get_model(name, in_channels=1) with meta tensors: shapes are checked, nothing computed."""
    if name.startswith("regnet"):
        # RegNet's constructor reads tensor values to compute its widths, so it cannot be
        # built on the meta device.
        return get_model(name, num_classes=5, in_channels=1).to("meta")
    with torch.device("meta"):
        return get_model(name, num_classes=5, in_channels=1)


@pytest.mark.filterwarnings("ignore:The default weight initialization of:FutureWarning")
@pytest.mark.parametrize(
    "name",
    [n if n in TORCHVISION_FAST else pytest.param(n, marks=pytest.mark.slow)
     for n in TORCHVISION_NAMES],
)
def test_every_torchvision_model_takes_one_channel(name):
    model = _one_channel_model_on_meta(name).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    size = 299 if name == "inception_v3" else 224
    with torch.no_grad():
        out = model(torch.empty(1, 1, size, size, device="meta"))
    assert out.shape == (1, 5)
