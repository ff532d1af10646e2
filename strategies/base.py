"""What every strategy is: one time slot's steps, driven through a ``Session``."""

from __future__ import annotations

from .session import Session
from .validation import FederationSpec


class Strategy:
    name = ""
    # which of the other clients' requests a client's model holds afterwards (for evaluation):
    # "none", "reedited" (the sets it kept) or "all" (a merged global model)
    absorbed = "none"

    def __init__(self, spec: FederationSpec, run: str):
        self.spec, self.run = spec, run

    def run_slot(self, slot: int, session: Session) -> None:
        raise NotImplementedError

    def summary(self) -> dict:
        """Server-side numbers of the run (e.g. stored MKVs)."""
        return {}
