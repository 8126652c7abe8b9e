"""Shared tolerances and helpers for fxtucker's tests: every tolerance is named here once."""

from __future__ import annotations

import copy

import pytest
import torch

# Identity rewrites (gates inserted then stripped at threshold 0 without training, restores of
# untouched layers) must be exact up to float re-association.
EXACT = dict(rtol=0.0, atol=0.0)
# Float64 tensor maths (kernels composed, merged, truncated; factors orthonormal): absolute error.
ATOL_FLOAT64 = 1e-10
ATOL_FLOAT64_TIGHT = 1e-12
# Full-rank decomposition in float64: relative error of the output.
REL_FLOAT64 = 1e-10
# The bounds for the whole chain at full rank: relative error < 1e-5 (float64), < 1e-4 (float32).
REL_CHAIN_FLOAT64 = 1e-5
REL_CHAIN_FLOAT32 = 1e-4
# Folding BatchNorm into a conv (computed in float64, stored in the conv's dtype): relative error.
REL_FOLD_FLOAT32 = 1e-5
# Training in float32 with TrainConfig(compile=True) against compile=False: inductor fuses and
# reorders float sums, so after a few SGD steps losses and weights differ by ~1e-7 relative.
TRAIN_COMPILE = dict(rtol=1e-4, atol=1e-6)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, with 0/0 = 0."""
    denom = b.double().norm().item()
    num = (a.double() - b.double()).norm().item()
    return 0.0 if num == 0 else num / max(denom, 1e-300)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def factor_roles(gm) -> list[tuple[str, str]]:
    """(node name, factor role) of every factor node a decomposition wrote, in graph order."""
    from fxtucker.meta import FactorRecord

    return [(n.name, n.meta["fxtucker"].role) for n in gm.graph.nodes if isinstance(n.meta.get("fxtucker"), FactorRecord)]


def reference(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode, taken before a pass runs."""
    return copy.deepcopy(model).eval()
