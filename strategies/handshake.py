"""First contact: every client must hold the same base model, templates, C0 corpus and settings."""

from __future__ import annotations

from .session import FederationError
from .validation import FederationSpec

# what must be equal across clients (from each client's ``hello`` reply)
MUST_AGREE = ("fingerprint", "templates", "covariance", "hparams", "d_model", "d_ff", "layers", "kind")


def check_agreement(hellos: dict[str, dict], num_slots: int) -> FederationSpec:
    """The federation's spec, or ``FederationError`` naming which clients differ in what."""
    if not hellos:
        raise FederationError("no client answered the handshake")
    names = sorted(hellos)
    reference = hellos[names[0]]
    problems = []
    for key in MUST_AGREE:
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(repr(hellos[name].get(key)), []).append(name)
        if len(groups) > 1:
            detail = "; ".join(f"{clients}: {value[:120]}" for value, clients in groups.items())
            problems.append(f"{key} differs ({detail})")
    for name in names:
        if len(hellos[name].get("slot_sizes", [])) != num_slots:
            problems.append(
                f"{name} splits its requests into {len(hellos[name].get('slot_sizes', []))} slots, "
                f"the run has {num_slots}"
            )
    if problems:
        raise FederationError("clients disagree, the run stops: " + " | ".join(problems))
    return FederationSpec(
        fingerprint=reference["fingerprint"],
        d_model=int(reference["d_model"]),
        d_ff=int(reference["d_ff"]),
        layers=tuple(int(l) for l in reference["layers"]),
    )
