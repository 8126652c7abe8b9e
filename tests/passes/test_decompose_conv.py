"""decompose_conv: structure, names, records, numerics, rank arguments, skips and errors."""

import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings

import fxtucker
from fxtucker.meta import FactorRecord, LayerPlan
from fxtucker.passes import decompose_conv, plan_decomposition
from fxtucker.passes.fold_or_restore import dense_module
from fxtucker.passes.plan_decomposition import conv_spec
from tests.conftest import EXACT, REL_FLOAT64, factor_roles, reference, rel_error
from tests.strategies import OneConv, conv_and_input


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.pw = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(self.pw(x).mean((2, 3)))


@given(conv_and_input())
@settings(max_examples=60, deadline=None)
def test_full_rank_preserves_function_float64(case):
    conv, x = case
    model = OneConv(conv).eval()
    ref = reference(model)
    gm = decompose_conv(fxtucker.trace(model))
    gm.graph.lint()
    assert rel_error(gm(x), ref(x)) < REL_FLOAT64
    roles = [r for _, r in factor_roles(gm)]
    assert roles == (["first", "last"] if conv.kernel_size == (1,) * len(conv.kernel_size) else ["first", "core", "last"]) * 2


@given(conv_and_input(dtype=torch.float32))
@settings(max_examples=30, deadline=None)
def test_full_rank_preserves_function_float32(case):
    conv, x = case
    model = OneConv(conv).eval()
    ref = reference(model)
    assert rel_error(decompose_conv(fxtucker.trace(model))(x), ref(x)) < 1e-5


def test_names_and_graph_of_a_small_cnn():
    gm = decompose_conv(fxtucker.trace(Small()), linear=True)
    assert factor_roles(gm) == [
        ("conv1_first", "first"), ("conv1_core", "core"), ("conv1_last", "last"),
        ("conv2_first", "first"), ("conv2_core", "core"), ("conv2_last", "last"),
        ("pw_first", "first"), ("pw_last", "last"), ("fc_first", "first"), ("fc_last", "last"),
    ]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"][:3] == ["conv1.first", "conv1.core", "conv1.last"]
    assert "conv1_core" in str(gm.graph)
    core, first, last = gm.get_submodule("conv2.core"), gm.get_submodule("conv2.first"), gm.get_submodule("conv2.last")
    assert (first.kernel_size, first.stride, first.bias) == ((1, 1), (1, 1), None)
    assert (core.kernel_size, core.stride, core.padding, core.bias) == ((3, 3), (2, 2), (1, 1), None)
    assert last.bias is None and gm.get_submodule("conv1.last").bias is not None
    # a 1x1 pair takes stride/padding on its first factor
    assert type(gm.get_submodule("pw.first")) is nn.Conv2d and type(gm.get_submodule("fc.first")) is nn.Linear


def test_records_and_stack_traces():
    gm = fxtucker.trace(Small())
    d = decompose_conv(gm)
    first = next(n for n in d.graph.nodes if n.name == "conv2_first")
    assert first.meta["fxtucker"] == FactorRecord(source="conv2", role="first", ranks=(8, 16), replaces="conv2")
    layer = fxtucker.report(d).layers[1]
    assert (layer.name, layer.kind, layer.full_ranks, layer.ranks, layer.decision) == ("conv2", "tucker2", (8, 16), (8, 16), "decomposed")
    assert layer.spec.stride == (2, 2) and layer.spec.bias is False
    # the input gm is untouched unless inplace=True
    assert "conv1" in dict(gm.named_modules()) and isinstance(gm.conv1, nn.Conv2d)
    d2 = decompose_conv(gm, inplace=True)
    assert d2 is gm and isinstance(gm.get_submodule("conv1.first"), nn.Conv2d)


