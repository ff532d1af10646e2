"""``collabedit``: CollabEdit's non-destructive merge (Zheng et al., ICLR 2025).

For each edited layer l in order: every client sends R_c K_c^T and K_c K_c^T of its slot's requests,
read on the current shared model; the server sums them and returns the sums; every client applies
Delta_l = (sum_c R_c K_c^T)(lambda C0 + sum_c K_c K_c^T)^-1 with its identical C0 and reads the next
layer's statistics on the updated model. The merged model equals one MEMIT edit of all the clients'
requests together. One exchange carries "apply layer i, then send layer i+1".

``transport='lowrank'`` (the default) carries the same statistics as thin factors (K_c V_c, R_c V_c)
of rank <= the client's requests (``memit.update.thin_factors``): n (d + d_ff) numbers instead of
d d_ff + d_ff^2; the server returns the thin factor of the sums (``aggregate.sum_factors``). The
merged model is the same.

``dedup``: before a slot's first statistics the clients send the keyed tags of their slot's
requests (``fedleke.tags``: equal requests, equal tags, no text); a tag sent by several clients is
counted once, by the first of them in name order, and the others leave that request out of their
statistics (``skip``). Each client also reports the mean residual norm |R| of its requests at the
first layer, CollabEdit's overlap signal (an edit the model already holds has a small residual),
reported per slot.

``conflict``: the same fact (subject and relation template) edited to different objects, found from
keyed fact tags without the object (``fedleke.tags.fact_tag``); ``_plan`` says what each policy
merges. The clients are told which of their rows were refused.

``betas`` (beta0, beta1) other than (1, 0): CollabEdit's dynamic covariance against forgetting
(``fededit_core.memit.dynamic_covariance``): every client adds each slot's merged K K^T to its C0.

With ``secure=True`` the server never sees a client's statistics, only their sum: each client keeps
them and reports the largest |value|; the server sets one scale s = max_c max|stats_c| / clip so
that every scaled value lies in SecAgg+'s clipping range, and the transport's ``secure_sum`` (Flower's
SecAgg+) returns sum_c stats_c / s, which the server multiplies by s. Quantisation costs about
clip / 2^22 of s per value (a relative error near 1e-6 of the largest entry).
"""

from __future__ import annotations

import numpy as np

from fededit_core.memit.dynamic_covariance import DEFAULT_BETA0, DEFAULT_BETA1

from .aggregate import sum_factors, sum_statistics
from .base import Strategy
from .session import SECURE_SUM_RANGE, FederationError, Instruction, Session
from .store import SlotProgress
from .validation import (
    FederationSpec,
    UploadError,
    validate_sealed_stats,
    validate_stats_upload,
    validate_thin_factor_upload,
)

CONFLICT_POLICIES = ("last-writer", "reject", "keep-both")
DEFAULT_CONFLICT_POLICY = "last-writer"  # the CollabEdit paper's footnote: the later edit wins
DEFAULT_DEDUP = True  # a request several clients send in one slot counts once


