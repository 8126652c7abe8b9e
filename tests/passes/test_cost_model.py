"""cost_model and count_macs: totals against FlopCounterMode and the paper, per-node counts by hand,
side effects on the model, errors."""

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import fxtucker
from fxtucker.meta import MACS, PARAMS, TENSOR_META
from fxtucker.passes import cost_model, count_macs
from tests.conftest import EXACT

# The paper's GMAC figures (ptflops, elementwise work included) are rounded to two decimals.
PAPER_GMAC_REL = 0.015
# torchvision's documented resnet18 cost: 1.81 GFLOPS in its tables, which count MACs.
RESNET18_MACS_224 = 1_814_073_344


def flop_counter_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FlopCounterMode's FLOPs // 2 for one forward pass of ``module`` in eval mode.

    Gradients stay on, so nn.MultiheadAttention takes its ordinary (counted) path rather than
    the fused inference kernel, which FlopCounterMode has no formula for.
    """
    module = copy.deepcopy(module).eval()
    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


def torchvision_model(name: str) -> nn.Module:
    return torchvision.models.get_model(name, weights=None).eval()


def image(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size)


def annotated(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    """``model`` traced by fxtucker and annotated by cost_model."""
    return cost_model(fxtucker.trace(model), *inputs)


def compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes that compute something: neither inputs, parameter reads nor the output."""
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]


def only_compute_node(gm: fx.GraphModule) -> fx.Node:
    (node,) = compute_nodes(gm)
    return node


class Call(nn.Module):
    """A model that is a single call of ``fn`` on one input, to test functional nodes."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Call2(Call):
    def forward(self, x, y):
        return self.fn(x, y)


class Call3(Call):
    def forward(self, x, y, z):
        return self.fn(x, y, z)


CALLS = {1: Call, 2: Call2, 3: Call3}  # by number of inputs: fx cannot trace forward(*xs)


class Layer(nn.Module):
    """A model that is a single call of a submodule."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class FunctionalConv(nn.Module):
    """F.conv2d on a parameter: the weight is read by a get_attr node."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight, stride=2, padding=1)


class Attention(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class ConvBNNet(nn.Module):
    """Conv, BatchNorm, dropout and a classifier: the modules whose training flag matters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.mean((2, 3))))


# --- whole models against FlopCounterMode and published figures ---


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet121", "mobilenet_v2", "vgg16"])
def test_count_macs_equals_flop_counter(name):
    model, x = torchvision_model(name), image(224)
    assert count_macs(model, x) == flop_counter_macs(model, x)


def test_resnet18_macs_are_torchvisions_documented_figure():
    macs = count_macs(torchvision_model("resnet18"), image(224))
    assert macs == RESNET18_MACS_224
    # torchvision's weight metadata states the same cost, in GMACs rounded to 3 decimals.
    assert round(macs / 1e9, 3) == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["_ops"]


@pytest.mark.parametrize(
    "name, paper_gmacs", [("resnet18", 1.82), ("resnet50", 4.12), ("densenet121", 2.88)]
)
def test_include_elementwise_matches_paper(name, paper_gmacs):
    model, x = torchvision_model(name), image(224)
    with_elementwise = count_macs(model, x, include_elementwise=True)
    assert with_elementwise > count_macs(model, x)
    assert abs(with_elementwise / 1e9 - paper_gmacs) / paper_gmacs < PAPER_GMAC_REL


# --- one node at a time, counted by hand ---
# Output length per spatial dim: (L + 2*padding - dilation*(k - 1) - 1) // stride + 1.
# Conv MACs: N * C_out * prod(out spatial) * (C_in / groups) * prod(k); transposed: N * C_in *
# prod(in spatial) * (C_out / groups) * prod(k), one kernel product per input position.

