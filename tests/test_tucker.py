"""The maths in fxtucker.tucker, checked against numpy references."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxtucker import tucker
from tests.conftest import ATOL_FLOAT64_TIGHT, ATOL_FLOAT64


def _numpy_hosvd_truncation(w: np.ndarray, r1: int, r2: int) -> np.ndarray:
    """W x_0 (U2 U2^T) x_1 (U1 U1^T) with U from numpy's SVD of the unfoldings."""
    u_out = np.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)[0][:, :r2]
    u_in = np.linalg.svd(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1), full_matrices=False)[0][:, :r1]
    p_out, p_in = u_out @ u_out.T, u_in @ u_in.T
    return np.einsum("oi...,po,qi->pq...", w, p_out, p_in)


@given(
    c_out=st.integers(1, 12), c_in=st.integers(1, 12), k=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    data=st.data(),
)
@settings(max_examples=40, deadline=None)
def test_tucker2_full_rank_is_exact_and_truncation_is_hosvd(c_out, c_in, k, data):
    w = torch.randn(c_out, c_in, *k, dtype=torch.float64)
    core, u_out, u_in = tucker.tucker2(w)
    assert torch.allclose(tucker.reconstruct_tucker2(core, u_out, u_in), w, rtol=0, atol=ATOL_FLOAT64_TIGHT)
    assert torch.allclose(u_out.T @ u_out, torch.eye(u_out.shape[1], dtype=w.dtype), atol=ATOL_FLOAT64_TIGHT)
    full = tucker.tucker2_full_ranks(w.shape)
    r1, r2 = data.draw(st.integers(1, full[0])), data.draw(st.integers(1, full[1]))
    core, u_out, u_in = tucker.tucker2(w, (r1, r2))
    assert core.shape == (r2, r1, *k)
    expected = _numpy_hosvd_truncation(w.numpy(), r1, r2)
    np.testing.assert_allclose(tucker.reconstruct_tucker2(core, u_out, u_in).numpy(), expected, atol=ATOL_FLOAT64)


@pytest.mark.parametrize("shape", [(7, 30), (30, 7), (5, 5)])
def test_svd_pair_is_optimal_truncation(shape):
    a = torch.randn(*shape, dtype=torch.float64)
    left, right = tucker.svd_pair(a)
    assert torch.allclose(left @ right, a, atol=ATOL_FLOAT64_TIGHT)
    ortho = right @ right.T if shape[0] >= shape[1] else left.T @ left  # the smaller side's factor
    assert torch.allclose(ortho, torch.eye(min(shape), dtype=a.dtype), atol=ATOL_FLOAT64_TIGHT)
    left, right = tucker.svd_pair(a, 2)
    u, s, vh = np.linalg.svd(a.numpy(), full_matrices=False)
    np.testing.assert_allclose((left @ right).numpy(), (u[:, :2] * s[:2]) @ vh[:2], atol=ATOL_FLOAT64)


def test_evbmf_recovers_rank_of_noisy_low_rank_matrix():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(80, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 120, generator=g, dtype=torch.float64)
    assert tucker.evbmf(a + 0.05 * torch.randn(80, 120, generator=g, dtype=torch.float64)) == 7
    assert tucker.evbmf((a + 0.05 * torch.randn(80, 120, generator=g, dtype=torch.float64)).T) == 7
    assert tucker.evbmf(torch.randn(60, 90, generator=g)) == 0
    assert tucker.evbmf(torch.zeros(4, 5)) == 0


def test_vbmf_ranks_of_kernel_with_known_tucker_rank():
    g = torch.Generator().manual_seed(2)
    core = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    u_out = torch.linalg.qr(torch.randn(64, 6, generator=g, dtype=torch.float64))[0]
    u_in = torch.linalg.qr(torch.randn(48, 4, generator=g, dtype=torch.float64))[0]
    w = 10 * tucker.reconstruct_tucker2(core, u_out, u_in)
    assert tucker.vbmf_ranks(w + 0.01 * torch.randn(w.shape, generator=g, dtype=torch.float64)) == (4, 6)


def test_errors_name_the_valid_range():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"valid are 1 <= R1 <= 3 and 1 <= R2 <= 4"):
        tucker.tucker2(w, (4, 2))
    with pytest.raises(ValueError, match=r"3 or more dims"):
        tucker.tucker2(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"valid is 1..3"):
        tucker.svd_pair(torch.randn(3, 5), 0)
    with pytest.raises(ValueError, match=r"non-empty 2-D matrix"):
        tucker.evbmf(torch.randn(3))