class CollabEdit(Strategy):
    name = "collabedit"
    absorbed = "all"

    def __init__(
        self,
        spec: FederationSpec,
        run: str,
        transport: str,
        secure: bool = False,
        store=None,
        betas: tuple[float, float] = (DEFAULT_BETA0, DEFAULT_BETA1),
        dedup: bool = DEFAULT_DEDUP,
        conflict: str = DEFAULT_CONFLICT_POLICY,
    ):
        super().__init__(spec, run, store)
        self.betas = betas
        self.dedup = dedup
        if conflict not in CONFLICT_POLICIES:
            raise ValueError(f"conflict policy must be one of {list(CONFLICT_POLICIES)}, got {conflict!r}")
        self.conflict = conflict
        self.duplicates = 0  # requests left out of a slot's sums because another client sent them
        self.conflicts = 0  # facts edited to different objects (in one slot, or against an earlier one)
        self.fact_objects: dict[str, str] = {}  # fact tag -> request tag of the object last merged
        self.residual_norms: dict[str, float] = {}  # slot -> mean |R| at the first layer over all requests
        if secure and transport != "dense":
            raise ValueError("secure aggregation sums the dense statistics (collab-transport 'dense')")
        self.secure = secure
        self.transport = transport

    def run_slot(self, slot: int, session: Session, resume: SlotProgress | None = None) -> None:
        """Phases: ``start``, then ``apply`` with ``index`` i: the sums of layer i are recorded and
        go out with the request for layer i + 1's statistics."""
        layers = self.spec.layers
        gather = self._secure_sum if self.secure else self._plain_sum
        if resume is not None and resume.phase == "apply":
            first, sums = int(resume.state["index"]), resume.arrays
        else:
            skips, conflicts = self._plan(slot, session)
            steps = {
                c: Instruction(
                    "collab",
                    {
                        "slot": slot,
                        "stats": 0,
                        "skip": skips.get(c, []),
                        "conflicts": conflicts.get(c, []),
                        **self._form(),
                    },
                )
                for c in session.active
            }
            replies = session.exchange(steps, phase="edit")
            self._residual_norm(slot, replies)
            first, sums = 0, self._gathered(gather, slot, 0, replies, session)
        for i in range(first, len(layers)):
            follow = i + 1 if i + 1 < len(layers) else None
            step = {"slot": slot, "apply": i, "stats": follow, **self._form()}
            replies = session.broadcast("collab", step, sums, phase="merge")
            if follow is not None:
                sums = self._gathered(gather, slot, follow, replies, session)
        self.record(session, slot + 1)

    def _plan(self, slot: int, session: Session) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """(rows each client leaves out of the slot, of them those refused as conflicts).

        Duplicates (``dedup``): a request tag several clients send counts once, for the first of them
        in name order. Conflicts (``conflict`` other than keep-both): requests with one fact tag and
        different request tags, in this slot or against the object an earlier slot merged.
        ``last-writer``: the request of the last client in name order is merged and the others in the
        slot are refused (against an earlier slot the new edit simply writes over it: the later slot
        wins). ``reject``: every request of the slot on that fact is refused (an earlier slot's edit
        stays; it is merged already)."""
        facts = self.conflict != "keep-both"
        if not self.dedup and not facts:
            return {}, {}
        step = {"slot": slot, "facts": facts}
        replies = session.exchange({c: Instruction("tags", step) for c in session.active}, phase="edit")
        owner: set[str] = set()
        skips: dict[str, list[int]] = {}
        by_fact: dict[str, list[tuple[str, int, str]]] = {}
        for client in sorted(replies):
            tags, fact_tags = replies[client].body["tags"], replies[client].body.get("facts")
            n = self.spec.slot_size(client, slot)
            if len(tags) != n or (facts and (fact_tags is None or len(fact_tags) != n)):
                session.reject(client, f"client {client}: its tags do not match the {n} requests of slot {slot}")
                continue
            for row, tag in enumerate(tags):
                if tag is not None and self.dedup and tag in owner:
                    skips.setdefault(client, []).append(row)
                    self.duplicates += 1
                    continue
                if tag is not None:
                    owner.add(tag)
                if facts and tag is not None and fact_tags[row] is not None:
                    by_fact.setdefault(fact_tags[row], []).append((client, row, tag))
        conflicts: dict[str, list[int]] = {}
        for fact, entries in by_fact.items():
            earlier = self.fact_objects.get(fact)
            objects = {tag for _, _, tag in entries} | ({earlier} if earlier else set())
            if len(objects) > 1:
                self.conflicts += 1
                refused = entries if self.conflict == "reject" else [e for e in entries if e[2] != entries[-1][2]]
                for client, row, _ in refused:
                    skips.setdefault(client, []).append(row)
                    conflicts.setdefault(client, []).append(row)
            if self.conflict != "reject" or len(objects) == 1:
                self.fact_objects[fact] = entries[-1][2]
        return {c: sorted(rows) for c, rows in skips.items()}, {c: sorted(rows) for c, rows in conflicts.items()}

    def _residual_norm(self, slot: int, replies: dict) -> None:
        pairs = [(r.body.get("n_used", 0), r.body.get("resid_norm")) for r in replies.values()]
        pairs = [(n, v) for n, v in pairs if n and v is not None]
        if pairs:
            self.residual_norms[str(slot)] = sum(n * v for n, v in pairs) / sum(n for n, _ in pairs)

    def summary(self) -> dict:
        return {
            "duplicates_counted_once": self.duplicates,
            "conflicts": self.conflicts,
            "conflict_policy": self.conflict,
            "residual_norm_by_slot": dict(self.residual_norms),
        }

    def saved_state(self) -> dict:
        return {
            "duplicates": self.duplicates,
            "conflicts": self.conflicts,
            "fact_objects": self.fact_objects,
            "residual_norms": self.residual_norms,
        }

    def restore(self, state: dict) -> None:
        self.duplicates = int(state.get("duplicates", 0))
        self.conflicts = int(state.get("conflicts", 0))
        self.fact_objects = {str(k): str(v) for k, v in dict(state.get("fact_objects", {})).items()}
        self.residual_norms = {str(k): float(v) for k, v in dict(state.get("residual_norms", {})).items()}

    def _form(self) -> dict:
        """How statistics travel and how clients solve with them (the same for every step)."""
        beta0, beta1 = self.betas
        return {"secure": self.secure, "transport": self.transport, "beta0": beta0, "beta1": beta1}

    def _gathered(self, gather, slot: int, index: int, replies: dict, session: Session) -> dict:
        """The sums of layer ``index``, recorded before they go out."""
        wire = np.float64 if self.transport == "lowrank" else np.float32  # the factors are small
        sums = {k: v.astype(wire) for k, v in gather(slot, index, self.spec.layers[index], replies, session).items()}
        self.record(session, slot, "apply", arrays=sums, index=index)
        return sums

    def _plain_sum(self, slot: int, index: int, layer: int, replies: dict, session: Session) -> dict:
        parts = []
        for client, reply in replies.items():
            fingerprint = str(reply.body.get("fingerprint"))
            try:
                if self.transport == "lowrank":
                    validate_thin_factor_upload(client, fingerprint, reply.arrays, self.spec, layer, slot)
                else:
                    validate_stats_upload(client, fingerprint, reply.arrays, self.spec, layer)
            except UploadError as err:
                session.reject(client, str(err))
                continue
            parts.append(reply.arrays)
        return sum_factors(parts) if self.transport == "lowrank" else sum_statistics(parts)

    def _secure_sum(self, slot: int, index: int, layer: int, replies: dict, session: Session) -> dict:
        largest = 0.0
        for client, reply in replies.items():
            try:
                largest = max(largest, validate_sealed_stats(client, reply.body, self.spec))
            except UploadError as err:
                session.reject(client, str(err))
        scale = largest / SECURE_SUM_RANGE * (1 + 1e-6) if largest > 0 else 1.0
        step = {"slot": slot, "stats": index, "scale": scale}
        contributors = [c for c in replies if c in session.active]
        scaled = session.secure_sum(
            {c: Instruction("collab_masked", dict(step)) for c in contributors}, names=("rk", "kk"), phase="merge"
        )
        sums = {name: value.astype(np.float64) * scale for name, value in scaled.items()}
        try:
            validate_stats_upload("secure sum", self.spec.fingerprint, sums, self.spec, layer)
        except UploadError as err:  # one bad client spoils the sum, and nobody can tell whose it was
            raise FederationError(f"the SecAgg+ sum of layer {layer} is unusable: {err}") from err
        return sums