LAYER_CASES = [
    # L_out = (17 + 2 - 2*2 - 1) // 2 + 1 = 8
    pytest.param(nn.Conv1d(4, 8, 3, stride=2, padding=1, dilation=2, groups=2),
                 (2, 4, 17), (2, 8, 8), 2 * 8 * 8 * 2 * 3, id="conv1d_groups_stride_dilation"),
    # H_out = (10 + 2 - 2 - 1) // 2 + 1 = 5, W_out = (11 + 4 - 2*4 - 1) // 1 + 1 = 7
    pytest.param(nn.Conv2d(6, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=3),
                 (1, 6, 10, 11), (1, 12, 5, 7), 12 * 5 * 7 * 2 * 15, id="conv2d_rect_groups"),
    pytest.param(nn.Conv2d(4, 4, 3, padding="same", bias=False),
                 (1, 4, 6, 6), (1, 4, 6, 6), 4 * 36 * 4 * 9, id="conv2d_padding_same"),
    pytest.param(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
                 (1, 4, 6, 6), (1, 6, 6, 6), 6 * 36 * 4 * 9, id="conv2d_reflect_padding"),
    pytest.param(nn.Conv2d(8, 8, 3, padding=1, groups=8),
                 (1, 8, 5, 5), (1, 8, 5, 5), 8 * 25 * 1 * 9, id="conv2d_depthwise"),
    # D_out = 5, H_out = (6 + 2 - 2 - 1) // 2 + 1 = 3, W_out = (7 + 2 - 2 - 1) // 2 + 1 = 4
    pytest.param(nn.Conv3d(4, 8, 3, stride=(1, 2, 2), padding=1, groups=4),
                 (1, 4, 5, 6, 7), (1, 8, 5, 3, 4), 8 * 5 * 3 * 4 * 1 * 27, id="conv3d_groups"),
    # H_out = (5 - 1)*2 - 2*1 + 3 + 1 = 10
    pytest.param(nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
                 (1, 8, 5, 5), (1, 4, 10, 10), 8 * 25 * 2 * 9, id="conv_transpose2d_groups"),
    # L_out = (7 - 1)*2 + 4 = 16
    pytest.param(nn.ConvTranspose1d(3, 6, 4, stride=2),
                 (2, 3, 7), (2, 6, 16), 2 * 3 * 7 * 6 * 4, id="conv_transpose1d"),
    pytest.param(nn.Linear(5, 7), (2, 3, 5), (2, 3, 7), 2 * 3 * 7 * 5, id="linear_3d_input"),
]  # fmt: skip


@pytest.mark.parametrize("layer, in_shape, out_shape, macs", LAYER_CASES)
def test_layer_macs_by_hand(layer, in_shape, out_shape, macs):
    model, x = Layer(layer), torch.randn(in_shape)
    node = only_compute_node(annotated(model, x))
    assert node.meta[MACS] == macs
    assert node.meta[PARAMS] == sum(p.numel() for p in layer.parameters())
    assert node.meta[TENSOR_META].shape == torch.Size(out_shape) == model(x).shape
    assert count_macs(model, x) == flop_counter_macs(model, x) == macs


def test_conv_node_params_and_shape():
    model, x = Layer(nn.Conv2d(6, 12, 3, groups=3)), torch.randn(2, 6, 9, 9)
    node = only_compute_node(annotated(model, x))
    assert node.meta[PARAMS] == 12 * 2 * 3 * 3 + 12  # weight (C_out, C_in/g, k, k) + bias
    assert node.meta[TENSOR_META].shape == torch.Size([2, 12, 7, 7])
    assert node.meta[TENSOR_META].dtype == torch.float32


def test_functional_conv_on_parameter():
    model, x = FunctionalConv(), torch.randn(1, 3, 9, 9)
    gm = annotated(model, x)
    (weight,) = gm.graph.find_nodes(op="get_attr", target="weight")
    assert (weight.meta[MACS], weight.meta[PARAMS]) == (0, 8 * 3 * 3 * 3)
    conv = only_compute_node(gm)
    assert conv.target is F.conv2d
    # H_out = W_out = (9 + 2 - 2 - 1) // 2 + 1 = 5
    assert conv.meta[MACS] == 8 * 25 * 3 * 9
    assert conv.meta[PARAMS] == 0
    assert count_macs(model, x) == flop_counter_macs(model, x) == 8 * 25 * 3 * 9


# MACs: output elements x the contracted dimension.
MATMUL_CASES = [
    pytest.param(torch.matmul, [(2, 3, 4), (4, 5)], 2 * 3 * 5 * 4, id="torch_matmul_broadcast"),
    pytest.param(operator.matmul, [(2, 3, 4), (2, 4, 6)], 2 * 3 * 6 * 4, id="operator_matmul"),
    pytest.param(lambda a, b: a.matmul(b), [(3, 4), (2, 4, 5)], 2 * 3 * 5 * 4, id="method_matmul"),
    pytest.param(torch.bmm, [(2, 3, 4), (2, 4, 6)], 2 * 3 * 6 * 4, id="torch_bmm"),
    pytest.param(torch.mm, [(3, 4), (4, 5)], 3 * 5 * 4, id="torch_mm"),
    pytest.param(torch.addmm, [(3, 5), (3, 4), (4, 5)], 3 * 5 * 4, id="torch_addmm"),
    pytest.param(torch.baddbmm, [(2, 3, 6), (2, 3, 4), (2, 4, 6)], 2 * 3 * 6 * 4, id="baddbmm"),
]


@pytest.mark.parametrize("fn, shapes, macs", MATMUL_CASES)
def test_matmul_family_macs_by_hand(fn, shapes, macs):
    model, xs = CALLS[len(shapes)](fn), [torch.randn(s) for s in shapes]
    node = only_compute_node(annotated(model, *xs))
    assert node.meta[MACS] == macs
    assert node.meta[TENSOR_META].shape == model(*xs).shape
    assert count_macs(model, *xs) == flop_counter_macs(model, *xs) == macs


