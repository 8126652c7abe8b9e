"""Tensor maths: Tucker-2 by HOSVD, SVD pairs, reconstruction and EVBMF rank estimates.

Pure functions of tensors; nothing here knows about torch.fx or modules. A conv kernel is a
tensor ``W`` of shape ``(C_out, C_in, *k)``. Its Tucker-2 decomposition over the two channel
modes is ``W = core x_0 U_out x_1 U_in`` with ``U_out: (C_out, R2)``, ``U_in: (C_in, R1)`` and
``core: (R2, R1, *k)``: as a network, a 1x1 conv by ``U_in^T`` (C_in -> R1), a kxk conv by
``core`` (R1 -> R2) and a 1x1 conv by ``U_out`` (R2 -> C_out).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from scipy.optimize import minimize_scalar

__all__ = [
    "unfold",
    "tucker2_full_ranks",
    "tucker2",
    "reconstruct_tucker2",
    "svd_pair",
    "evbmf",
    "vbmf_ranks",
]


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: the fibres along ``mode`` become the rows' columns, shape (dim, rest)."""
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def tucker2_full_ranks(shape: Sequence[int]) -> tuple[int, int]:
    """(R1, R2) at which Tucker-2 of a kernel of ``shape`` is exact: the unfoldings' ranks' bounds."""
    c_out, c_in, k = shape[0], shape[1], math.prod(shape[2:])
    return min(c_in, c_out * k), min(c_out, c_in * k)


def _leading_eigenvectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading eigenvectors of a symmetric PSD matrix, as columns, largest first."""
    _, vecs = torch.linalg.eigh(gram)
    return vecs.flip(-1)[:, :rank]


def _leading_left_singular_vectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    rows, cols = matrix.shape
    if rows > cols:
        # Tall: the basis is incomplete even at full rank, so its accuracy matters; the SVD is
        # accurate and, in this orientation, fast.
        return torch.linalg.svd(matrix, full_matrices=False)[0][:, :rank]
    # Wide or square: eigenvectors of the (small) Gram matrix span the same leading subspaces
    # at a fraction of the cost of a wide SVD (LAPACK's wide float64 path was up to 50x slower
    # here). At full rank they form a complete orthonormal basis, so the decomposition stays
    # exact whatever their precision.
    return _leading_eigenvectors(matrix @ matrix.T, rank)


def tucker2(
    weight: torch.Tensor, ranks: Optional[tuple[int, int]] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv kernel by truncated HOSVD over the output- and input-channel modes.

    Args:
        weight: kernel of shape ``(C_out, C_in, *k)``.
        ranks: ``(R1, R2)``: input-mode and output-mode ranks; ``None`` for full (exact) ranks.

    Returns:
        ``(core, u_out, u_in)`` with shapes ``(R2, R1, *k)``, ``(C_out, R2)``, ``(C_in, R1)``;
        ``u_out`` and ``u_in`` have orthonormal columns.
    """
    if weight.dim() < 3:
        raise ValueError(f"tucker2 expects a kernel (C_out, C_in, *k) of 3 or more dims, got shape {tuple(weight.shape)}")
    full = tucker2_full_ranks(weight.shape)
    r1, r2 = full if ranks is None else ranks
    if not (1 <= r1 <= full[0] and 1 <= r2 <= full[1]):
        raise ValueError(
            f"tucker2 ranks (R1, R2) = ({r1}, {r2}) out of range for a kernel of shape "
            f"{tuple(weight.shape)}: valid are 1 <= R1 <= {full[0]} and 1 <= R2 <= {full[1]}"
        )
    u_out = _leading_left_singular_vectors(unfold(weight, 0), r2)
    u_in = _leading_left_singular_vectors(unfold(weight, 1), r1)
    core = torch.einsum("oi...,or,is->rs...", weight, u_out, u_in)
    return core, u_out, u_in


def reconstruct_tucker2(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """The kernel ``core x_0 u_out x_1 u_in``, shape ``(C_out, C_in, *k)``."""
    return torch.einsum("rs...,or,is->oi...", core, u_out, u_in)


def svd_pair(matrix: torch.Tensor, rank: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD as two factors: ``matrix ~= left @ right``, the best rank-``rank`` approximation.

    The factor on the smaller side is orthonormal: for ``m >= n`` the rows of ``right``
    (rank, n) are the leading right singular vectors and ``left = matrix @ right.T``; for
    ``m < n`` the columns of ``left`` (m, rank) are the leading left singular vectors and
    ``right = left.T @ matrix``.
    """
    full = min(matrix.shape)
    rank = full if rank is None else rank
    if not 1 <= rank <= full:
        raise ValueError(f"svd_pair rank {rank} out of range for a matrix of shape {tuple(matrix.shape)}: valid is 1..{full}")
    if matrix.shape[0] >= matrix.shape[1]:
        v = _leading_eigenvectors(matrix.T @ matrix, rank)
        return matrix @ v, v.T
    u = _leading_eigenvectors(matrix @ matrix.T, rank)
    return u, u.T @ matrix


# --- EVBMF (Nakajima, Sugiyama, Babacan and Tomioka 2013), as used for ranks by Kim et al. 2015 ---


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _free_energy(sigma2: float, s: np.ndarray, L: int, M: int, residual: float, x_bar: float) -> float:
    """The EVB free energy as a function of the noise variance (up to constants)."""
    alpha = L / M
    x = s**2 / (M * sigma2)
    small, large = x[x <= x_bar], x[x > x_bar]
    tau = _tau(large, alpha)
    return float(
        np.sum(small - np.log(small))
        + np.sum(large - tau + np.log((tau + 1) / large) + alpha * np.log(tau / alpha + 1))
        + residual / (M * sigma2)
        + (L - len(s)) * np.log(sigma2)
    )


def evbmf(matrix: torch.Tensor | np.ndarray) -> int:
    """Rank estimate of ``matrix`` by empirical variational Bayesian matrix factorization.

    The noise variance is estimated by minimising the EVB free energy, then every singular
    value above the analytic EVB threshold ``sqrt(M sigma^2 (1 + tau)(1 + alpha / tau))`` counts.
    Returns 0 for a matrix that is pure noise.
    """
    y = matrix.detach().cpu().double().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix, float)
    if y.ndim != 2 or min(y.shape) == 0:
        raise ValueError(f"evbmf expects a non-empty 2-D matrix, got shape {y.shape}")
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    if not np.any(s > 0):
        return 0
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = 0.0  # all L singular values are kept
    upper = float(np.sum(s**2) / (L * M))
    # The noise variance is at least what the smallest "noise-only" singular values imply.
    idx = min(int(math.ceil(L / (1 + alpha))), L - 1)
    lower = max(s[idx] ** 2 / (M * x_bar), float(np.mean(s[idx:] ** 2)) / M, upper * 1e-12)
    if lower >= upper:
        sigma2 = upper
    else:
        sigma2 = minimize_scalar(
            _free_energy, args=(s, L, M, residual, x_bar), bounds=(lower, upper), method="bounded"
        ).x
    threshold = math.sqrt(M * sigma2 * x_bar)
    return int(np.sum(s > threshold))


def vbmf_ranks(weight: torch.Tensor) -> tuple[int, int]:
    """(R1, R2) for Tucker-2 of a kernel from EVBMF of its input- and output-mode unfoldings (>= 1)."""
    r1 = max(1, evbmf(unfold(weight, 1)))
    r2 = max(1, evbmf(unfold(weight, 0)))
    full = tucker2_full_ranks(weight.shape)
    return min(r1, full[0]), min(r2, full[1])
