"""fold_bn: conv + eval-mode BatchNorm folded into one conv, the function kept, the rest left alone."""

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtucker
from fxtucker.meta import BatchNormRecord, FactorRecord, FoldRecord, graph_record
from fxtucker.passes import cost_model, decompose_conv, fold_bn, fold_or_restore, insert_gates, strip_gates
from tests.conftest import EXACT, REL_FLOAT64, REL_FOLD_FLOAT32, rel_error
from tests.strategies import conv_and_input

BN = nn.modules.batchnorm._BatchNorm


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters, so that a wrong fold shows."""
    for m in model.modules():
        if isinstance(m, BN) and m.track_running_stats:
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.3, 3.0)
        if isinstance(m, BN) and m.affine:
            m.weight.data.normal_(1, 0.5)
            m.bias.data.normal_(0, 0.5)
    return model


def _count_bn(gm: nn.Module) -> int:
    return sum(isinstance(m, BN) for m in gm.modules()) + sum(
        1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), BN))


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, REL_FLOAT64), (torch.float32, REL_FOLD_FLOAT32)])
def test_resnet18_every_bn_folded_function_kept(dtype, tol):
    model = _randomize_bn(torchvision.models.resnet18(num_classes=10)).to(dtype).eval()
    x = torch.randn(2, 3, 48, 48, dtype=dtype)
    gm = fxtucker.trace(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every BN of resnet18 follows a conv: no summary warning
        folded = fold_bn(gm)
    folded.graph.lint()
    assert _count_bn(gm) == 40 and _count_bn(folded) == 0  # 20 modules, 20 calls
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) < tol
    # Conv nodes keep their names; exactly the BN nodes are gone.
    bn_names = {n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), BN)}
    assert [n.name for n in folded.graph.nodes] == [n.name for n in gm.graph.nodes if n.name not in bn_names]
    recs = graph_record(folded).batchnorms
    assert len(recs) == 20 and all(r.folded for r in recs)
    assert recs[0] == BatchNormRecord(name="bn1", node="bn1", conv="conv1", folded=True, reason="folded into 'conv1'")
    assert folded.get_submodule("layer2.0.downsample.0").bias is not None
    assert "layer2.0.downsample.1" not in dict(folded.named_modules())
    # The input module is untouched (a copy was rewritten).
    assert _count_bn(gm) == 40 and gm.conv1.bias is None


def _chain(model, x, ranks, prune=()):
    """The whole chain, with the input gates of the layers in ``prune`` half zeroed (as training might)."""
    gm = cost_model(fxtucker.trace(model), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decompose_conv's note on skipped layers
        gated = insert_gates(decompose_conv(gm, ranks=ranks))
    with torch.no_grad():
        for name in prune:
            g = gated.get_submodule(f"{name}.gate_in").weight
            g[: g.numel() // 2] = 0.0
    return fold_or_restore(strip_gates(gated, 1e-6), x)


class SmallNet(nn.Module):
    """conv-BN pairs: one that stays decomposed, one that is restored, a grouped one, a 1x1 one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(32)
        self.g = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
        self.bn_g = nn.BatchNorm2d(32, affine=False)
        self.p = nn.Conv2d(32, 16, 1)
        self.bn_p = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        x = torch.relu(self.bn_g(self.g(x)))
        x = self.bn_p(self.p(x))
        return self.fc(x.mean((2, 3)))


