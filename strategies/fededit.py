"""``fededit`` (FedLEKE, Zhao et al. 2025) and ``fededit-noreedit`` (the paper's "w/o Z" ablation).

Per time slot:
1. reuse: clients send the keyed tags of the slot's requests; for every tag already in the store the
   server returns the stored z, and the client skips that optimisation;
2. edit: clients run MEMIT on the slot and upload MKVs (z, delta, keys per layer; opaque ids, tags),
   which are validated and stored durably. With ``seal`` (run config ``seal-mkvs``, the default)
   each upload is one blob sealed for the members (``fedleke/sealing.py``): the server checks its
   length against the declared count and its magic, stores it with the blob's digest (a replayed
   ciphertext is refused) and serves it as it came, with its sender, slot and count; reuse serves
   the blob and the row of the tag;
3. serve and re-edit: each client receives the sets the other clients uploaded in this slot, keeps
   the MKVs that its re-edit condition passes (``gate``: ``paper``, ``set`` or ``none``, Eq. 8 as
   fedleke/reedit.py states each), then applies the kept ones without text.

Progress: phase ``edit`` records the clients whose upload is stored, in the upload's own
transaction (a restarted server asks only the others), phase ``serve`` that every upload is in.
The reuse lookup reads slots before the current one only, so a restart repeats it exactly.
"""

from __future__ import annotations

import logging

import numpy as np

from fededit_core.fedleke.mkv import WIRE_ARRAYS
from fededit_core.fedleke.probe import DEFAULT_PROBE_TAU
from fededit_core.fedleke.reedit import DEFAULT_ALPHA, DEFAULT_GATE, DEFAULT_VECTOR

