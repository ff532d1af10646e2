"""``collabedit``: CollabEdit's non-destructive merge (Zheng et al., ICLR 2025).

For each edited layer l in order: every client sends R_c K_c^T and K_c K_c^T of its slot's requests,
read on the current shared model; the server sums them and returns the sums; every client applies
Delta_l = (sum_c R_c K_c^T)(lambda C0 + sum_c K_c K_c^T)^-1 with its identical C0 and reads the next
layer's statistics on the updated model. The merged model equals one MEMIT edit of all the clients'
requests together. One exchange carries "apply layer i, then send layer i+1".
"""

from __future__ import annotations

import numpy as np

from .aggregate import sum_statistics
from .base import Strategy
from .session import Session
from .validation import UploadError, validate_stats_upload


class CollabEdit(Strategy):
    name = "collabedit"
    absorbed = "all"

    def run_slot(self, slot: int, session: Session) -> None:
        layers = self.spec.layers
        replies = session.broadcast("collab", {"slot": slot, "stats": 0}, phase="edit")
        for i, layer in enumerate(layers):
            parts = []
            for client, reply in replies.items():
                try:
                    validate_stats_upload(client, str(reply.body.get("fingerprint")), reply.arrays, self.spec, layer)
                except UploadError as err:
                    session.reject(client, str(err))
                    continue
                parts.append(reply.arrays)
            sums = {k: v.astype(np.float32) for k, v in sum_statistics(parts).items()}
            follow = i + 1 if i + 1 < len(layers) else None
            replies = session.broadcast("collab", {"slot": slot, "apply": i, "stats": follow}, sums, phase="merge")
