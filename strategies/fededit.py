"""``fededit`` (FedLEKE, Zhao et al. 2025) and ``fededit-noreedit`` (the paper's "w/o Z" ablation).

Per time slot:
1. reuse: clients send the keyed tags of the slot's requests; for every tag already in the store the
   server returns the stored z, and the client skips that optimisation;
2. edit: clients run MEMIT on the slot and upload MKVs (z, delta, keys per layer; opaque ids, tags),
   which are validated and stored durably;
3. serve and re-edit: each client receives the sets the other clients uploaded in this slot and keeps
   a sender's set when at least half of its own z have best-match cosine > alpha with it (Eq. 8; every
   set with ``gate=False``), then applies the kept ones without text.

Progress: phase ``edit`` records the clients whose upload is stored, in the upload's own
transaction (a restarted server asks only the others), phase ``serve`` that every upload is in.
The reuse lookup reads slots before the current one only, so a restart repeats it exactly.
"""

from __future__ import annotations

import logging

import numpy as np

from fededit_core.fedleke.reedit import DEFAULT_ALPHA, DEFAULT_VECTOR

from .base import Strategy
from .session import FederationError, Instruction, Session
from .store import MKVStore, SlotProgress, StoreError, row_digests
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
        super().__init__(spec, run, store)
        self.alpha, self.gate, self.reuse, self.vector = alpha, gate, reuse, vector
        if not gate:
            self.name = "fededit-noreedit"
        self.reused = 0
        self.suspects: dict[str, list[str]] = {}  # sender -> the clients that refused its sets

    def saved_state(self) -> dict:
        return {"reused": self.reused, "suspects": self.suspects}

    def restore(self, state: dict) -> None:
        self.reused, self.suspects = int(state.get("reused", 0)), dict(state.get("suspects", {}))

    # --- 1. reuse ---------------------------------------------------------------------------------
    def _stored_z(self, slot: int, tags: list[str]) -> tuple[list[str], np.ndarray]:
        found = self.store.find_tags(self.run, tags, fingerprint=self.spec.fingerprint, before_slot=slot)
        uploads: dict[int, np.ndarray] = {}
        keep, vectors = [], []
        for tag, (upload_id, position) in found.items():
            if upload_id not in uploads:
                uploads[upload_id] = self.store.get(upload_id).arrays["z"]
            keep.append(tag)
            vectors.append(uploads[upload_id][position])
        z = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, self.spec.d_model), np.float32)
        return keep, z

    def _reuse_plan(self, slot: int, session: Session, clients: list[str]) -> dict[str, tuple[list[str], np.ndarray]]:
        if not self.reuse:
            return {}
        plan = {}
        asked = {c: Instruction("tags", {"slot": slot}) for c in clients}
        for client, reply in session.exchange(asked, phase="reuse").items():
            tags = reply.body["tags"]
            if len(tags) != self.spec.slot_size(client, slot):
                session.reject(client, f"client {client}: {len(tags)} tags for the requests of slot {slot}")
                continue
            plan[client] = self._stored_z(slot, [t for t in tags if t])
        return plan

    # --- 2. edit and store ------------------------------------------------------------------------
    def _store_upload(
        self, slot: int, client: str, body: dict, arrays: dict, session: Session, served: list[str], stored: list[str]
    ) -> None:
        """Validate and store one upload; ``served`` are the tags whose stored z the client was given,
        ``stored`` the clients whose upload of this slot is in (recorded with this one)."""
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
        self.reused += len(served)  # counted with the upload that used them (saved in its transaction)
        try:
            self.store.put(
                self.run,
                client,
                slot,
                body["fingerprint"],
                ids,
                [t or None for t in tags or [""] * len(ids)],
                {k: arrays[k] for k in ("z", "delta", "keys", "layers")},
                progress=self.progress(session, slot, "edit", served=[*stored, client]),
            )
            stored.append(client)
        except StoreError as err:  # the server's own disk: the run cannot go on without losing sets
            raise FederationError(f"the run stops: {err}") from err

    def _note_refused_reuse(self, slot: int, client: str, refused: list[str], served: list[str]) -> None:
        """A served z that gave the target too low a probability on the receiver's model: its
        uploader becomes a suspect (the receiver optimised its own z instead)."""
        given = set(served)
        refused = [t for t in refused if t in given]  # only tags this client was served
        found = self.store.find_tags(self.run, refused, fingerprint=self.spec.fingerprint, before_slot=slot)
        for upload_id, _ in found.values():
            sender = self.store.get(upload_id).client
            log.warning("client %s refused a z of %s served for reuse in slot %d", client, sender, slot)
            self.suspects.setdefault(sender, []).append(client)

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

    def run_slot(self, slot: int, session: Session, resume: SlotProgress | None = None) -> None:
        phase = resume.phase if resume is not None else "start"
        if phase in ("start", "edit"):
            stored = list(resume.served) if phase == "edit" else []
            todo = [c for c in session.active if c not in stored]
            plan = self._reuse_plan(slot, session, todo)
            empty = ([], np.zeros((0, self.spec.d_model), np.float32))
            edits = {}
            for client in todo:
                tags, z = plan.get(client, empty)
                edits[client] = Instruction("edit", {"slot": slot, "reuse_tags": tags}, {"reuse_z": z})
            for client, reply in session.exchange(edits, phase="edit").items():
                self._note_refused_reuse(slot, client, reply.body.get("refused_reuse", []), plan.get(client, empty)[0])
                self._store_upload(slot, client, reply.body, reply.arrays, session, plan.get(client, empty)[0], stored)
            self.record(session, slot, "serve")
        replies = session.exchange({c: self._serve(slot, c) for c in session.active}, phase="reedit")
        for client, reply in replies.items():
            for sender in reply.body.get("suspects", []):
                log.warning(
                    "client %s refused the set of %s in slot %d (out of bounds or harmful)", client, sender, slot
                )
                self.suspects.setdefault(sender, []).append(client)
        self.record(session, slot + 1)

    def summary(self) -> dict:
        return {
            "stored_mkvs": self.store.count(self.run, self.spec.fingerprint),
            "z_served_for_reuse": self.reused,
            "refused_senders": self.suspects,
            "alpha": self.alpha,
            "gate": self.gate,
            "vector": self.vector,
        }
