"""CollabEdit's remedy for forgetting across rounds, dynamic covariance (Zheng et al., ICLR 2025, Eq. 7):
the keys of the edits already made join C0, so that a later slot is solved against them,

    Delta = (R K^T) (lambda (beta0 C0 + beta1 sum_old K_old K_old^T) + K K^T)^-1.

The authors' code (LINs-lab/CollabEdit ``experiments/merging_multiRound.py`` lines 328-343 and 378)
adds ``mom2_update_weight * K K^T`` of every round's keys to ``mom2_update_weight * C0``: beta0 = beta1
= 1 here. beta1 = 0 is plain MEMIT (the federation then equals centralised MEMIT slot by slot).
The memory of old keys is kept as a thin factor F (d_ff, r) with F F^T = sum_old K_old K_old^T.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_BETA0 = 1.0
DEFAULT_BETA1 = 0.0  # off: CollabEdit stays one centralised MEMIT edit per slot
MAX_BETA = 1e3


def psd_factor(kk: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """F (d_ff, r), float64, with F F^T = K K^T: the eigenvectors of the symmetric PSD ``kk`` scaled by
    the square roots of its eigenvalues above ``rtol`` times the largest."""
    kk = np.asarray(kk, dtype=np.float64)
    values, vectors = np.linalg.eigh((kk + kk.T) / 2)
    top = values.max(initial=0.0)
    keep = values > rtol * top if top > 0 else np.zeros(len(values), dtype=bool)
    return vectors[:, keep] * np.sqrt(values[keep])


def dynamic_prior(
    c0: torch.Tensor, memory: torch.Tensor | None, mom2_weight: float, beta0: float, beta1: float
) -> torch.Tensor:
    """lambda (beta0 C0 + beta1 F F^T), float64, from the memory factor F of the old keys (or none)."""
    prior = beta0 * c0.double()
    if memory is not None and memory.shape[1] and beta1:
        f = memory.to(device=prior.device, dtype=torch.float64)
        prior = prior + beta1 * (f @ f.T)
    return mom2_weight * prior
