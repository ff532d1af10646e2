"""``editavg``: the FedAvg-style baseline. Each client edits its slot on the global model and sends
Delta_l per edited layer; the server averages them weighted by edit counts,
Delta_l = sum_c n_c Delta_l^c / sum_c n_c, and every client applies the average. ``editavg-factors``
averages MEMIT's two factors instead (the FedLEKE authors' MEMITAvg). ``sa``, ``ta`` and ``ties`` are
CollabEdit's destructive baselines over the same uploads (``aggregate.merge_updates``).

Phases: ``start`` (updates in), ``apply`` (the average, recorded before it is sent, goes out)."""

from __future__ import annotations

import numpy as np

from .aggregate import edit_average, factor_average, merge_updates
from .base import Strategy
from .session import Session
from .store import SlotProgress
from .validation import UploadError, check_count, validate_delta_upload, validate_factor_upload


class EditAvg(Strategy):
    name = "editavg"
    absorbed = "all"
    step = "editavg_update"

    def _validate(self, client: str, reply, n: int) -> None:
        validate_delta_upload(client, str(reply.body.get("fingerprint")), reply.arrays, self.spec)

    def _combine(self, updates: list[tuple[int, dict]]) -> dict[str, np.ndarray]:
        return edit_average(updates)

    def _average(self, slot: int, session: Session) -> dict[str, np.ndarray]:
        replies = session.broadcast(self.step, {"slot": slot}, phase="edit")
        updates = []
        for client, reply in replies.items():
            try:
                n = reply.body.get("n")
                check_count(client, n, self.spec, slot)
                self._validate(client, reply, n)
            except UploadError as err:
                session.reject(client, str(err))
                continue
            updates.append((n, reply.arrays))
        if any(n > 0 for n, _ in updates):
            return {k: v.astype(np.float32) for k, v in self._combine(updates).items()}
        return {f"delta.{l}": np.zeros((self.spec.d_model, self.spec.d_ff), np.float32) for l in self.spec.layers}

    def run_slot(self, slot: int, session: Session, resume: SlotProgress | None = None) -> None:
        if resume is not None and resume.phase == "apply":
            average = resume.arrays
        else:
            average = self._average(slot, session)
            self.record(session, slot, "apply", arrays=average)
        session.broadcast("editavg_apply", {"slot": slot}, average, phase="merge")
        self.record(session, slot + 1)


class EditAvgFactors(EditAvg):
    """``editavg-factors``: MEMITAvg as the FedLEKE authors computed it. Each client sends, per edited
    layer, MEMIT's two factors A = (lambda C0 + K K^T)^-1 K and R (Delta = R A^T); the server averages
    each over the clients and returns Delta_l = mean(R_l) mean(A_l)^T (``aggregate.factor_average``)."""

    name = "editavg-factors"
    step = "editavg_factors"

    def _validate(self, client: str, reply, n: int) -> None:
        validate_factor_upload(client, str(reply.body.get("fingerprint")), reply.arrays, self.spec, n)

    def _combine(self, updates: list[tuple[int, dict]]) -> dict[str, np.ndarray]:
        return factor_average(updates, self.spec.layers)


class MergedUpdates(EditAvg):
    """``sa`` / ``ta`` / ``ties``: the clients' updates merged as CollabEdit's baselines (Simple-Average,
    Task-Arithmetic, TIES-merging); the client steps are EditAvg's."""

    def __init__(self, method: str, spec, run: str, store=None):
        super().__init__(spec, run, store)
        self.name = method

    def _combine(self, updates: list[tuple[int, dict]]) -> dict[str, np.ndarray]:
        return merge_updates(self.name, updates)
