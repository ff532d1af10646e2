"""Bounds that a received MKV set must keep before a receiver applies it (poisoning defences).

MEMIT clamps each request's shift to ``|z - h| <= c |h|`` (c = clamp_norm_factor) at the subject's
hidden state h on the model being edited (``memit/target.py``). An uploaded delta is taken against
the *base* model's h_b. When the sender had already edited the same subject once, its h is that
earlier z, so |h| <= (1 + c)|h_b| and |h - h_b| <= c |h_b|, and every honest MKV keeps

    |delta_i| <= c (c + 2) |h_i|,    h_i = z_i - delta_i (the base state)          (1)

which the server and every receiver check (a chain of more edits of one subject at one client can
exceed it and is refused). A correction c_i^l (``mkv.py``) is the gap between two estimates of the
same edit's effect on h_L, each at most one such shift, so every honest one keeps

    |c_i^l| <= 2 c (c + 2) |h_i|                                                      (1')

(1) alone lets a poisoner inflate h as well, so the receiver also holds
the sender's h and keys to its own scale:

    |h_i| <= H_SLACK * max_own |h|,    |k_i^l| <= H_SLACK * max_own |k^l|          (2)

(2) needs own MKVs to compare with; a receiver without any checks (1) only.
"""

from __future__ import annotations

import torch

from fededit_core.fedleke.mkv import MKVSet

H_SLACK = 3.0  # a received |h| or |k| may be at most this many times the receiver's own largest


def shift_limit(clamp_norm_factor: float) -> float:
    """The factor of (1): c (c + 2)."""
    return clamp_norm_factor * (clamp_norm_factor + 2)


def shift_bound_violations(z: torch.Tensor, delta: torch.Tensor, clamp_norm_factor: float) -> list[int]:
    """Rows i where |delta_i| > c (c + 2) |z_i - delta_i| (1)."""
    z, delta = z.double(), delta.double()
    limit = shift_limit(clamp_norm_factor) * (z - delta).norm(dim=1) * (1 + 1e-6)
    return torch.nonzero(delta.norm(dim=1) > limit).flatten().tolist()


def correction_bound_violations(
    z: torch.Tensor, delta: torch.Tensor, corrections: torch.Tensor, clamp_norm_factor: float
) -> list[int]:
    """Rows i with some |c_i^l| > 2 c (c + 2) |z_i - delta_i| (1')."""
    h = (z.double() - delta.double()).norm(dim=1)
    largest = corrections.double().norm(dim=2).max(dim=1).values
    return torch.nonzero(largest > 2 * shift_limit(clamp_norm_factor) * h * (1 + 1e-6)).flatten().tolist()


def out_of_bounds(received: MKVSet, own: MKVSet | None, clamp_norm_factor: float) -> str | None:
    """Why ``received`` breaks (1), (1') or (2) against the receiver's ``own`` MKVs, or None."""
    bad = shift_bound_violations(received.z, received.delta, clamp_norm_factor)
    if bad:
        return f"{len(bad)} shift(s) larger than {shift_limit(clamp_norm_factor):g} |h|"
    bad = correction_bound_violations(received.z, received.delta, received.wire_corrections(), clamp_norm_factor)
    if bad:
        return f"{len(bad)} correction(s) larger than {2 * shift_limit(clamp_norm_factor):g} |h|"
    if own is None or len(own) == 0 or len(received) == 0:
        return None
    own_h = (own.z - own.delta).double().norm(dim=1).max()
    got_h = (received.z - received.delta).double().norm(dim=1).max()
    if got_h > H_SLACK * own_h:
        return f"|h| up to {float(got_h):.3g}, more than {H_SLACK:g} x this client's largest {float(own_h):.3g}"
    own_k = own.keys.double().norm(dim=2).max(dim=0).values  # per layer
    got_k = received.keys.double().norm(dim=2).max(dim=0).values
    if bool((got_k > H_SLACK * own_k).any()):
        return f"keys larger than {H_SLACK:g} x this client's largest at some edited layer"
    return None
