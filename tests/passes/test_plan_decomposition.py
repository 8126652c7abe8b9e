"""plan_decomposition: rank choice (fraction, dict, callable, vbmf), the ranks argument's checks,
layers asked for that cannot be decomposed, and the names of functional convs."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxtucker
from fxtucker.passes import decompose_conv, plan_decomposition
from tests.passes.test_decompose_conv import Block, Small, Tricky


def test_fraction_dict_callable_and_vbmf_ranks():
    model = Small()
    gm = fxtucker.trace(model)
    r = {l.name: l.ranks for l in fxtucker.report(decompose_conv(gm, ranks=0.5)).layers}
    assert r == {"conv1": (2, 4), "conv2": (4, 8), "pw": (6,)}
    d = decompose_conv(gm, ranks={"conv2": (3, 5), "pw": 4})
    rep = {l.name: (l.ranks, l.decision) for l in fxtucker.report(d).layers}
    assert rep == {"conv1": ((), "skipped"), "conv2": ((3, 5), "decomposed"), "pw": ((4,), "decomposed")}
    assert d.get_submodule("conv2.core").weight.shape == (5, 3, 3, 3)
    d = decompose_conv(gm, ranks=lambda name, m: (2, 2) if name == "conv1" else None)
    assert [l.decision for l in fxtucker.report(d).layers] == ["decomposed", "skipped", "skipped"]
    d = decompose_conv(gm, ranks="vbmf")
    assert all(1 <= r <= f for l in fxtucker.report(d).layers for r, f in zip(l.ranks, l.full_ranks))


@pytest.mark.parametrize(
    "ranks, error, match",
    [
        (0.0, ValueError, r"ranks=0.0: a fraction of each mode must be in \(0, 1\]"),
        (1.5, ValueError, r"must be in \(0, 1\]"),
        ("tt", ValueError, r"ranks='tt' is not known: the only string accepted is 'vbmf'"),
        ([1, 2], TypeError, r"ranks must be None \(full rank\), a float"),
        ({"nope": (1, 1)}, ValueError, r"ranks names \['nope'\], which are not conv modules called in the graph; known: \['conv1', 'conv2', 'pw'\]"),
        ({"conv1": (0, 2)}, ValueError, r"ranks \(0, 2\) for 'conv1' out of range: valid are 1 <= R1 <= 3 and 1 <= R2 <= 8"),
        ({"conv1": 3}, ValueError, r"ranks for 'conv1' \(Conv2d, decomposed by tucker2\) must be a pair \(R1, R2\), got 3"),
        ({"pw": (2, 2)}, ValueError, r"ranks for 'pw' \(Conv2d, decomposed by svd\) must be an int R or \(R,\)"),
        ({"fc": 2}, ValueError, r"ranks names \['fc'\], which are not conv modules"),
    ],
)
@pytest.mark.parametrize("pass_", [plan_decomposition, decompose_conv], ids=["plan", "decompose"])
def test_bad_ranks_are_refused(ranks, error, match, pass_):
    with pytest.raises(error, match=match):
        pass_(fxtucker.trace(Small()), ranks=ranks)


def test_explicitly_requested_unsupported_layer_raises():
    with pytest.raises(ValueError, match=r"ranks asks for 'dw', which cannot be decomposed: one input channel per group"):
        decompose_conv(fxtucker.trace(Tricky()), ranks={"dw": (1, 1)})


def test_functional_layer_is_named_after_its_owner_and_node_and_kept_unique():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Block(), Block(cin=32)
            self.b.conv2d = nn.Parameter(torch.randn(32, 32, 1, 1))  # an attribute named like the call

        def forward(self, x):
            y = self.b(self.a(x))
            return F.conv2d(y, self.b.conv2d)

    model = Twice().double().eval()
    gm = fxtucker.trace(model)
    # fx names the calls conv2d, conv2d_1, conv2d_2; the layers live beside their weights
    planned = plan_decomposition(gm, 0.5)
    plans = [n.meta["fxtucker"] for n in planned.graph.nodes if n.op == "call_function"]
    assert [p.source for p in plans] == ["a.conv2d", "b.conv2d_1", "b.conv2d_2"]
    # b.conv2d is taken (a parameter): the third call's node name conv2d_2 is free
    out = decompose_conv(gm, ranks={"a.conv2d": (4, 8), "b.conv2d_1": (8, 8), "b.conv2d_2": 4})
    assert [n.target for n in out.graph.nodes if n.op == "call_module"] == [
        "a.conv2d.first", "a.conv2d.core", "a.conv2d.last", "b.conv2d_1.first", "b.conv2d_1.core", "b.conv2d_1.last",
        "b.conv2d_2.first", "b.conv2d_2.last"]
    assert not hasattr(out.b, "conv2d") and not hasattr(out.a, "weight") and not hasattr(out.b, "bias")
    # a name already taken: the suffix counts up
    model.a.conv2d = nn.Parameter(torch.ones(1))
    model.a.register_buffer("conv2d_1", torch.ones(1))

    class Reads(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + self.inner.a.conv2d + self.inner.a.conv2d_1

    plans = [n.meta["fxtucker"] for n in plan_decomposition(fxtucker.trace(Reads(model))).graph.nodes
             if n.op == "call_function" and n.target is F.conv2d]
    assert plans[0].source == "inner.a.conv2d_2"
