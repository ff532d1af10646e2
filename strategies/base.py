"""What every strategy is: one time slot's steps, driven through a ``Session``, with the server's
position recorded in the store after every phase (``SlotProgress``) so that a restarted server
resumes inside the slot: ``run_slot(slot, session, resume)`` gets the recorded progress of that
slot, or None to run it from its start.

A phase interrupted midway is sent again to all its clients: every client step is idempotent (a
client's checkpoint records the slots it edited, the sets it decided on and the merges it applied),
so a client that already did it answers without doing anything twice.
"""

from __future__ import annotations

import numpy as np

from .session import FederationError, Session
from .store import MKVStore, SlotProgress, StoreError
from .validation import FederationSpec


class Strategy:
    name = ""
    # which of the other clients' requests a client's model holds afterwards (for evaluation):
    # "none", "reedited" (the sets it kept) or "all" (a merged global model)
    absorbed = "none"

    def __init__(self, spec: FederationSpec, run: str, store: MKVStore | None = None):
        self.spec, self.run, self.store = spec, run, store

    def run_slot(self, slot: int, session: Session, resume: SlotProgress | None = None) -> None:
        raise NotImplementedError

    def summary(self) -> dict:
        """Server-side numbers of the run (e.g. stored MKVs)."""
        return {}

    # --- progress -------------------------------------------------------------------------------
    def saved_state(self) -> dict:
        """Counters of the strategy that must survive a restart (JSON)."""
        return {}

    def restore(self, state: dict) -> None:
        """Take back what ``saved_state`` returned before the restart."""

    def progress(
        self,
        session: Session,
        slot: int,
        phase: str = "start",
        served: list[str] | None = None,
        arrays: dict[str, np.ndarray] | None = None,
        **state,
    ) -> SlotProgress:
        left = {c: ledger.failed for c, ledger in session.ledgers.items() if ledger.failed}
        return SlotProgress(
            self.name, slot, phase, list(served or []), {"left": left, **self.saved_state(), **state}, arrays or {}
        )

    def record(self, session: Session, slot: int, phase: str = "start", **kwargs) -> None:
        """Record that the run reached ``phase`` of ``slot`` (``"start"`` of slot s: slots < s are done)."""
        if self.store is None:
            return
        try:
            self.store.save_progress(self.run, self.spec.fingerprint, self.progress(session, slot, phase, **kwargs))
        except StoreError as err:  # the server's own disk: going on would lose the position
            raise FederationError(f"the run stops: {err}") from err
