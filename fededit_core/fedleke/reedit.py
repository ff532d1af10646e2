"""FedEdit's re-edit condition (FedLEKE, Zhao et al. 2025, Eq. 8).

A client keeps a sender's MKV set when at least half of its own z vectors are similar to that set:

    keep(S) = |{ i : max_{j in S} cos(z_i, z_j) > alpha }| / |Z_own|  >=  1/2

Each own z is compared with its best match in the sender's set (the max over the set), so one
related fact in a large set counts, and unrelated sets are left out. The vectors compared are z
(the paper) or delta = z - h_L(base), the edit's own direction without the subject's hidden state,
which separates related from unrelated edits on SmolLM2-135M where z does not (README, "What Eq. 8
compares"): ``DEFAULT_VECTOR`` and ``DEFAULT_ALPHA`` are the one default of every caller.
"""

from __future__ import annotations

import torch

VECTORS = ("z", "delta")
DEFAULT_VECTOR = "delta"
DEFAULT_ALPHA = 0.22  # README, "What Eq. 8 compares": separates the built-in set's related pairs on delta
# a receiver rolls back a re-edit that raises the target NLL of any of its own edits by more than
# this many nats (that target's probability falls by more than a factor e)
DEFAULT_ROLLBACK_MARGIN = 1.0
# a reused z (another client's, served for a matching tag) is taken only when, written into the
# receiver's own model, it gives the target at least this probability; otherwise the receiver
# optimises its own z and reports the tag. Honest reused z give ~0.95 (the optimisation's stop
# probability) and unrelated or poisoned ones below 0.1 on SmolLM2 (README, "Poisoning bounded").
DEFAULT_REUSE_MIN_PROB = 0.5


def best_match_similarity(own_z: torch.Tensor, sender_z: torch.Tensor) -> torch.Tensor:
    """For each own z (n, d): the highest cosine similarity with any z of the sender (m, d)."""
    if own_z.ndim != 2 or sender_z.ndim != 2 or own_z.shape[1] != sender_z.shape[1]:
        raise ValueError(
            f"z sets must be (n, d) and (m, d) with one d, got {tuple(own_z.shape)} and {tuple(sender_z.shape)}"
        )
    own = torch.nn.functional.normalize(own_z.double(), dim=1)
    sender = torch.nn.functional.normalize(sender_z.double(), dim=1)
    return (own @ sender.T).max(dim=1).values


def reedit_decision(own_z: torch.Tensor, sender_z: torch.Tensor, alpha: float) -> tuple[bool, float]:
    """(keep the sender's set?, fraction of own z with a match above alpha)."""
    if len(sender_z) == 0:
        return False, 0.0
    if len(own_z) == 0:
        return False, 0.0  # nothing of one's own to compare with: no evidence of relatedness
    fraction = float((best_match_similarity(own_z, sender_z) > alpha).double().mean())
    return fraction >= 0.5, fraction
