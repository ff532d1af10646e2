"""``local``: no collaboration; every client edits its own requests and shares nothing."""

from __future__ import annotations

from .base import Strategy
from .session import Session
from .store import SlotProgress


class Local(Strategy):
    name = "local"

    def run_slot(self, slot: int, session: Session, resume: SlotProgress | None = None) -> None:
        session.broadcast("edit", {"slot": slot, "upload": False}, phase="edit")
        self.record(session, slot + 1)
