"""``fededit`` (FedLEKE, Zhao et al. 2025) and ``fededit-noreedit`` (the paper's "w/o Z" ablation).

Per time slot:
1. reuse: clients send the keyed tags of the slot's requests; for every tag already in the store the
   server returns the stored z, and the client skips that optimisation;
2. edit: clients run MEMIT on the slot and upload MKVs (z, delta, keys per layer; opaque ids, tags),
   which are validated and stored durably;
3. serve and re-edit: each client receives the sets the other clients uploaded in this slot and keeps
   a sender's set when at least half of its own z have best-match cosine > alpha with it (Eq. 8; every
   set with ``gate=False``), then applies the kept ones without text.
"""

from __future__ import annotations

import logging

import numpy as np

from fededit_core.fedleke.reedit import DEFAULT_ALPHA, DEFAULT_VECTOR

from .base import Strategy
from .session import FederationError, Instruction, Session
from .store import MKVStore, StoreError, row_digests
from .validation import FederationSpec, UploadError, validate_mkv_upload

log = logging.getLogger("fededit.server")


class FedEdit(Strategy):
    name = "fededit"
    absorbed = "reedited"

    def __init__(
        self,
        spec: FederationSpec,
        run: str,
        store: MKVStore,
        alpha: float = DEFAULT_ALPHA,
        gate: bool = True,
        reuse: bool = True,
        vector: str = DEFAULT_VECTOR,
    ):
        super().__init__(spec, run)
        self.store, self.alpha, self.gate, self.reuse, self.vector = store, alpha, gate, reuse, vector
        if not gate:
            self.name = "fededit-noreedit"
        self.reused = 0
        self.suspects: dict[str, list[str]] = {}  # sender -> the clients that refused its sets

    # --- 1. reuse ---------------------------------------------------------------------------------
    def _stored_z(self, tags: list[str]) -> tuple[list[str], np.ndarray]:
        found = self.store.find_tags(self.run, tags, fingerprint=self.spec.fingerprint)
        uploads: dict[int, np.ndarray] = {}
        keep, vectors = [], []
        for tag, (upload_id, position) in found.items():
            if upload_id not in uploads:
                uploads[upload_id] = self.store.get(upload_id).arrays["z"]
            keep.append(tag)
            vectors.append(uploads[upload_id][position])
        z = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, self.spec.d_model), np.float32)
        return keep, z

    def _reuse_plan(self, slot: int, session: Session) -> dict[str, tuple[list[str], np.ndarray]]:
        if not self.reuse:
            return {}
        plan = {}
        for client, reply in session.broadcast("tags", {"slot": slot}, phase="reuse").items():
            tags = reply.body["tags"]
            if len(tags) != self.spec.slot_size(client, slot):
                session.reject(client, f"client {client}: {len(tags)} tags for the requests of slot {slot}")
                continue
            plan[client] = self._stored_z([t for t in tags if t])
        return plan

    # --- 2. edit and store ------------------------------------------------------------------------
    def _store_upload(
        self, slot: int, client: str, body: dict, arrays: dict, session: Session, served: list[str]
    ) -> None:
        """Validate and store one upload; ``served`` are the tags whose stored z the client was given."""
        ids, tags = body.get("ids"), body.get("tags")
        try:
            validate_mkv_upload(client, str(body.get("fingerprint")), ids, arrays, self.spec, tags=tags, slot=slot)
            reused = set(served)
            replayed = [
                i
                for i in self.store.replayed(self.run, client, slot, row_digests(arrays["z"]), self.spec.fingerprint)
                if not (tags and tags[i] in reused)
            ]
            if replayed:
                raise UploadError(
                    f"client {client}: {len(replayed)} of its z vectors were already uploaded (a replayed set)"
                )
        except UploadError as err:
            session.reject(client, str(err))
            return
        try:
            self.store.put(
                self.run,
                client,
                slot,
                body["fingerprint"],
                ids,
                [t or None for t in tags or [""] * len(ids)],
                {k: arrays[k] for k in ("z", "delta", "keys", "layers")},
            )
        except StoreError as err:  # the server's own disk: the run cannot go on without losing sets
            raise FederationError(f"the run stops: {err}") from err

    # --- 3. serve ---------------------------------------------------------------------------------
    def _serve(self, slot: int, client: str) -> Instruction:
        """The reedit step for ``client``: the sets the other clients uploaded since the last slot."""
        uploads = self.store.uploads(
            self.run, exclude_client=client, after_slot=slot - 1, fingerprint=self.spec.fingerprint
        )
        uploads = [u for u in uploads if u.ids]
        args = {
            "alpha": self.alpha,
            "gate": self.gate,
            "vector": self.vector,
            "ids": [i for u in uploads for i in u.ids],
            "senders": [u.client for u in uploads for _ in u.ids],
        }
        arrays = {}
        if uploads:
            arrays = {k: np.concatenate([u.arrays[k] for u in uploads]) for k in ("z", "delta", "keys")}
            arrays["layers"] = np.asarray(self.spec.layers, dtype=np.int64)
        return Instruction("reedit", args, arrays)

    def run_slot(self, slot: int, session: Session) -> None:
        plan = self._reuse_plan(slot, session)
        empty = ([], np.zeros((0, self.spec.d_model), np.float32))
        edits = {}
        for client in session.active:
            tags, z = plan.get(client, empty)
            self.reused += len(tags)
            edits[client] = Instruction("edit", {"slot": slot, "reuse_tags": tags}, {"reuse_z": z})
        for client, reply in session.exchange(edits, phase="edit").items():
            self._store_upload(slot, client, reply.body, reply.arrays, session, plan.get(client, empty)[0])
        replies = session.exchange({c: self._serve(slot, c) for c in session.active}, phase="reedit")
        for client, reply in replies.items():
            for sender in reply.body.get("suspects", []):
                log.warning(
                    "client %s refused the set of %s in slot %d (out of bounds or harmful)", client, sender, slot
                )
                self.suspects.setdefault(sender, []).append(client)

    def summary(self) -> dict:
        return {
            "stored_mkvs": self.store.count(self.run, self.spec.fingerprint),
            "z_served_for_reuse": self.reused,
            "refused_senders": self.suspects,
            "alpha": self.alpha,
            "gate": self.gate,
            "vector": self.vector,
        }