def test_after_the_whole_chain_with_pruning():
    model = _randomize_bn(SmallNet()).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    final = _chain(model, x, ranks={"a": (3, 27), "b": (6, 6), "g": (8, 8), "p": 12}, prune=("b", "g", "p"))
    layers = {r.name: r for r in fxtucker.report(final).layers}
    assert layers["a"].decision == "restored" and layers["b"].decision == "decomposed"  # both kinds are covered
    assert layers["b"].ranks == (3, 6) and layers["p"].ranks == (6,)  # components were pruned
    before = final(x)
    folded = fold_bn(final)
    folded.graph.lint()
    assert _count_bn(folded) == 0
    assert rel_error(folded(x), before) < REL_FLOAT64
    # The BN went into the decomposed layer's last factor and into the restored conv.
    recs = {r.name: r for r in graph_record(folded).batchnorms}
    assert recs["bn_b"].conv == "b.last" and recs["bn_a"].conv == "a"
    assert isinstance(folded.get_submodule("b.last"), nn.Conv2d) and folded.get_submodule("b.last").bias is not None
    # Records stay consistent: node records kept, specs say the layers now have a bias, the
    # cost model runs, MACs (bias excluded) unchanged, the report still prints.
    node = next(n for n in folded.graph.nodes if n.name == "a")
    assert isinstance(node.meta["fxtucker"], FoldRecord)
    last = next(n for n in folded.graph.nodes if n.target == "b.last")
    assert isinstance(last.meta["fxtucker"], FactorRecord) and last.meta["fxtucker"].decision == "decomposed"
    assert all(r.spec.bias for r in fxtucker.report(folded).layers)
    assert graph_record(folded).stage == "fold_bn"
    assert fxtucker.count_macs(folded, x) == fxtucker.count_macs(final, x)
    assert last.meta["params"] == sum(p.numel() for p in folded.get_submodule("b.last").parameters())
    assert "bn_b" not in str(cost_model(folded, x).graph)
    assert "decomposed" in str(fxtucker.report(folded))


def test_after_the_chain_on_resnet18_with_components_pruned():
    torch.manual_seed(0)
    model = _randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    final = _chain(model, x, ranks=0.5, prune=("layer3.0.conv2",))
    assert fxtucker.report(final).layers  # the chain ran
    assert graph_record(final).layer("layer3.0.conv2").ranks[0] == 64  # of 128 at ranks=0.5
    with torch.no_grad():
        before = final(x)
    folded = fold_bn(final)
    assert _count_bn(folded) == 0
    with torch.no_grad():
        assert rel_error(folded(x), before) < REL_FOLD_FLOAT32


def test_fold_before_fold_or_restore_keeps_the_restore_exact():
    model = _randomize_bn(ConvBN(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))).double().eval()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    decomposed = decompose_conv(cost_model(fxtucker.trace(model), x))  # full rank: restored later
    folded = fold_bn(decomposed)
    assert fxtucker.report(folded).layers[0].spec.bias  # the rebuilt dense conv needs the bias
    final = fold_or_restore(folded, x)
    assert fxtucker.report(final).layers[0].decision == "restored" and final.conv.bias is not None
    assert rel_error(final(x), model(x)) < REL_FLOAT64


@pytest.mark.parametrize("conv,bn,shape", [
    (nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6, affine=False), (2, 4, 7, 7)),
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, affine=False), (2, 4, 7, 7)),
    (nn.Conv2d(6, 9, 3, padding=1, groups=3), nn.BatchNorm2d(9), (2, 6, 5, 5)),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6), (2, 6, 5, 5)),  # depthwise
    (nn.Conv1d(3, 5, 3, stride=2, bias=False), nn.BatchNorm1d(5), (2, 3, 11)),
    (nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1), padding_mode="reflect"), nn.BatchNorm3d(4, eps=1e-3), (1, 2, 3, 5, 5)),
], ids=["bias", "no-bias", "bias-bn-not-affine", "no-bias-bn-not-affine", "grouped", "depthwise", "conv1d", "conv3d"])
def test_odd_cases_folded_exactly(conv, bn, shape):
    model = _randomize_bn(ConvBN(conv, bn)).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    folded = fold_bn(fxtucker.trace(model))
    assert _count_bn(folded) == 0 and folded.conv.bias is not None
    assert folded.conv.groups == conv.groups and folded.conv.padding_mode == conv.padding_mode
    assert rel_error(folded(x), model(x)) < REL_FLOAT64


@given(conv_and_input(dtype=torch.float64, allow_depthwise=True), st.booleans())
@settings(max_examples=30, deadline=None)
def test_any_conv_configuration(case, affine):
    conv, x = case
    bn = getattr(nn, f"BatchNorm{conv.weight.dim() - 2}d")(conv.out_channels, affine=affine).double()
    model = _randomize_bn(ConvBN(conv, bn)).eval()
    folded = fold_bn(fxtucker.trace(model))
    assert _count_bn(folded) == 0
    assert rel_error(folded(x), model(x)) < REL_FLOAT64