def test_truncated_kernel_is_the_hosvd_truncation():
    conv = nn.Conv2d(6, 10, 3, padding=1, groups=2).double()
    gm = decompose_conv(fxtucker.trace(OneConv(conv)), ranks={"conv": (2, 3)})
    rec = fxtucker.report(gm).layers[0]
    kernel = dense_module(gm.get_submodule("conv"), rec.spec).weight.detach().numpy()
    w = conv.weight.detach().numpy()
    for g in range(2):
        wg = w[5 * g:5 * (g + 1)]
        u_out = np.linalg.svd(wg.reshape(5, -1))[0][:, :3]
        u_in = np.linalg.svd(np.moveaxis(wg, 1, 0).reshape(3, -1))[0][:, :2]
        expected = np.einsum("oi...,po,qi->pq...", wg, u_out @ u_out.T, u_in @ u_in.T)
        np.testing.assert_allclose(kernel[5 * g:5 * (g + 1)], expected, atol=1e-10)


def test_plan_can_be_edited_before_the_rewrite():
    gm = plan_decomposition(fxtucker.trace(Small()), ranks=None)
    node = next(n for n in gm.graph.nodes if n.name == "conv2")
    assert node.meta["fxtucker"] == LayerPlan(source="conv2", kind="tucker2", full_ranks=(8, 16), ranks=(8, 16))
    assert isinstance(gm.conv2, nn.Conv2d)  # nothing rewritten yet
    node.meta["fxtucker"] = dataclasses.replace(node.meta["fxtucker"], ranks=(2, 3))
    d = decompose_conv(gm, use_plan=True)
    assert d.get_submodule("conv2.core").weight.shape == (3, 2, 3, 3)
    node.meta["fxtucker"] = dataclasses.replace(node.meta["fxtucker"], ranks=(99, 3))
    with pytest.raises(ValueError, match=r"ranks \(99, 3\) for 'conv2' out of range: valid are 1 <= R1 <= 8"):
        decompose_conv(gm, use_plan=True)
    with pytest.raises(ValueError, match=r"run plan_decomposition\(gm, ranks\) first"):
        decompose_conv(fxtucker.trace(Small()), use_plan=True)


