"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the preserved keys.

P = U0 U0^T, U0 the eigenvectors of C0 whose eigenvalues lie below ``threshold``
(jianghoucheng/AlphaEdit ``experiments/evaluate.py`` ``get_project``, lines 405-422: the SVD of the
raw covariance E[k k^T], which for a symmetric PSD matrix gives its eigenvalues). Then per layer

    Delta^T = (P (K K^T + K_p K_p^T) + L2 I)^-1 P K R^T          (``AlphaEdit/AlphaEdit_main.py`` 130-132)

with K_p K_p^T the keys written before (``cache_c``, lines 146-148). (P M + L2 I) maps the range of P
into itself, so the rows of Delta lie in it and Delta k0 = 0 for every k0 in C0's principal space:
what the model knew is left as it was, and the earlier edits' keys are solved against.
Linear in (R K^T, K K^T), so CollabEdit's summed statistics give the global AlphaEdit edit.
"""

from __future__ import annotations

import torch

DEFAULT_NULLSPACE_THRESHOLD = 2e-2  # hparams/AlphaEdit/{EleutherAI_gpt-j-6B,Llama3-8B}.json "nullspace_threshold"
DEFAULT_ALPHAEDIT_L2 = 10.0  # the same files' "L2"


def null_space_basis(c0: torch.Tensor, threshold: float) -> torch.Tensor:
    """U0 (d_ff, r), float64: the orthonormal eigenvectors of C0 with eigenvalue < ``threshold``."""
    c0 = c0.double()
    values, vectors = torch.linalg.eigh((c0 + c0.T) / 2)
    return vectors[:, values < threshold].contiguous()


def alphaedit_update(
    rk: torch.Tensor, kk: torch.Tensor, projection: torch.Tensor, memory: torch.Tensor | None, l2: float
) -> torch.Tensor:
    """Delta (d, d_ff), float64, from R K^T (d, d_ff), K K^T (d_ff, d_ff), the projection P = U0 U0^T
    and the earlier keys' K_p K_p^T (or None)."""
    if not torch.isfinite(kk).all() or not torch.isfinite(rk).all():
        raise ValueError("AlphaEdit statistics hold NaN or infinite values")
    device = kk.device
    p = projection.to(device=device, dtype=torch.float64)
    m = kk.double() if memory is None else kk.double() + memory.to(device=device, dtype=torch.float64)
    a = p @ m + l2 * torch.eye(len(p), dtype=torch.float64, device=device)
    return torch.linalg.solve(a, p @ rk.double().T).T