from .base import Strategy
from .session import FederationError, Instruction, Session
from .store import MKVStore, SlotProgress, StoreError, Upload, blob_digest, row_digests
from .validation import FederationSpec, UploadError, validate_mkv_upload, validate_sealed_upload

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
        gate: str = DEFAULT_GATE,
        reuse: bool = True,
        vector: str = DEFAULT_VECTOR,
        seal: bool = True,
        tau: float = DEFAULT_PROBE_TAU,
    ):
        super().__init__(spec, run, store)
        self.alpha, self.gate, self.reuse, self.vector, self.seal = alpha, gate, reuse, vector, seal
        self.tau = tau
        if gate == "none":
            self.name = "fededit-noreedit"
        self.reused = 0
        self.suspects: dict[str, list[str]] = {}  # sender -> the clients that refused its sets

    def saved_state(self) -> dict:
        return {"reused": self.reused, "suspects": self.suspects}

    def restore(self, state: dict) -> None:
        self.reused, self.suspects = int(state.get("reused", 0)), dict(state.get("suspects", {}))

    # --- 1. reuse ---------------------------------------------------------------------------------
    def _stored_z(self, slot: int, tags: list[str]) -> tuple[list[str], dict, dict]:
        """The tags found in earlier slots and what the edit instruction carries for them: plaintext,
        their z rows (``reuse_z``); sealed, the blobs that hold them (``sources``, ``sealed.<j>``) and
        each tag's blob and row (``reuse_source``, ``reuse_row``)."""
        found = self.store.find_tags(self.run, tags, fingerprint=self.spec.fingerprint, before_slot=slot)
        uploads: dict[int, Upload] = {}
        keep, positions = [], []
        for tag, (upload_id, position) in found.items():
            if upload_id not in uploads:
                uploads[upload_id] = self.store.get(upload_id)
            keep.append(tag)
            positions.append((upload_id, position))
        self._same_format(list(uploads.values()))
        if self.seal:
            order = {upload_id: j for j, upload_id in enumerate(uploads)}
            args = {
                "sources": [_source(u) for u in uploads.values()],
                "reuse_source": [order[u] for u, _ in positions],
                "reuse_row": [p for _, p in positions],
            }
            return keep, args, {f"sealed.{j}": uploads[u].arrays["sealed"] for u, j in order.items()}
        rows = [uploads[u].arrays["z"][p] for u, p in positions]
        z = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.spec.d_model), np.float32)
        return keep, {}, {"reuse_z": z}

    def _reuse_plan(self, slot: int, session: Session, clients: list[str]) -> dict[str, tuple[list[str], dict, dict]]:
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
            if self.seal:
                blob = validate_sealed_upload(client, str(body.get("fingerprint")), ids, arrays, self.spec, tags, slot)
                digests = [blob_digest(blob)] * len(ids)
            else:
                if "sealed" in arrays:
                    raise UploadError(f"client {client}: a sealed set, but this run does not seal (seal-mkvs)")
                validate_mkv_upload(client, str(body.get("fingerprint")), ids, arrays, self.spec, tags=tags, slot=slot)
                digests = row_digests(arrays["z"])
            reused = set(served)
            replayed = [
                i
                for i in self.store.replayed(self.run, client, slot, digests, self.spec.fingerprint)
                if self.seal or not (tags and tags[i] in reused)
            ]
            if replayed:
                what = "its sealed set was" if self.seal else f"{len(replayed)} of its z vectors were"
                raise UploadError(f"client {client}: {what} already uploaded (a replayed set)")
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
                {k: arrays[k] for k in (("sealed",) if self.seal else (*WIRE_ARRAYS, "layers"))},
                progress=self.progress(session, slot, "edit", served=[*stored, client]),
                digests=digests,
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
        self._same_format(uploads)
        args = {"alpha": self.alpha, "gate": self.gate, "vector": self.vector, "tau": self.tau}
        if self.seal:
            args.update(ids=[], senders=[], sources=[_source(u) for u in uploads])
            return Instruction("reedit", args, {f"sealed.{j}": u.arrays["sealed"] for j, u in enumerate(uploads)})
        args.update(ids=[i for u in uploads for i in u.ids], senders=[u.client for u in uploads for _ in u.ids])
        arrays = {}
        if uploads:
            arrays = {k: np.concatenate([u.arrays[k] for u in uploads]) for k in WIRE_ARRAYS}
            arrays["layers"] = np.asarray(self.spec.layers, dtype=np.int64)
        return Instruction("reedit", args, arrays)

    def _same_format(self, uploads: list[Upload]) -> None:
        """Stored sets sealed when this run seals, plaintext when it does not."""
        if any(("sealed" in u.arrays) != self.seal for u in uploads):
            raise FederationError(
                f"run {self.run!r} holds {'plaintext' if self.seal else 'sealed'} MKVs: it was started with "
                f"seal-mkvs = {str(not self.seal).lower()}; resume it so, or give this run another run-name"
            )

    def run_slot(self, slot: int, session: Session, resume: SlotProgress | None = None) -> None:
        phase = resume.phase if resume is not None else "start"
        if phase in ("start", "edit"):
            stored = list(resume.served) if phase == "edit" else []
            todo = [c for c in session.active if c not in stored]
            plan = self._reuse_plan(slot, session, todo)
            edits = {}
            for client in todo:
                tags, args, arrays = plan.get(client, ([], {}, {}))
                edits[client] = Instruction(
                    "edit", {"slot": slot, "reuse_tags": tags, "seal": self.seal, **args}, arrays
                )
            for client, reply in session.exchange(edits, phase="edit").items():
                served = plan.get(client, ([],))[0]
                self._note_refused_reuse(slot, client, reply.body.get("refused_reuse", []), served)
                self._store_upload(slot, client, reply.body, reply.arrays, session, served, stored)
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
            "tau": self.tau,
            "sealed": self.seal,
        }


def _source(upload: Upload) -> dict:
    """What a receiver needs, besides the blob, to open a sealed set: its sender, slot and count."""
    return {"sender": upload.client, "slot": upload.slot, "n": len(upload.ids)}
