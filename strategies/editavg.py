"""``editavg``: the FedAvg-style baseline. Each client edits its slot on the global model and sends
Delta_l per edited layer; the server averages them weighted by edit counts,
Delta_l = sum_c n_c Delta_l^c / sum_c n_c, and every client applies the average."""

from __future__ import annotations

import numpy as np

from .aggregate import edit_average
from .base import Strategy
from .session import Session
from .validation import UploadError, check_count, validate_delta_upload


class EditAvg(Strategy):
    name = "editavg"
    absorbed = "all"

    def run_slot(self, slot: int, session: Session) -> None:
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
            average = {k: v.astype(np.float32) for k, v in edit_average(updates).items()}
        else:
            average = {
                f"delta.{l}": np.zeros((self.spec.d_model, self.spec.d_ff), np.float32) for l in self.spec.layers
            }
        session.broadcast("editavg_apply", {"slot": slot}, average, phase="merge")