class Tricky(nn.Module):
    """Every kind of conv use that must be skipped or handled, never rewritten wrongly."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 3, padding=1)  # called twice
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.tied_a = nn.Conv2d(4, 4, 1)
        self.tied_b = nn.Conv2d(4, 4, 1)
        self.tied_b.weight = self.tied_a.weight
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.hooked = nn.Conv2d(4, 4, 1)
        self.hooked.register_forward_hook(lambda m, i, o: o * 2)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 1))
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x):
        x = self.shared(self.shared(x))
        x = self.dw(x) + self.tied_a(x) + self.tied_b(x)
        x = self.hooked(self.wn(x))
        return F.conv2d(self.up(x), self.w, padding=1)


def test_skips_carry_reasons_and_function_is_kept():
    model = Tricky().double().eval()
    ref = reference(model)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"decompose_conv left 6 layer\(s\) as they are: .*2 x its weight is shared with another module \(e.g. 'tied_a'\)"):
        gm = decompose_conv(fxtucker.trace(model))
    assert rel_error(gm(x), ref(x)) < REL_FLOAT64
    reasons = {l.name: (l.decision, l.reason) for l in fxtucker.report(gm).layers}
    assert reasons["shared"] == ("decomposed", "")
    layers = fxtucker.report(gm).layers
    assert [l.name for l in layers] == ["shared", "dw", "tied_a", "tied_b", "wn", "hooked", "up", "conv2d"]
    assert layers[0].call_sites == 2
    assert "one input channel per group" in reasons["dw"][1]
    assert "shared with another module (tied_b.weight)" in reasons["tied_a"][1]
    assert "shared with another module (tied_a.weight)" in reasons["tied_b"][1]
    assert "transposed" in reasons["up"][1]
    assert "hooks" in reasons["hooked"][1]
    assert "parametrized" in reasons["wn"][1]
    # a functional conv on a parameter read only there is a layer like the others
    assert reasons["conv2d"][0] == "decomposed" and "became module 'conv2d'" in reasons["conv2d"][1]
    # both call sites of the shared conv use one set of factors
    assert [n.name for n in gm.graph.nodes if n.target == "shared.first"] == ["shared_first", "shared_first_1"]


def test_conv_subclass_with_own_forward_is_skipped():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = OneConv(Scaled(3, 4, 3)).eval()
    x = torch.randn(1, 3, 5, 5)
    # traced through, its forward becomes two functional conv2d calls on the same parameters, which
    # are skipped: decomposing one would take the weight from the other
    with pytest.warns(UserWarning, match=r"left 2 layer\(s\) as they are: 2 x its weight is also read by other nodes"):
        gm = decompose_conv(fxtucker.trace(model))
    torch.testing.assert_close(gm(x), model(x), **EXACT)
    # kept as a leaf, it is one call_module node, skipped because of its own forward
    with pytest.warns(UserWarning, match="left 1 layer"):
        gm = decompose_conv(fxtucker.trace(model, leaf_modules=[Scaled]))
    assert "Scaled subclasses Conv2d with its own forward" in fxtucker.report(gm).layers[0].reason
    torch.testing.assert_close(gm(x), model(x), **EXACT)


def test_half_precision_is_decomposed_in_float32_and_cast_back():
    model = OneConv(nn.Conv2d(4, 6, 3)).to(torch.bfloat16).eval()
    gm = decompose_conv(fxtucker.trace(model))
    assert gm.get_submodule("conv.core").weight.dtype == torch.bfloat16
    x = torch.randn(1, 4, 6, 6, dtype=torch.bfloat16)
    assert rel_error(gm(x).float(), model(x).float()) < 2e-2


def test_unbatched_input_and_1d_3d():
    for conv, x in [(nn.Conv1d(3, 5, 3), torch.randn(3, 9)), (nn.Conv3d(2, 4, (1, 2, 3)), torch.randn(1, 2, 4, 4, 4))]:
        model = OneConv(conv.double()).eval()
        gm = decompose_conv(fxtucker.trace(model))
        assert rel_error(gm(x.double()), model(x.double())) < REL_FLOAT64


def test_not_a_graph_module():
    with pytest.raises(TypeError, match=r"decompose_conv expects a torch.fx.GraphModule, got Small; trace the model first"):
        decompose_conv(Small())


def test_resnet18_decomposes_every_conv():
    model = torchvision.models.resnet18().eval()
    gm = decompose_conv(fxtucker.trace(model), ranks=0.25)
    layers = fxtucker.report(gm).layers
    assert len(layers) == 20 and all(l.decision == "decomposed" for l in layers)
    assert sum(l.kind == "svd" for l in layers) == 3  # the three downsample 1x1 convs


# --- functional convs on parameters --------------------------------------------------------------


class Block(nn.Module):
    """The issue's functional conv: ``F.conv*d`` on parameters of its own, read only there."""

    def __init__(self, dims=2, cin=16, cout=32, k=3, groups=1, bias=True, keywords=False, **kw):
        super().__init__()
        self.dims, self.groups, self.keywords = dims, groups, keywords
        self.kw = kw if kw else dict(stride=2, padding=1)
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, *(k,) * dims) / (cin * k ** dims) ** 0.5)
        self.bias = nn.Parameter(torch.randn(cout)) if bias else None

    def forward(self, x):
        conv = getattr(F, f"conv{self.dims}d")
        if self.keywords:
            return conv(input=x, weight=self.weight, bias=self.bias, groups=self.groups, **self.kw)
        return conv(x, self.weight, self.bias, groups=self.groups, **self.kw)


class InNet(nn.Module):
    """A Block inside a network: a module conv before, a ReLU after."""

    def __init__(self, block, cin=16):
        super().__init__()
        self.stem = nn.Conv2d(3, cin, 3, padding=1)
        self.block = block

    def forward(self, x):
        return torch.relu(self.block(self.stem(x)))


