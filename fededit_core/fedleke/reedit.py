"""FedEdit's re-edit condition (FedLEKE, Zhao et al. 2025, Eq. 8): which received MKVs a client applies.

Three rules (run config ``gate``), on vectors v (``vector``: z as in the paper, or delta):

``paper`` (the authors' code, zongkaiz/FLEKE ``FedEdit/evaluate_main.py`` lines 246 and 297-315):
each *incoming* vector v_j is kept on its own when at least half of the receiver's own vectors
*of the current time slot* O_t are similar to it,

    keep(v_j) = |{ i in O_t : cos(v_i, v_j) > alpha }|  >=  |O_t| / 2        (nothing when O_t is empty)

``set`` (this project's earlier rule): a sender's *whole set* S is kept when at least half of the
receiver's *cumulative* own vectors O have their best match in S above alpha,

    keep(S) = |{ i in O : max_{j in S} cos(v_i, v_j) > alpha }|  >=  |O| / 2

``probe``: each incoming MKV is kept on its own when writing it at the last subject token of one of
the receiver's own prompts moves that prompt's answer by more than tau nats (``fedleke/probe.py``;
it needs the model and the receiver's own requests, so ``Participant.reedit`` decides it).

``none``: every received MKV is applied (the paper's ablation, strategy ``fededit-noreedit``).

Own {a, b, c, d} of one relation (similar to each other), a sender's {b', c', e} with b', c' of
that relation and e unrelated: ``paper`` keeps b' and c' (each is similar to all four own) and
drops e; ``set`` keeps all three, since every own vector has its match among them. delta = z - h_L(base) is the
edit's direction without the subject's hidden state. The defaults are the authors' (``paper`` on z,
alpha 0.4: evaluate_main.py lines 132, 308 and 496); on relation-partitioned CounterFact no alpha of
either rule or vector selects (README, "Why the gate keeps nothing here"). ``DEFAULT_GATE``,
``DEFAULT_VECTOR`` and ``DEFAULT_ALPHA`` are the one default of every caller.
"""

from __future__ import annotations

import torch

GATES = ("paper", "set", "probe", "none")
DEFAULT_GATE = "paper"
VECTORS = ("z", "delta")
DEFAULT_VECTOR = "z"
DEFAULT_ALPHA = 0.4
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


def paper_keep(own_slot: torch.Tensor, incoming: torch.Tensor, alpha: float) -> torch.Tensor:
    """The authors' rule per incoming vector (m,) bool: at least half of the receiver's own vectors of
    the current slot (n, d) have cosine > alpha with it; all False when n == 0."""
    if own_slot.ndim != 2 or incoming.ndim != 2 or own_slot.shape[1] != incoming.shape[1]:
        raise ValueError(
            f"vector sets must be (n, d) and (m, d) with one d, got {tuple(own_slot.shape)} and {tuple(incoming.shape)}"
        )
    if len(own_slot) == 0:
        return torch.zeros(len(incoming), dtype=torch.bool)
    own = torch.nn.functional.normalize(own_slot.double(), dim=1)
    other = torch.nn.functional.normalize(incoming.double(), dim=1)
    similar = (own @ other.T > alpha).sum(dim=0)
    return similar.double() >= len(own_slot) / 2


def kept_rows(
    gate: str, own: torch.Tensor, own_slot: torch.Tensor, incoming: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Which rows (m,) of one sender's set ``incoming`` the rule ``gate`` keeps, given the receiver's
    cumulative own vectors ``own`` (rule ``set``) and those of the current slot ``own_slot`` (``paper``)."""
    if gate == "paper":
        return paper_keep(own_slot, incoming, alpha)
    if gate == "set":
        return torch.full((len(incoming),), reedit_decision(own, incoming, alpha)[0], dtype=torch.bool)
    if gate == "none":
        return torch.ones(len(incoming), dtype=torch.bool)
    if gate == "probe":
        raise ValueError("the probe gate reads the model and the receiver's own prompts: fedleke/probe.py")
    raise ValueError(f"the re-edit condition is one of {list(GATES)}, got {gate!r}")
