"""Tensor maths: Tucker-2 by HOSVD, SVD pairs, reconstruction, composing and merging factor
kernels, and EVBMF rank estimates.

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
    "compute_dtype",
    "compose",
    "merge",
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


def _leading_eigenvectors(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading eigenvectors of ``matrix @ matrix.T``, as columns, largest first.

    The Gram matrix is formed and diagonalised in float64 whatever the input's dtype: it squares
    the condition number, and in float32 that measurably worsened truncations.
    """
    work = matrix.cpu() if matrix.device.type == "mps" else matrix  # MPS has no float64
    work = work.double()
    _, vecs = torch.linalg.eigh(work @ work.T)
    return vecs.flip(-1)[:, :rank].to(dtype=matrix.dtype, device=matrix.device)


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
    return _leading_eigenvectors(matrix, rank)


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
        v = _leading_eigenvectors(matrix.T, rank)
        return matrix @ v, v.T
    u = _leading_eigenvectors(matrix, rank)
    return u, u.T @ matrix


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision the maths runs in: float64 for float64 weights, float32 for all others (fp16, bf16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compose(first: torch.Tensor, last: torch.Tensor, core: Optional[torch.Tensor] = None,
            groups: int = 1) -> torch.Tensor:
    """The one kernel that applying ``first``, ``core`` (if any) and ``last`` in turn amounts to.

    Linear weights ``first: (R, in)``, ``last: (out, R)`` give ``last @ first``. Conv kernels are
    grouped alike: ``first: (g R1, C_in/g, *k1)`` (1x1 before a core; kxk for a kxk conv's SVD
    pair), ``core: (g R2, R1, *k)``, ``last: (C_out, R2, 1, ...)``; the result is
    ``(C_out, C_in/g, *k)``, in :func:`compute_dtype` of ``first``.
    """
    dtype = compute_dtype(first.dtype)
    f, l_ = first.detach().to(dtype), last.detach().to(dtype)
    if f.dim() == 2:
        return l_ @ f
    g = groups
    f = f.reshape(g, f.shape[0] // g, *f.shape[1:])  # (g, R1, C_in/g, *k1)
    l_ = l_.reshape(g, l_.shape[0] // g, l_.shape[1])  # (g, C_out/g, R2)
    if core is None:
        weight = torch.einsum("gor,gri...->goi...", l_, f)
    else:
        c = core.detach().to(dtype)
        c = c.reshape(g, c.shape[0] // g, *c.shape[1:])  # (g, R2, R1, *k)
        weight = torch.einsum("gos,gsr...,gri->goi...", l_, c, f.reshape(*f.shape[:3]))
    return weight.reshape(-1, *weight.shape[2:])


def compose_scaled(last: torch.Tensor, first: torch.Tensor, core: Optional[torch.Tensor] = None, *,
                   scale_in: torch.Tensor, scale_out: torch.Tensor) -> torch.Tensor:
    """The kernel of ``first``, ``core`` and ``last`` (ungrouped) with the components scaled, kept
    differentiable (no detach, no dtype change): the training view's kernel of a gated layer.

    Tucker-2 (``core`` given): ``last[:, s] * scale_out[s]``, ``core``, ``scale_in[r] * first[r]``, with
    ``first: (R1, C_in, 1, ...)``, ``core: (R2, R1, *k)``, ``last: (C_out, R2, 1, ...)``. An SVD pair:
    ``last: (C_out, R)`` scaled by ``scale_out * scale_in``, then ``first: (R, C_in, *k)``.
    """
    l_ = last.flatten(1)
    if core is not None:
        return torch.einsum("os,sr...,ri->oi...", l_ * scale_out, core, scale_in[:, None] * first.flatten(1))
    return torch.einsum("or,ri...->oi...", l_ * (scale_out * scale_in), first)


def merge(core: torch.Tensor, factor: torch.Tensor, into: str, groups: int = 1,
          core_bias: Optional[torch.Tensor] = None,
          factor_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Tucker-1: the kernel and bias of a grouped 1x1 ``factor`` multiplied into the ``core`` kernel.

    ``into="first"``: ``core(first(x))`` with ``factor = first: (g R1, C_in/g, 1, ...)`` (no bias:
    before the core's zero padding it would not commute); the kernel is ``(g R2, C_in/g, *k)``
    and the bias ``core_bias``. ``into="last"``: ``last(core(x))`` with ``factor = last:
    (C_out, R2, 1, ...)``; the kernel is ``(C_out, R1, *k)`` and the bias ``last`` applied to
    ``core_bias`` plus ``factor_bias`` (None when neither is given). ``core: (g R2, R1, *k)``.
    Results in :func:`compute_dtype` of ``core`` (``core_bias`` for ``into="first"`` as given).
    """
    if into not in ("first", "last"):
        raise ValueError(f"merge: into must be 'first' or 'last', got {into!r}")
    g = groups
    dtype = compute_dtype(core.dtype)
    c = core.detach().to(dtype)
    c = c.reshape(g, c.shape[0] // g, *c.shape[1:])  # (g, R2, R1, *k)
    m = factor.detach().to(dtype).reshape(g, factor.shape[0] // g, -1)  # first: (g, R1, C_in/g); last: (g, C_out/g, R2)
    if into == "first":
        weight = torch.einsum("gsr...,gri->gsi...", c, m)
        return weight.reshape(-1, *weight.shape[2:]), core_bias
    weight = torch.einsum("gos,gsr...->gor...", m, c)
    bias = None
    if core_bias is not None or factor_bias is not None:
        bias = torch.zeros(factor.shape[0], dtype=dtype, device=core.device)
        if core_bias is not None:  # last(core(x) + b) = last(core(x)) + last's weight applied to b
            bias += torch.einsum("gos,gs->go", m, core_bias.detach().to(dtype).reshape(g, -1)).reshape(-1)
        if factor_bias is not None:
            bias += factor_bias.detach().to(dtype)
    return weight.reshape(-1, *weight.shape[2:]), bias


# --- EVBMF (Nakajima, Sugiyama, Babacan and Tomioka 2013), as used for ranks by Kim et al. 2015 ---

_GRID_POINTS = 1024  # uniform in log sigma^2 over the admissible interval
_PIECE_POINTS = 8  # more per piece on which the set of components above threshold is fixed
_REFINED_PIECES = 4  # pieces, best on the grid first, refined by a bounded 1-D minimisation


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _free_energy(t: np.ndarray, s2: np.ndarray, M: int, alpha: float, x_bar: float) -> np.ndarray:
    """The EVB free energy at noise variances ``exp(t)`` (any shape), up to a constant.

    ``-log x_h = log sigma^2 + log M - log gamma_h^2`` for every component, so the constants
    are dropped and the ``log sigma^2`` terms collect into ``L t``: exact, and finite when some
    singular values are zero.
    """
    t = np.asarray(t, float)
    x = s2 / (M * np.exp(t)[..., None])
    large = x > x_bar
    xl = np.where(large, x, x_bar + 1.0)  # any value in tau's domain; masked out below
    tau = _tau(xl, alpha)
    per = np.where(large, x - tau + np.log1p(tau) + alpha * np.log1p(tau / alpha), x)
    return per.sum(-1) + len(s2) * t


def evbmf(matrix: torch.Tensor | np.ndarray) -> int:
    """Rank estimate of ``matrix`` by empirical variational Bayesian matrix factorization.

    The noise variance is the global minimiser of the EVB free energy over the interval in which
    Nakajima et al. (2013) show it lies; every singular value above the EVB threshold
    ``sqrt(M sigma^2 (1 + tau)(1 + alpha / tau))`` counts, with their code's approximation
    ``tau = 2.5129 sqrt(alpha)``. The search runs on singular values divided by the largest and
    in ``log sigma^2``, so the rank is the same for the matrix times any positive factor.
    Returns 0 for a matrix that is pure noise.
    """
    if isinstance(matrix, torch.Tensor):
        y = matrix.detach().cpu().double().numpy()
    else:
        y = np.asarray(matrix, float)
    if y.ndim != 2 or min(y.shape) == 0:
        raise ValueError(f"evbmf expects a non-empty 2-D matrix, got shape {y.shape}")
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    if not s[0] > 0:
        return 0
    s2 = (s / s[0]) ** 2  # the free energy depends on s^2 / sigma^2 only: the rank is scale-free
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    upper = float(np.sum(s2) / (L * M))
    # Their bound: with H = ceil(L / (1 + alpha)) - 1, sigma^2 >= max(gamma_{H+1}^2 / (M x_bar),
    # mean_{h > H} gamma_h^2 / M), 1-based; 0-based that is index H.
    idx = int(math.ceil(L / (1 + alpha))) - 1
    lower = max(s2[idx] / (M * x_bar), float(np.mean(s2[idx:])) / M, upper * 1e-12)
    if lower >= upper:
        sigma2 = upper
    else:
        t = _minimise_free_energy(math.log(lower), math.log(upper), s2, M, alpha, x_bar)
        sigma2 = math.exp(t)
    return int(np.sum(s2 > M * sigma2 * x_bar))


def _minimise_free_energy(
    lo: float, hi: float, s2: np.ndarray, M: int, alpha: float, x_bar: float
) -> float:
    """Global minimiser in ``t = log sigma^2`` over ``[lo, hi]``: a grid, best pieces refined."""
    # Between the knots where some gamma_h^2 / (M sigma^2) crosses x_bar the free energy is
    # smooth and the rank fixed, but it has a local minimum in several pieces: a bounded local
    # search (as in the published code) may stop in the wrong one, so every piece is sampled.
    knots = np.log(s2[s2 > 0] / (M * x_bar))
    knots = np.unique(np.concatenate([[lo, hi], knots[(knots > lo) & (knots < hi)]]))
    frac = (np.arange(_PIECE_POINTS) + 0.5) / _PIECE_POINTS
    in_pieces = knots[:-1, None] + np.diff(knots)[:, None] * frac
    grid = np.unique(np.concatenate([np.linspace(lo, hi, _GRID_POINTS), in_pieces.ravel()]))
    energy = _free_energy(grid, s2, M, alpha, x_bar)
    piece = np.clip(np.searchsorted(knots, grid, side="right") - 1, 0, len(knots) - 2)
    best_t, best_f = float(grid[np.argmin(energy)]), float(np.min(energy))
    refined: set[int] = set()
    for i in np.argsort(energy):
        if piece[i] in refined:
            continue
        refined.add(piece[i])
        # Bracket the piece's grid minimum by its neighbours, kept inside the piece.
        a = max(grid[max(i - 1, 0)], knots[piece[i]])
        b = min(grid[min(i + 1, len(grid) - 1)], knots[piece[i] + 1])
        if b > a:
            res = minimize_scalar(
                lambda t: float(_free_energy(t, s2, M, alpha, x_bar)),
                bounds=(a, b), method="bounded", options={"xatol": 1e-10},
            )
            if res.fun < best_f:
                best_t, best_f = float(res.x), float(res.fun)
        if len(refined) == _REFINED_PIECES:
            break
    return best_t


def vbmf_ranks(weight: torch.Tensor) -> tuple[int, int]:
    """(R1, R2) for Tucker-2 of a kernel from EVBMF of its input- and output-mode unfoldings (>= 1)."""
    r1 = max(1, evbmf(unfold(weight, 1)))
    r2 = max(1, evbmf(unfold(weight, 0)))
    full = tucker2_full_ranks(weight.shape)
    return min(r1, full[0]), min(r2, full[1])