FUNCTIONAL_CASES = {
    "stride2-pad1-bias": (Block(), (2, 16, 9, 9)),
    "no-bias": (Block(bias=False), (2, 16, 9, 9)),
    "keywords": (Block(keywords=True), (2, 16, 9, 9)),
    "conv1d": (Block(dims=1, k=5, stride=1, padding=2), (2, 16, 11)),
    "conv3d": (Block(dims=3, cin=4, cout=6, padding=(0, 1, 1)), (1, 4, 3, 5, 5)),
    "grouped": (Block(groups=4, padding=1, dilation=2), (2, 16, 9, 9)),
    "same": (Block(k=4, padding="same"), (2, 16, 8, 8)),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("case", FUNCTIONAL_CASES, ids=list(FUNCTIONAL_CASES))
@pytest.mark.parametrize("method", ["tucker2", "svd"])
def test_functional_conv_on_parameters_is_decomposed_like_a_module(case, method):
    block, shape = FUNCTIONAL_CASES[case]
    model = block.double().eval()
    x = torch.randn(shape, dtype=torch.float64)
    traced = fxtucker.trace(model)
    call = next(n for n in traced.graph.nodes if n.op == "call_function")
    call.stack_trace = '  File "block.py", line 9, in forward'  # symbolic_trace records none by default
    gm = decompose_conv(traced, method=method)
    gm.graph.lint()
    assert rel_error(gm(x), model(x)) < REL_FLOAT64
    roles = ("first", "last") if method == "svd" else ("first", "core", "last")
    assert factor_roles(gm) == [(f"conv{block.dims}d_{r}", r) for r in roles]
    assert [n.op for n in gm.graph.nodes] == ["placeholder", *["call_module"] * len(roles), "output"]
    # the parameters moved into the factors: no get_attr node, no weight or bias left on the block
    assert sorted(gm.state_dict()) == sorted([f"conv{block.dims}d.{r}.weight" for r in roles] + (
        [f"conv{block.dims}d.last.bias"] if block.bias is not None else []))
    for n in gm.graph.nodes:
        if n.op == "call_module":
            assert n.stack_trace == call.stack_trace
    (rec,) = fxtucker.report(gm).layers
    assert (rec.name, rec.node, rec.op, rec.decision, rec.functional) == (
        f"conv{block.dims}d", f"conv{block.dims}d", f"conv{block.dims}d", "decomposed", True)
    conv = getattr(nn, f"Conv{block.dims}d")(**{**dict(in_channels=block.weight.shape[1] * block.groups,
                                                      out_channels=block.weight.shape[0],
                                                      kernel_size=block.weight.shape[2:], groups=block.groups,
                                                      bias=block.bias is not None), **block.kw})
    assert rec.spec == conv_spec(conv)
    assert f"the functional conv{block.dims}d() call 'conv{block.dims}d' on 'weight'" in rec.reason


def test_functional_plan_can_be_edited_and_is_checked():
    model = InNet(Block()).double().eval()
    gm = plan_decomposition(fxtucker.trace(model), 0.5)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.meta["fxtucker"] == LayerPlan(source="block.conv2d", kind="tucker2", full_ranks=(16, 32), ranks=(8, 16))
    node.meta["fxtucker"] = dataclasses.replace(node.meta["fxtucker"], ranks=(2, 3))
    out = decompose_conv(gm, use_plan=True)
    assert out.get_submodule("block.conv2d.core").weight.shape == (3, 2, 3, 3)
    node.meta["fxtucker"] = dataclasses.replace(node.meta["fxtucker"], source="stem")
    with pytest.raises(ValueError, match=r"the plan names the functional conv2d\(\) call 'conv2d' 'stem', which is "
                                         r"taken or has no parent module"):
        decompose_conv(gm, use_plan=True)
    with pytest.raises(ValueError, match=r"ranks asks for 'block.conv2d', which cannot be decomposed: its weight is "
                                         r"also read by other nodes"):
        decompose_conv(fxtucker.trace(_ReadTwice()), ranks={"block.conv2d": (1, 1)})


class _ReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block(cin=4, cout=4, stride=1, padding=1)

    def forward(self, x):
        return self.block(x) + self.block(x)  # one get_attr node per parameter, two calls reading it


class _ReadElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block(cin=4, cout=4, stride=1, padding=1)

    def forward(self, x):
        return self.block(x) * self.block.bias.sum()


class _Computed(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block(cin=4, cout=4, stride=1, padding=1)

    def forward(self, x):
        return F.conv2d(x, 2 * self.block.weight, self.block.bias, padding=1)


class _Buffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(4, 4, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.w)


class _ModuleToo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + F.conv2d(x, self.conv.weight, padding=1)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.conv = nn.Conv2d(4, 4, 3)
        self.conv.weight = self.w  # the graph reads it as 'w' (its first name), the conv module as its own

    def forward(self, x):
        return F.conv2d(x, self.w) + self.conv(x)


class _Computed_stride(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.w, stride=x.shape[-1] // 4)


class _Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 1, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.w, groups=4)


class _Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4, 2, 2))

    def forward(self, x):
        return F.conv_transpose2d(x, self.w, stride=2)


