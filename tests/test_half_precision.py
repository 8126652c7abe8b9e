"""Half precision and devices: fp16/bf16 models go through the chain in float32 maths and come back
in their own dtype; a model on CUDA stays there.

The reference for a half-precision model is a float32 copy of the same (already rounded) weights,
so what is measured is the rounding the chain adds, not the rounding of the weights themselves.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxtucker
from fxtucker.meta import DECOMPOSED, RESTORED
from fxtucker.passes import cost_model, decompose_conv, fold_bn, fold_or_restore, insert_gates, strip_gates
from tests.conftest import EXACT, rel_error
from tests.strategies import OneConv, conv_and_input

# Relative output error against the float32 reference, per dtype: about 8x the error that one
# rounding of every weight and activation gives on these small nets (bf16 ~4e-3, fp16 ~5e-4).
HALF_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


class Net(nn.Module):
    """Dense, grouped, 1x1 and strided convs, BatchNorm, a residual add."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, groups=2, bias=False)
        self.c3 = nn.Conv2d(32, 16, 1)
        self.c4 = nn.Conv2d(16, 24, 3, stride=2, padding=1, padding_mode="reflect")

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        y = y + self.c3(torch.relu(self.c2(y)))
        return self.c4(y)


def net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.1)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.to(dtype)


def float32_reference(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).float().eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def chain(model: nn.Module, x: torch.Tensor, threshold: float = 0.0):
    gm = cost_model(fxtucker.trace(model), x)
    decomposed = decompose_conv(gm)
    gated = insert_gates(decomposed)
    stripped = strip_gates(gated, threshold)
    return decomposed, gated, stripped, fold_or_restore(stripped, x)


def dtypes(module: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}


@pytest.mark.parametrize("dtype", HALF)
def test_half_model_goes_through_the_chain_in_its_dtype(dtype):
    model = net(dtype)
    x = torch.randn(2, 3, 9, 9).to(dtype)
    ref = run(float32_reference(model), x.float())
    stages = dict(zip(("decompose_conv", "insert_gates", "strip_gates", "fold_or_restore"), chain(model, x)))
    for name, stage in stages.items():
        assert dtypes(stage) == {dtype}, (name, dtypes(stage))
        out = run(stage, x)
        assert out.dtype == dtype
        err = rel_error(out.float(), ref)
        assert err < HALF_TOL[dtype], f"{name}: relative error {err:.3g} against the float32 reference"
    decisions = {r.name: r.decision for r in fxtucker.report(stages["fold_or_restore"]).layers}
    assert set(decisions) == {"c1", "c2", "c3", "c4"} and set(decisions.values()) <= {DECOMPOSED, RESTORED}
    folded = fold_bn(stages["fold_or_restore"])
    assert dtypes(folded) == {dtype}
    assert rel_error(run(folded, x).float(), ref) < HALF_TOL[dtype]


@pytest.mark.parametrize("dtype", HALF)
def test_half_factors_are_computed_in_float32_then_cast(dtype):
    # The factors of the half model equal the float32 factors of the same weights, rounded once.
    model = net(dtype)
    half = decompose_conv(fxtucker.trace(model))
    full = decompose_conv(fxtucker.trace(float32_reference(model)))
    for role in ("first", "core", "last"):
        w_half, w_full = half.get_submodule(f"c1.{role}").weight, full.get_submodule(f"c1.{role}").weight
        assert w_half.dtype == dtype and w_full.dtype == torch.float32
        torch.testing.assert_close(w_half, w_full.to(dtype), **EXACT)


@pytest.mark.parametrize("dtype", HALF)
def test_half_pruned_chain_keeps_the_stripped_function(dtype):
    model = net(dtype)
    x = torch.randn(2, 3, 9, 9).to(dtype)
    gated = insert_gates(decompose_conv(cost_model(fxtucker.trace(model), x)))
    values = torch.cat([g.detach().abs().flatten().float() for layer in fxtucker.gates(gated).values()
                        for g in layer.values()])
    stripped = strip_gates(gated, float(values.median()))
    final = fold_or_restore(stripped, x)
    layers = fxtucker.report(final).layers
    assert any(r.ranks != r.full_ranks for r in layers)  # something was pruned
    assert dtypes(stripped) == dtypes(final) == {dtype}
    ref = run(float32_reference(stripped), x.float())
    assert rel_error(run(final, x).float(), ref) < HALF_TOL[dtype]


@pytest.mark.parametrize("dtype", HALF)
@given(case=conv_and_input(dtype=torch.float32))
@settings(max_examples=15, deadline=None)
def test_random_half_convs_keep_their_function(dtype, case):
    conv, x = case
    model = OneConv(conv).eval().to(dtype)
    x = x.to(dtype)
    ref = run(float32_reference(model), x.float())
    *_, final = chain(model, x)
    assert dtypes(final) == {dtype}
    # Relative to the output's scale; a tiny conv can have an output ~0, compared in absolute terms.
    err = (run(final, x).float() - ref).norm().item() / max(ref.norm().item(), 1.0)
    assert err < HALF_TOL[dtype]


def test_half_input_to_a_float32_model_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"example input 0 has dtype torch.bfloat16 but the model's parameters are "
                                        r"torch.float32; pass the input as x.to\(torch.float32\)"):
        cost_model(fxtucker.trace(net(torch.float32)), torch.randn(1, 3, 9, 9, dtype=torch.bfloat16))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_model_on_cuda_stays_on_cuda(dtype):
    model = net(dtype).cuda()
    x = torch.randn(2, 3, 9, 9, device="cuda", dtype=dtype)
    ref = run(float32_reference(model), x.float())
    for stage in chain(model, x):
        assert {t.device.type for t in (*stage.parameters(), *stage.buffers())} == {"cuda"}
        assert dtypes(stage) == {dtype}
        out = run(stage, x)
        assert out.device.type == "cuda"
        tol = HALF_TOL.get(dtype, 1e-4)
        assert rel_error(out.float().cpu(), ref.cpu()) < tol


@needs_cuda
def test_cpu_input_to_a_cuda_model_is_refused():
    with pytest.raises(ValueError, match=r"example input 0 is on cpu but the model's parameters are on cuda:0"):
        cost_model(fxtucker.trace(net(torch.float32).cuda()), torch.randn(1, 3, 9, 9))
