"""First contact: every client must hold the same base model, templates, C0 corpus and settings."""

from __future__ import annotations

from .session import FederationError
from .validation import FederationSpec

# what must be equal across clients (from each client's ``hello`` reply)
# key_proof: HMAC of the federation secret over the server's nonce (fededit_core/fedleke/sealing.py),
# so equal proofs mean one secret; a client with another secret, or none, differs in it
MUST_AGREE = ("fingerprint", "templates", "covariance", "hparams", "d_model", "d_ff", "layers", "kind", "key_proof")
WHY = {"key_proof": "the federation secret (another one, or none)"}


def _clamp(hparams: dict) -> float | None:
    value = hparams.get("clamp_norm_factor")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def _own_problem(hello: dict, num_slots: int) -> str | None:
    """What is inconsistent in one client's own handshake, or None."""
    sizes = hello.get("slot_sizes", [])
    if sum(sizes) != hello.get("n_requests"):
        return "its slot sizes do not add up to its number of requests"
    if len(sizes) != num_slots:
        return f"it splits its requests into {len(sizes)} slots, the run has {num_slots}"
    return None


def check_agreement(hellos: dict[str, dict], num_slots: int) -> tuple[FederationSpec, dict[str, str]]:
    """The federation's spec and the clients left out of it, with the reason for each.

    A client whose own handshake is inconsistent is left out. The others must agree on every
    ``MUST_AGREE`` value: the clients that share a strict majority's values form the federation and
    the rest are left out (a hostile or misconfigured member cannot stop the run); without a strict
    majority, ``FederationError`` names which clients differ in what."""
    if not hellos:
        raise FederationError("no client answered the handshake")
    left_out = {name: p for name in sorted(hellos) if (p := _own_problem(hellos[name], num_slots))}
    names = [name for name in sorted(hellos) if name not in left_out]
    if not names:
        raise FederationError(
            "clients disagree, the run stops: " + " | ".join(f"{n}: {p}" for n, p in left_out.items())
        )
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(repr([hellos[name].get(key) for key in MUST_AGREE]), []).append(name)
    majority = max(groups.values(), key=len)
    if len(majority) * 2 <= len(names):
        problems = []
        for key in MUST_AGREE:
            values: dict[str, list[str]] = {}
            for name in names:
                values.setdefault(repr(hellos[name].get(key)), []).append(name)
            if len(values) > 1:
                detail = "; ".join(f"{clients}: {value[:120]}" for value, clients in values.items())
                problems.append(f"{WHY.get(key, key)} differs ({detail})")
        raise FederationError("clients disagree, the run stops: " + " | ".join(problems))
    reference = hellos[majority[0]]
    for name in names:
        if name not in majority:
            keys = [WHY.get(key, key) for key in MUST_AGREE if hellos[name].get(key) != reference.get(key)]
            left_out[name] = f"it differs from the majority {majority} in {keys}"
    return (
        FederationSpec(
            fingerprint=reference["fingerprint"],
            d_model=int(reference["d_model"]),
            d_ff=int(reference["d_ff"]),
            layers=tuple(int(l) for l in reference["layers"]),
            slot_sizes={name: tuple(hellos[name]["slot_sizes"]) for name in majority},
            clamp_norm_factor=_clamp(reference.get("hparams", {})),
        ),
        left_out,
    )