def test_float32_within_tolerance_and_stays_float32():
    model = _randomize_bn(ConvBN(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16))).eval()
    x = torch.randn(2, 8, 9, 9)
    folded = fold_bn(fxtucker.trace(model))
    assert folded.conv.weight.dtype == torch.float32 and folded.conv.bias.dtype == torch.float32
    assert rel_error(folded(x), model(x)) < REL_FOLD_FLOAT32


def test_folded_parameters_stay_trainable():
    model = _randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    folded = fold_bn(fxtucker.trace(model))
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in folded.conv.parameters())
    folded(torch.randn(1, 3, 6, 6)).sum().backward()
    assert folded.conv.bias.grad is not None
    model.conv.weight.requires_grad_(False)
    frozen = fold_bn(fxtucker.trace(model))
    assert not frozen.conv.weight.requires_grad  # a frozen conv stays frozen


def test_two_batchnorms_in_a_row_and_a_shared_batchnorm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 1)
            self.bn, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn2(self.bn(self.c1(x))).mean() + self.bn(self.c2(x)).mean()

    model = _randomize_bn(Net()).double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    folded = fold_bn(fxtucker.trace(model))
    assert _count_bn(folded) == 0
    assert [(r.name, r.conv) for r in graph_record(folded).batchnorms] == [("bn", "c1"), ("bn2", "c1"), ("bn", "c2")]
    assert rel_error(folded(x), model(x)) < REL_FLOAT64


class AfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class NoStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


class AfterLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


class AfterFunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.bn = nn.Parameter(torch.randn(4, 3, 3, 3)), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.nn.functional.conv2d(x, self.w))


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


@pytest.mark.parametrize("model,shape,match", [
    (AfterRelu(), (1, 3, 6, 6), r"its input is relu\(\) \(node 'relu'\), not the output of an nn.Conv1d/2d/3d module"),
    (TwoUsers(), (1, 3, 6, 6), r"the output of 'conv' has 2 users \(add, bn\); folding would change what the others see"),
    (CalledTwice(), (1, 4, 6, 6), r"the conv 'conv' is called at 2 places"),
    (NoStats(), (2, 3, 6, 6), r"keeps no running statistics \(track_running_stats=False\)"),
    (AfterLinear(), (2, 3), r"its input is Linear 'fc', not the output of an nn.Conv1d/2d/3d module"),
    (AfterFunctionalConv(), (1, 3, 6, 6), r"its input is conv2d\(\)"),
    (ReadsWeight(), (1, 3, 6, 6), r"the parameters of 'conv' are also read directly \(conv.weight\)"),
], ids=["after-relu", "two-users", "called-twice", "no-running-stats", "after-linear", "functional-conv", "weight-read"])
def test_unfoldable_batchnorm_left_alone_with_a_reason(model, shape, match):
    model = _randomize_bn(model).double().eval()
    x = torch.randn(*shape, dtype=torch.float64)
    gm = fxtucker.trace(model)
    with pytest.warns(UserWarning, match=r"fold_bn left 1 BatchNorm layer\(s\) as they are"):
        out = fold_bn(gm)
    assert out.code == gm.code  # nothing rewritten
    (rec,) = graph_record(out).batchnorms
    assert not rec.folded and rec.name == "bn" and rec.conv == ""
    assert re.search(match, rec.reason), rec.reason
    torch.testing.assert_close(out(x), model(x), **EXACT)


def test_gated_layer_is_skipped_until_gates_are_stripped():
    model = _randomize_bn(ConvBN(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6))).double().eval()
    gated = insert_gates(decompose_conv(fxtucker.trace(model)))
    with pytest.warns(UserWarning, match="fold_bn left 1"):
        kept = fold_bn(gated)
    assert "parametrized" in graph_record(kept).batchnorms[0].reason
    assert "strip_gates" in graph_record(kept).batchnorms[0].reason
    assert _count_bn(fold_bn(strip_gates(gated, 0.0))) == 0


