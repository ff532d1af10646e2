"""``local``: no collaboration; every client edits its own requests and shares nothing."""

from __future__ import annotations

from .base import Strategy
from .session import Session


class Local(Strategy):
    name = "local"

    def run_slot(self, slot: int, session: Session) -> None:
        session.broadcast("edit", {"slot": slot, "upload": False}, phase="edit")