@pytest.mark.parametrize("model, reasons", [
    (_ReadTwice(), [r"its weight is also read by other nodes \(conv2d_1 read 'block.weight'\); decomposing would "
                    r"take it from them", r"its weight is also read by other nodes \(conv2d read 'block.weight'\)"]),
    (_ReadElsewhere(), [r"its bias is also read by other nodes \(sum_1 read 'block.bias'\)"]),
    (_Computed(), [r"its weight is computed in forward \(node 'mul'\), not read from a parameter"]),
    (_Buffer(), [r"its weight is not an nn.Parameter \('w' is a Tensor: a buffer or constant\)"]),
    (_ModuleToo(), [r"its weight is also used by a module call \(module 'conv' uses 'conv.weight'\)"]),
    (_Tied(), [r"its weight is shared with another module \('w' is also 'conv.weight'\); decomposing would untie them"]),
    (_Computed_stride(), [r"its stride is computed in forward \(node 'floordiv'\); only constant stride, padding, "
                          r"dilation and groups are decomposed"]),
    (_Depthwise(), [r"one input channel per group"]),
    (_Transposed(), [r"conv_transpose2d\(\) is not decomposed \(transposed convs are left as they are\)"]),
], ids=["read-twice", "read-elsewhere", "computed", "buffer", "module-too", "tied", "computed-stride", "depthwise",
        "transposed"])
def test_functional_conv_that_is_not_a_layer_is_skipped_with_its_reason(model, reasons):
    model = model.double().eval()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"decompose_conv left \d layer\(s\) as they are"):
        gm = decompose_conv(fxtucker.trace(model))
    torch.testing.assert_close(gm(x), model(x), **EXACT)
    skipped = [r for r in fxtucker.report(gm).layers if r.op.startswith("conv") and r.decision == "skipped"]
    assert len(skipped) == len(reasons)
    for rec, reason in zip(skipped, reasons):
        assert re.search(reason, rec.reason), rec.reason
    assert sorted(gm.state_dict()) == sorted(model.state_dict())  # nothing removed


def test_functional_conv_through_the_whole_chain():
    """gates, strip, fold_or_restore (both ways), fold_bn, report and MACs on a functional layer."""
    from fxtucker.passes import cost_model, fold_bn, fold_or_restore, insert_gates, strip_gates

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.block = Block(cin=16, cout=32, bias=False)
            self.bn = nn.BatchNorm2d(32)

        def forward(self, x):
            return self.bn(self.block(torch.relu(self.stem(x))))

    model = Net().double().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    gm = cost_model(fxtucker.trace(model), x)
    conv_macs = next(n for n in gm.graph.nodes if n.target is F.conv2d).meta["macs"]
    assert conv_macs == 2 * 32 * 5 * 5 * 16 * 9  # counted as a conv before
    gated = cost_model(insert_gates(decompose_conv(gm, ranks={"block.conv2d": (16, 32)})), x)
    assert set(fxtucker.gates(gated)) == {"block.conv2d"}
    torch.testing.assert_close(gated(x), model(x), rtol=REL_FLOAT64, atol=1e-10)
    # full rank costs more than the conv: restored as a dense nn.Conv2d under the layer name
    restored = fold_or_restore(strip_gates(gated, 0.0), x)
    rec = fxtucker.report(restored).layers[1]
    assert (rec.name, rec.decision, rec.macs_before) == ("block.conv2d", "restored", conv_macs)
    assert rec.reason.endswith("dense kernel rebuilt; the functional conv2d() call (node 'conv2d') is now "
                               "nn.Conv2d module 'block.conv2d' with that kernel")
    node = next(n for n in restored.graph.nodes if n.target == "block.conv2d")
    assert node.name == "conv2d" and isinstance(restored.block.conv2d, nn.Conv2d)
    assert restored.block.conv2d.stride == (2, 2) and restored.block.conv2d.padding == (1, 1)
    assert rel_error(restored(x), model(x)) < REL_FLOAT64
    # pruned: kept decomposed, fewer MACs, and fold_bn folds the BatchNorm into its last factor
    with torch.no_grad():
        gated.get_submodule("block.conv2d.gate_in").weight[4:] = 0.0
        gated.get_submodule("block.conv2d.gate_out").weight[8:] = 0.0
    kept = fold_or_restore(strip_gates(gated, 1e-6), x)
    rec = fxtucker.report(kept).layers[1]
    assert rec.decision == "decomposed" and rec.ranks == (4, 8) and rec.macs_after < rec.macs_before
    folded = fold_bn(kept)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert fxtucker.meta.graph_record(folded).batchnorms[0].conv == "block.conv2d.last"
    torch.testing.assert_close(folded(x), kept(x))
    assert fold_or_restore(kept, plan={"block.conv2d": "dense"}).block.conv2d.bias is None