def test_training_mode_raises():
    model = ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match=r"fold_bn: BatchNorm 'bn' \(node 'bn'\) is in training mode.*call model.eval\(\)"):
        fold_bn(fxtucker.trace(model))
    # A training-mode BN that could not be folded anyway is skipped, not an error.
    with pytest.warns(UserWarning, match="fold_bn left 1"):
        fold_bn(fxtucker.trace(AfterRelu().train()))


def test_inplace_and_type_errors():
    model = ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    gm = fxtucker.trace(model)
    assert fold_bn(gm, inplace=True) is gm and _count_bn(gm) == 0
    with pytest.raises(TypeError, match="fold_bn expects a torch.fx.GraphModule, got ConvBN"):
        fold_bn(model)


def test_second_run_keeps_earlier_folds_on_record():
    model = _randomize_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    once = fold_bn(fxtucker.trace(model))
    twice = fold_bn(once)
    assert twice.code == once.code
    assert graph_record(twice).batchnorms == graph_record(once).batchnorms


def test_later_passes_keep_the_folds_on_record():
    model = _randomize_bn(ConvBN(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    folded = fold_bn(fxtucker.trace(model))
    x = torch.randn(1, 3, 8, 8)
    decomposed = decompose_conv(cost_model(folded, x), 0.5)  # plan_decomposition writes a new layer record
    assert graph_record(decomposed).stage == "decompose_conv" and graph_record(decomposed).layers
    assert graph_record(decomposed).batchnorms == graph_record(folded).batchnorms != ()
    # A BatchNorm left alone is not: its reason may no longer hold (a functional conv becomes modules)
    model = _randomize_bn(AfterFunctionalConv()).eval()
    with pytest.warns(UserWarning, match=r"fold_bn left 1 BatchNorm"):
        left = fold_bn(fxtucker.trace(model))
    assert [r.folded for r in graph_record(left).batchnorms] == [False]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decomposed = decompose_conv(cost_model(left, x), 0.5)
    assert graph_record(decomposed).batchnorms == ()


def test_fold_only_the_named_nodes():
    model = _randomize_bn(SmallNet()).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    gm = fxtucker.trace(model)
    some = fold_bn(gm, nodes=["bn_b", "bn_p"])
    assert [n.name for n in some.graph.nodes if n.name.startswith("bn_")] == ["bn_a", "bn_g"]
    assert [(r.name, r.folded) for r in graph_record(some).batchnorms] == [("bn_b", True), ("bn_p", True)]
    assert rel_error(some(x), model(x)) < REL_FLOAT64
    rest = fold_bn(some)  # the others later; the earlier folds stay on record
    assert _count_bn(rest) == 0 and len(graph_record(rest).batchnorms) == 4
    with pytest.raises(ValueError, match=r"fold_bn: nodes names \['relu'\], which are not BatchNorm calls in the "
                                         r"graph; BatchNorm nodes: \['bn_a', 'bn_b', 'bn_g', 'bn_p'\]"):
        fold_bn(gm, nodes=["relu"])
    with pytest.raises(TypeError, match="nodes must be a collection of graph node names, got 'bn_a'"):
        fold_bn(gm, nodes="bn_a")


@pytest.mark.parametrize("name,folded,left", [
    ("mobilenet_v3_small", 34, 0),  # depthwise convs, SE blocks, Hardswish
    ("efficientnet_b0", 49, 0),
    ("regnet_x_400mf", 71, 0),  # grouped convs
    ("googlenet", 57, 0),
    ("densenet121", 59, 62),  # norm1 of each dense layer follows a concat
])
def test_torchvision_models(name, folded, left):
    kw = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = _randomize_bn(torchvision.models.get_model(name, num_classes=10, **kw)).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fold_bn(fxtucker.trace(model))
    recs = graph_record(out).batchnorms
    assert (sum(r.folded for r in recs), sum(not r.folded for r in recs)) == (folded, left)
    assert all(r.reason.startswith("its input is cat()") for r in recs if not r.folded)
    assert len(caught) == (1 if left else 0)
    with torch.no_grad():
        assert rel_error(out(x), model(x)) < REL_FLOAT64
