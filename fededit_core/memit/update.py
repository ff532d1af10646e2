"""MEMIT's closed-form layer update (Meng et al. 2023, Eq. 14):

    Delta = R K^T (lambda C0 + K K^T)^-1,   the minimiser of |Delta K - R|^2 + lambda tr(Delta C0 Delta^T),

from the sufficient statistics R K^T and K K^T (sums over requests, so over clients too: CollabEdit).
Both have rank <= n (the requests): ``thin_factors`` carries them in n (d + d_ff) numbers instead of
d d_ff + d_ff^2.
"""

from __future__ import annotations

import numpy as np
import torch

STATISTICS_FORMS = ("lowrank", "dense")  # how CollabEdit's statistics travel (run config collab-transport)
DEFAULT_STATISTICS_FORM = "lowrank"


def layer_statistics(keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R K^T, K K^T) in float64 from keys (n, d_ff) and residuals (n, d): sums over requests."""
    keys, resid = keys.double(), resid.double()
    return resid.T @ keys, keys.T @ keys


def thin_factors(k: np.ndarray, r: np.ndarray, rtol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """(K V, R V), float64, from K (d_ff, m) and R (d, m), where K = U S V^T is the thin SVD without
    the singular values below ``rtol`` times the largest; then

        (R V)(K V)^T = R K^T,   (K V)(K V)^T = K K^T,   in rank(K) <= m columns.

    K V = U S is fixed by K K^T (up to the signs of its columns, and rotations among equal singular
    values), and R V = (R K^T) U S^-1: the factor tells its reader what the two statistics tell, no more.
    """
    k, r = np.asarray(k, dtype=np.float64), np.asarray(r, dtype=np.float64)
    if k.ndim != 2 or r.ndim != 2 or k.shape[1] != r.shape[1]:
        raise ValueError(f"K {k.shape} and R {r.shape} must be matrices with one column per request")
    if k.shape[1] == 0:
        return k, r
    u, s, vt = np.linalg.svd(k, full_matrices=False)
    keep = s > rtol * s[0] if s[0] > 0 else np.zeros(len(s), dtype=bool)
    return u[:, keep] * s[keep], r @ vt[keep].T


def statistics_from_factors(kf: np.ndarray, rf: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(R K^T, K K^T) in float64 from thin factors K V (d_ff, r) and R V (d, r)."""
    kf, rf = torch.from_numpy(np.asarray(kf, dtype=np.float64)), torch.from_numpy(np.asarray(rf, dtype=np.float64))
    return rf @ kf.T, kf @ kf.T


def solve_update(
    rk: torch.Tensor, kk: torch.Tensor, c0: torch.Tensor, mom2_weight: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Delta = (R K^T)(lambda C0 + K K^T)^-1, (d, d_ff), float64; ``prior`` replaces lambda C0 when given
    (CollabEdit's dynamic covariance)."""
    if prior is None:
        prior = mom2_weight * c0.to(device=kk.device, dtype=torch.float64)
    a = prior.to(device=kk.device, dtype=torch.float64) + kk.double()
    if not torch.isfinite(a).all() or not torch.isfinite(rk).all():
        raise ValueError("MEMIT statistics hold NaN or infinite values")
    return torch.linalg.solve(a, rk.double().T).T  # a is symmetric


def update_factors(
    keys: torch.Tensor, resid: torch.Tensor, c0: torch.Tensor, mom2_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's two factors, Delta = R A^T: A = (lambda C0 + K K^T)^-1 K (d_ff, n) and R (d, n), float64
    (zongkaiz/FLEKE memit/memit_main_avg.py lines 213-218 keep them apart as ``adj_k`` and ``resid``)."""
    keys, resid = keys.double(), resid.double()
    a = mom2_weight * c0.to(device=keys.device, dtype=torch.float64) + keys.T @ keys
    return torch.linalg.solve(a, keys.T), resid.T


def memit_delta(keys: torch.Tensor, resid: torch.Tensor, c0: torch.Tensor, mom2_weight: float) -> torch.Tensor:
    """The minimiser of |Delta K - R|^2 + lambda tr(Delta C0 Delta^T) (Eq. 14)."""
    return solve_update(*layer_statistics(keys, resid), c0, mom2_weight)


def positive_semidefinite(kk: np.ndarray, tolerance: float = 1e-5) -> bool:
    """K K^T is symmetric PSD up to float32 rounding: (K K^T + K K^T^T)/2 + tolerance * max|K K^T| * I
    has a Cholesky factor (float64), as (lambda C0 + K K^T) must be invertible for Delta."""
    kk = np.asarray(kk, dtype=np.float64)
    if kk.ndim != 2 or kk.shape[0] != kk.shape[1]:
        return False
    scale = max(1.0, float(np.abs(kk).max(initial=0.0)))
    try:
        np.linalg.cholesky((kk + kk.T) / 2 + tolerance * scale * np.eye(len(kk)))
    except np.linalg.LinAlgError:
        return False
    return True