class OneByOnes(nn.Module):
    """A 3x3 conv beside every kind of 1x1 conv: strided, grouped, depthwise, functional, Conv1d, Conv3d."""

    def __init__(self):
        super().__init__()
        self.k3, self.strided = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1, stride=2)
        self.grouped, self.dw = nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 1, groups=8)
        self.w = nn.Parameter(torch.randn(8, 8, 1, 1))
        self.c1, self.c3 = nn.Conv1d(8, 8, 1), nn.Conv3d(8, 8, 1)

    def forward(self, x):
        y = self.k3(x) + self.grouped(x) + self.dw(x) + F.conv2d(x, self.w)
        return self.strided(y).sum() + self.c1(y.flatten(2)).sum() + self.c3(y.unsqueeze(2)).sum()


def test_pointwise_false_leaves_every_1x1_conv_whole_without_a_warning():
    model, x = OneByOnes().double().eval(), torch.randn(2, 8, 6, 6, dtype=torch.float64)
    asked = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # left whole by choice: no "left as they are" warning
        gm = decompose_conv(fxtucker.trace(model), lambda name, m: asked.append(name), pointwise=False)
        gm = decompose_conv(fxtucker.trace(model), pointwise=False)
    assert asked == ["k3"]  # a callable is not asked about the 1x1 convs
    layers = {l.name: l for l in fxtucker.report(gm).layers}
    assert layers.pop("k3").decision == "decomposed" and isinstance(gm.k3, nn.ModuleDict)
    assert set(layers) == {"strided", "grouped", "dw", "conv2d", "c1", "c3"}
    assert all(l.decision == "skipped" and "pointwise=False" in l.reason for l in layers.values())
    assert rel_error(gm(x), model(x)) < REL_FLOAT64
    with pytest.warns(UserWarning, match="one input channel per group"):  # the default: the depthwise one cannot be
        default = {l.name: l.decision for l in fxtucker.report(decompose_conv(fxtucker.trace(model))).layers}
    assert default == dict(k3="decomposed", strided="decomposed", grouped="decomposed", dw="skipped",
                           conv2d="decomposed", c1="decomposed", c3="decomposed")


def test_pointwise_errors_say_what_is_valid():
    model = Small().eval()
    with pytest.raises(ValueError, match="'pw', a 1x1 conv, which pointwise=False leaves whole; drop it from ranks"):
        decompose_conv(fxtucker.trace(model), {"pw": 4}, pointwise=False)
    with pytest.raises(TypeError, match="pointwise must be True or False, got 'no'"):
        plan_decomposition(fxtucker.trace(model), pointwise="no")
    planned = plan_decomposition(fxtucker.trace(model), pointwise=False)
    with pytest.raises(ValueError, match=r"pass method='svd', pointwise=False to plan_decomposition\(gm, ranks, "
                                         r"method=\.\.\., pointwise=\.\.\.\) instead"):
        decompose_conv(planned, use_plan=True, method="svd", pointwise=False)
    with pytest.raises(ValueError, match=r"pass pointwise='no' to plan_decomposition"):
        decompose_conv(planned, use_plan=True, pointwise="no")
    assert isinstance(decompose_conv(planned, use_plan=True).pw, nn.Conv2d)  # the plan carries it