@pytest.mark.parametrize("decay", [1.0, 1e-2, 1e-4])
def test_full_rank_float32_exact_with_incomplete_basis(decay):
    # 64 -> 4 channels, 3x3: the input mode has 64 channels but rank at most 36, so the basis
    # is incomplete and must be accurate (a Gram-matrix basis lost the small directions).
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, 36, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(36, 36, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, math.log10(decay), 36, dtype=torch.float64)
    w = ((u * s) @ v.T).T.reshape(4, 9, 64).permute(0, 2, 1).reshape(4, 64, 3, 3).float()
    core, u_out, u_in = tucker.tucker2(w)
    err = (tucker.reconstruct_tucker2(core, u_out, u_in) - w).norm() / w.norm()
    assert err < 1e-5


@pytest.mark.parametrize("power", [1.5, 2.0])
def test_float32_truncation_of_wide_unfolding_is_as_good_as_svd(power):
    # (256, 128, 1, 1) at (64, 64): the input-mode unfolding (128, 256) is wide, so its basis
    # comes from a Gram matrix; formed in float32 it was up to 17% worse than an SVD here.
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(256, 128, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))[0]
    s = torch.arange(1, 129, dtype=torch.float64) ** -power
    w = ((u * s) @ v.T).float().reshape(256, 128, 1, 1)

    def rel_err(core, u_out, u_in):
        approx = tucker.reconstruct_tucker2(core, u_out, u_in).double()
        return ((approx - w.double()).norm() / w.double().norm()).item()

    svd_out = torch.linalg.svd(tucker.unfold(w, 0), full_matrices=False)[0][:, :64]
    svd_in = torch.linalg.svd(tucker.unfold(w, 1), full_matrices=False)[0][:, :64]
    svd_core = torch.einsum("oi...,or,is->rs...", w, svd_out, svd_in)
    assert rel_err(*tucker.tucker2(w, (64, 64))) <= rel_err(svd_core, svd_out, svd_in) * (1 + 1e-4)


def test_float32_svd_pair_truncation_is_as_good_as_svd():
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(96, 64, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(200, 64, generator=g, dtype=torch.float64))[0]
    a64 = (u * torch.arange(1, 65, dtype=torch.float64) ** -2.0) @ v.T
    for a in (a64.float(), a64.T.float()):
        left, right = tucker.svd_pair(a, 24)
        uu, ss, vh = torch.linalg.svd(a, full_matrices=False)
        ref = ((uu[:, :24] * ss[:24]) @ vh[:24]).double()
        err = ((left @ right).double() - a.double()).norm()
        assert err <= (ref - a.double()).norm() * (1 + 1e-4)


@pytest.mark.parametrize("groups", [1, 3])
def test_compose_and_merge_are_the_factor_products(groups):
    """compose multiplies first, core, last out; merge multiplies one 1x1 factor into the core."""
    torch.manual_seed(0)
    r1, r2, c_in, c_out = 2, 4, 5, 7
    first = torch.randn(groups * r1, c_in, 1, 1, dtype=torch.float64)
    core = torch.randn(groups * r2, r1, 3, 3, dtype=torch.float64)
    last = torch.randn(groups * c_out, r2, 1, 1, dtype=torch.float64)
    x = torch.randn(1, groups * c_in, 6, 6, dtype=torch.float64)
    conv = torch.nn.functional.conv2d
    want = conv(conv(conv(x, first, groups=groups), core, groups=groups), last, groups=groups)
    dense = tucker.compose(first, last, core, groups)
    assert dense.shape == (groups * c_out, c_in, 3, 3)
    torch.testing.assert_close(conv(x, dense, groups=groups), want, rtol=0, atol=ATOL_FLOAT64)
    merged_first, bias = tucker.merge(core, first, "first", groups)
    assert bias is None and merged_first.shape == (groups * r2, c_in, 3, 3)
    torch.testing.assert_close(conv(conv(x, merged_first, groups=groups), last, groups=groups), want, rtol=0, atol=ATOL_FLOAT64)
    b_core, b_last = torch.randn(groups * r2, dtype=torch.float64), torch.randn(groups * c_out, dtype=torch.float64)
    merged_last, bias = tucker.merge(core, last, "last", groups, b_core, b_last)
    want_b = conv(conv(conv(x, first, groups=groups), core, b_core, groups=groups), last, b_last, groups=groups)
    torch.testing.assert_close(conv(conv(x, first, groups=groups), merged_last, bias, groups=groups), want_b,
                               rtol=0, atol=ATOL_FLOAT64)
    f, l_ = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)  # Linear factors
    torch.testing.assert_close(tucker.compose(f, l_), l_ @ f)
    assert tucker.compute_dtype(torch.float16) == torch.float32 and tucker.compute_dtype(torch.float64) == torch.float64