@pytest.mark.parametrize(
    "shapes, macs",
    [([(3, 4), (4,)], 3 * 4), ([(4,), (4,)], 4), ([(4,), (4, 5)], 5 * 4)],
    ids=["matrix_vector", "dot", "vector_matrix"],
)
def test_matmul_with_vectors_macs_by_hand(shapes, macs):
    # FlopCounterMode has no formula for aten.mv and aten.dot (it counts 0), so only by hand here.
    model, xs = Call2(operator.matmul), [torch.randn(s) for s in shapes]
    assert only_compute_node(annotated(model, *xs)).meta[MACS] == macs
    assert count_macs(model, *xs) == macs


# batch_first=True in eval mode is the case that once counted 0: under no_grad it takes the fused
# torch._native_multi_head_attention fast path, which FlopCounterMode has no formula for.
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_multihead_attention_counted_by_flop_counter(batch_first):
    attention, x = Attention(batch_first), torch.randn(2, 5, 16)
    (node,) = annotated(attention, x).graph.find_nodes(op="call_module", target="attn")
    assert node.meta[MACS] == flop_counter_macs(attention.attn, x, x, x)
    # By hand, L tokens, N sequences, E = 16: in-projections 3*L*N*E*E, scores and mixing
    # 2*N*L*L*E, out-projection L*N*E*E.
    n, l = (2, 5) if batch_first else (5, 2)
    assert node.meta[MACS] == 3 * l * n * 16 * 16 + 2 * n * l * l * 16 + l * n * 16 * 16
    assert node.meta[PARAMS] == sum(p.numel() for p in attention.attn.parameters())


@pytest.mark.parametrize(
    "model, relu_target",
    [
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "1"),
        (Call(F.relu), F.relu),
        (Call(torch.relu), torch.relu),
    ],
    ids=["module", "functional", "torch"],
)
def test_placeholder_and_relu_cost_nothing(model, relu_target):
    gm = annotated(model, torch.randn(1, 3, 6, 6))
    (placeholder,) = gm.graph.find_nodes(op="placeholder")
    relu_node = compute_nodes(gm)[-1]
    assert relu_node.target == relu_target
    assert placeholder.meta[MACS] == 0 and placeholder.meta[PARAMS] == 0
    assert relu_node.meta[MACS] == 0 and relu_node.meta[PARAMS] == 0
    assert placeholder.meta[TENSOR_META].shape == torch.Size([1, 3, 6, 6])


def test_every_node_gets_int_macs_and_params():
    model, x = ConvBNNet(), torch.randn(2, 3, 8, 8)
    gm = annotated(model, x)
    for node in gm.graph.nodes:
        assert type(node.meta[MACS]) is int and node.meta[MACS] >= 0, node.name
        assert type(node.meta[PARAMS]) is int and node.meta[PARAMS] >= 0, node.name
    assert sum(n.meta[MACS] for n in gm.graph.nodes) == count_macs(model, x)


# --- side effects: an analysis pass that runs the model ---


def _training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, **EXACT, msg=key)


def test_cost_model_leaves_train_mode_and_batchnorm_statistics():
    gm = fxtucker.trace(ConvBNNet().train())
    gm.bn.running_mean.fill_(0.5)  # distinct from the initial zeros, so an update is visible
    gm.drop.eval()  # a mixed setting must come back as it was, module by module
    flags, state, code = _training_flags(gm), _state(gm), gm.code
    assert cost_model(gm, torch.randn(4, 3, 8, 8)) is gm
    assert _training_flags(gm) == flags
    assert gm.training and gm.bn.training and not gm.drop.training
    _assert_state_equal(gm, state)
    assert gm.code == code


def test_count_macs_leaves_the_model_in_train_mode():
    model = torchvision.models.resnet18(weights=None).train()
    flags, state = _training_flags(model), _state(model)
    count_macs(model, image(64))
    assert _training_flags(model) == flags
    _assert_state_equal(model, state)


# --- errors ---


def test_cost_model_rejects_a_plain_module():
    message = r"cost_model expects a torch\.fx\.GraphModule, got ConvBNNet.*trace\(model\)"
    with pytest.raises(TypeError, match=message):
        cost_model(ConvBNNet(), torch.randn(1, 3, 8, 8))


def test_cost_model_needs_example_inputs():
    message = r"cost_model needs example inputs: call cost_model\(gm, \*example_inputs\)"
    with pytest.raises(ValueError, match=message):
        cost_model(fxtucker.trace(ConvBNNet()))


def test_count_macs_needs_example_inputs():
    with pytest.raises(ValueError, match="cost_model needs example inputs"):
        count_macs(ConvBNNet())


def test_count_macs_rejects_a_non_module():
    with pytest.raises(TypeError, match="trace expects an nn.Module, got function"):
        count_macs(F.relu, torch.randn(3))
