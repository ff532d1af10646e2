"""``editavg``: the FedAvg-style baseline. Each client edits its slot on the global model and sends
Delta_l per edited layer; the server averages them weighted by edit counts,
Delta_l = sum_c n_c Delta_l^c / sum_c n_c, and every client applies the average.

Phases: ``start`` (updates in), ``apply`` (the average, recorded before it is sent, goes out)."""

from __future__ import annotations

import numpy as np

from .aggregate import edit_average
from .base import Strategy
from .session import Session
from .store import SlotProgress
from .validation import UploadError, check_count, validate_delta_upload


class EditAvg(Strategy):
    name = "editavg"
    absorbed = "all"

    def _average(self, slot: int, session: Session) -> dict[str, np.ndarray]:
        replies = session.broadcast("editavg_update", {"slot": slot}, phase="edit")
        updates = []
        for client, reply in replies.items():
            try:
                validate_delta_upload(client, str(reply.body.get("fingerprint")), reply.arrays, self.spec)
                n = reply.body.get("n")
                check_count(client, n, self.spec, slot)
            except UploadError as err:
                session.reject(client, str(err))
                continue
            updates.append((n, reply.arrays))
        if any(n > 0 for n, _ in updates):
            return {k: v.astype(np.float32) for k, v in edit_average(updates).items()}
        return {f"delta.{l}": np.zeros((self.spec.d_model, self.spec.d_ff), np.float32) for l in self.spec.layers}

    def run_slot(self, slot: int, session: Session, resume: SlotProgress | None = None) -> None:
        if resume is not None and resume.phase == "apply":
            average = resume.arrays
        else:
            average = self._average(slot, session)
            self.record(session, slot, "apply", arrays=average)
        session.broadcast("editavg_apply", {"slot": slot}, average, phase="merge")
        self.record(session, slot + 1)
