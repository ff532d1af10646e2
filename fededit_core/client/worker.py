"""The edit worker: one organisation's model, loaded once, doing every step the federation asks for.

In deployment Flower starts a new ClientApp process per message, so the model lives here instead, in
a long-lived process (``fededit_core.worker_service`` serves this object over gRPC); in simulation
the ClientApp calls it in-process. One worker may serve several clients (virtual clients sharing a
Ray actor): each client is a ``Participant`` with its own edited layers, swapped into the shared
model for each step, and checkpointed after every step, so a restarted client resumes.

A step is ``handle(op, spec, args, arrays) -> (reply, arrays)``: ``spec`` is what the client knows
locally (its name, its private request file, device, run settings), ``args`` and ``arrays`` come
from the server. Replies carry numbers, opaque ids, tags and arrays, never request text.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fededit_core.client.instructions import (
    StepError,
    check_arrays,
    check_reedit_ids,
    check_sources,
    parse_instruction,
)
from fededit_core.client.participant import Participant, checkpoint_version
from fededit_core.data.builtin import resolve_data
from fededit_core.data.loaders import DEFAULT_ZSRE_TARGET, ZSRE_TARGETS, dataset_kind, load_requests
from fededit_core.data.partition import load_partitions
from fededit_core.data.requests import EditRequest
from fededit_core.data.slots import split_into_slots
from fededit_core.eval.metrics import evaluate, generate_greedy
from fededit_core.fedleke.mkv import MKVError, MKVSet
from fededit_core.fedleke.reedit import DEFAULT_REUSE_MIN_PROB, DEFAULT_ROLLBACK_MARGIN, GATES
from fededit_core.fedleke.sealing import KeyRing, SealContext, SealError, key_id, key_proof, set_ids
from fededit_core.memit.editor import MemitEditor, hparams_for, make_editor
from fededit_core.memit.update import positive_semidefinite, statistics_from_factors
from fededit_core.model.loading import DEFAULT_MODEL
from fededit_core.paths import generations_path, safe_name

log = logging.getLogger("fededit.worker")


class WorkerError(StepError):
    """A step the worker cannot do (bad arguments, wrong slot, missing arrays)."""


class ClientSpec(BaseModel):
    """What a client knows locally and never sends to the server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: str = Field(description="run name: checkpoints live in state_dir/run/name")
    name: str
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "fp32"
    hparams: dict = Field(default_factory=dict, description="MEMIT hyperparameter overrides")
    requests: str = Field(description="'builtin' or the path of this client's request file")
    partition: str = Field("all", description="'all' (the whole file is this client's) or a scheme of partition.py")
    zsre_target: Literal[ZSRE_TARGETS] = DEFAULT_ZSRE_TARGET  # type: ignore[valid-type]
    count: int = 1
    seed: int = 0
    max_requests: int = 0
    num_slots: int = 1
    state_dir: str
    secret_file: str | None = None
    retired_secret_files: list[str] = Field(
        default_factory=list, description="earlier federation secrets: they still open sets sealed under them"
    )
    allow_plaintext_mkvs: bool = Field(
        False, description="upload MKVs unsealed when the server asks (seal-mkvs = false); off: refuse"
    )
    rollback_margin: float | None = Field(
        DEFAULT_ROLLBACK_MARGIN,
        ge=0,
        description="roll back a re-edit that raises own target NLL by more nats; None: the paper's rule, no check",
    )
    reuse_min_prob: float = Field(
        DEFAULT_REUSE_MIN_PROB,
        ge=0,
        le=1,
        description="a served z is used only if it gives the target this probability",
    )
    reedit_gate: Literal[("server", *GATES)] = Field(  # type: ignore[valid-type]
        "server", description="FedEdit's re-edit condition: as the server says, or this rule (node config)"
    )
    oracle: bool = Field(False, description="simulation only: may read the other clients' partitions to evaluate them")

    @field_validator("run", "name")
    @classmethod
    def _one_folder(cls, value: str, info) -> str:
        return safe_name(value, info.field_name)

    def requests_by_client(self) -> dict[str, list]:
        return load_partitions(
            self.requests, self.count, self.partition, self.seed, self.max_requests, self.zsre_target
        )

    def own_requests(self) -> list:
        if self.partition == "all":
            requests = load_requests(resolve_data(self.requests), zsre_target=self.zsre_target)
            return requests[: self.max_requests] if self.max_requests > 0 else requests
        parts = self.requests_by_client()
        if self.name not in parts:
            raise WorkerError(f"client {self.name!r} is not one of the partitions {sorted(parts)}")
        return parts[self.name]


def read_secret(path: str | None, create: bool = False) -> bytes | None:
    """The federation secret from a file (created with 32 random bytes when ``create`` and absent)."""
    if not path:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        if not create:
            raise WorkerError(f"federation secret file {file} does not exist")
        file.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another client created it first
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(32))
    secret = file.read_bytes()
    if len(secret) < 16:
        raise WorkerError(f"federation secret file {file} holds {len(secret)} bytes; at least 16 are needed")
    return secret


ARRAY_STEPS = ("edit", "reedit", "editavg_apply", "collab")  # steps whose instruction may carry arrays


def _metrics(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k != "per_request"}


class EditWorker:
    """Engines (model + MEMIT editor) by model settings, participants by (run, client)."""

    def __init__(self, z_cache=None):
        self.z_cache = z_cache  # a zcache.BaseZCache shared by every editor (benchmarks), or None
        self._editors: dict[str, MemitEditor] = {}
        self._participants: dict[tuple[str, str], Participant] = {}
        # CollabEdit with secure aggregation: statistics held back until SecAgg+ masks them,
        # by (run, client) -> (slot, layer index, R K^T, K K^T)
        self._sealed: dict[tuple[str, str], tuple[int, int, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    # --- state ----------------------------------------------------------------------------------
    def editor(self, spec: ClientSpec) -> MemitEditor:
        """The editor for the spec's model and MEMIT settings; one copy of the weights per model and
        device: other settings (e.g. a run's overrides after ``--preload``) reuse the loaded model."""
        key = json.dumps([spec.model, spec.device, spec.dtype, spec.hparams], sort_keys=True)
        if key in self._editors:
            return self._editors[key]
        same = [k for k in self._editors if json.loads(k)[:3] == [spec.model, spec.device, spec.dtype]]
        if same:
            old = self._editors[same[0]]
            for k in same:
                del self._editors[k]
            old.reset()  # base weights back before the new editor keeps them as its base
            self._participants = {k: p for k, p in self._participants.items() if p.editor is not old}
            log.info("reusing the loaded %s with other MEMIT settings", spec.model)
            self._editors[key] = MemitEditor(old.model, old.tok, hparams_for(old.model, **spec.hparams))
        else:
            log.info("loading %s on %s (%s)", spec.model, spec.device, spec.dtype)
            self._editors[key] = make_editor(spec.model, spec.device, spec.dtype, **spec.hparams)
        self._editors[key].z_cache = self.z_cache
        return self._editors[key]

    def participant(self, spec: ClientSpec) -> Participant:
        """The client's participant, re-read from its checkpoint when another process moved it on."""
        folder = Path(spec.state_dir) / spec.run / spec.name
        key = (spec.run, spec.name)
        cached, editor = self._participants.get(key), self.editor(spec)
        if cached is None or cached.editor is not editor or cached.version != (checkpoint_version(folder) or 0):
            secret = read_secret(spec.secret_file, create=spec.oracle)
            cached = Participant(
                spec.name,
                editor,
                spec.own_requests(),
                spec.num_slots,
                secret=secret,
                checkpoint_dir=folder,
                reuse_min_prob=spec.reuse_min_prob,
            )
            self._participants[key] = cached
        return cached

    def forget(self, run: str) -> None:
        """Drop the cached participants of ``run`` (their checkpoints stay on disk)."""
        with self._lock:
            self._participants = {k: p for k, p in self._participants.items() if k[0] != run}

    # --- dispatch -------------------------------------------------------------------------------
    def handle(self, op: str, spec: ClientSpec, args: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """One step; the server's ``args`` and ``arrays`` are checked (``instructions``) before use."""
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise WorkerError(f"unknown step {op!r}")
        parsed = parse_instruction(op, args)
        if op == "reedit":
            check_reedit_ids(parsed, spec.name)
        if op in ("edit", "reedit"):
            check_sources(op, parsed, spec.name)
        with self._lock:  # one step at a time: the model is shared
            if arrays or op in ARRAY_STEPS:
                editor = self.editor(spec)
                check_arrays(op, parsed, arrays, editor.d_model, editor.d_ff, tuple(editor.hp.layers))
            return method(spec, parsed.model_dump(), arrays)

    @staticmethod
    def _slot(args: dict, participant: Participant) -> int:
        slot = args.get("slot")
        if not isinstance(slot, int) or not 0 <= slot < len(participant.slots):
            raise WorkerError(f"slot must be an integer in [0, {len(participant.slots)}), got {slot!r}")
        return slot

    # --- steps ----------------------------------------------------------------------------------
    def op_hello(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        """What the server compares across clients: base model, templates, C0 source; plus counts."""
        participant = self.participant(spec)
        editor = participant.editor
        editor.c0()  # built (or loaded) now, before the first slot, so that its corpus is known
        with editor.at_base():  # a self-sampled corpus comes from the base model
            corpus = editor.covariance.corpus_digest()
        return {
            "client": spec.name,
            "fingerprint": editor.covariance.fingerprint,
            "templates": editor.templates.digest(),
            "covariance": {**editor.covariance.describe(), "corpus": corpus},
            "hparams": editor.hp.model_dump(mode="json"),
            "d_model": editor.d_model,
            "d_ff": editor.d_ff,
            "layers": list(editor.hp.layers),
            "n_requests": sum(len(s) for s in participant.slots),
            "slot_sizes": [len(s) for s in participant.slots],
            "next_slot": participant.next_slot,
            "kind": dataset_kind(resolve_data(spec.requests)),
            "reuse": participant.secret is not None,
            **self._key_proof(spec, participant, args),
        }, {}

    @staticmethod
    def _key_proof(spec: ClientSpec, participant: Participant, args: dict) -> dict:
        """Proof of the federation secret for the server's nonce (``sealing.key_proof``): the server
        compares the clients' proofs and leaves out those whose secret differs, or who hold none."""
        secret, nonce = participant.secret, args.get("nonce")
        if secret is None or nonce is None:
            return {"key_id": None, "key_proof": None}
        return {"key_id": key_id(secret), "key_proof": key_proof(secret, spec.run, nonce)}

    def op_tags(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        participant = self.participant(spec)
        slot = self._slot(args, participant)
        reply = {"tags": participant.tags_of(slot)}
        if args.get("facts"):
            reply["facts"] = participant.tags_of(slot, facts=True)
        return reply, {}

    # --- sealed MKV sets (fedleke/sealing.py) --------------------------------------------------
    @staticmethod
    def _keyring(spec: ClientSpec, participant: Participant) -> KeyRing:
        if participant.secret is None:
            raise WorkerError(
                "the run seals MKVs (seal-mkvs), and this client holds no federation secret (secret-file)"
            )
        return KeyRing([participant.secret, *(read_secret(f) for f in spec.retired_secret_files)])

    @staticmethod
    def _seal_context(spec: ClientSpec, editor: MemitEditor, sender: str, slot: int, n: int) -> SealContext:
        layers = tuple(editor.hp.layers)
        ids = set_ids(sender, slot, n)
        return SealContext(
            spec.run, sender, slot, ids, layers, editor.covariance.fingerprint, editor.d_model, editor.d_ff
        )

    def _open(self, spec: ClientSpec, participant: Participant, sealed: list[tuple[dict, np.ndarray]]) -> list:
        """Each (source, blob) opened into its MKVSet, or the reason it does not open (a str): a blob
        that fails authentication (tampered, re-labelled, another run's) or holds non-finite values."""
        ring, editor, opened = self._keyring(spec, participant), participant.editor, []
        for source, blob in sealed:
            context = self._seal_context(spec, editor, source["sender"], source["slot"], source["n"])
            try:
                opened.append(ring.open(blob.tobytes(), context))
            except (SealError, MKVError) as err:
                opened.append(f"its sealed set of slot {source['slot']} does not open ({err})")
        return opened

    # --- steps ----------------------------------------------------------------------------------
    def op_edit(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        """MEMIT of the slot's requests (z reused for the tags the server found); returns the MKVs,
        sealed for the other members when the server asks for it (``seal``)."""
        participant = self.participant(spec)
        slot = self._slot(args, participant)
        upload, seal = args.get("upload", True), args["seal"]
        if upload and not seal and not spec.allow_plaintext_mkvs:
            raise WorkerError(
                "the server asks for MKVs unsealed (seal-mkvs = false); this client uploads them sealed only "
                "(allow-plaintext-mkvs in its node config permits it)"
            )
        if slot < participant.next_slot:  # a repeated request (e.g. the server restarted): same answer
            mkvs, report = participant.mkvs_of(slot), participant.reports[slot]
        else:
            mkvs, report = participant.edit_slot(slot, self._reused(spec, participant, args, arrays))
        if not upload:  # strategy 'local': nothing leaves the client
            return {"report": asdict(report)}, {}
        tags = participant.tags_of(slot)
        refused = sorted(set(participant.refused_reuse) & {t for t in tags if t})
        body = {
            "ids": mkvs.ids,
            "tags": [t or "" for t in tags],
            "refused_reuse": refused,
            "report": asdict(report),
            "fingerprint": participant.editor.covariance.fingerprint,
        }
        if not seal:
            return body, mkvs.to_arrays()
        started = time.perf_counter()
        blob = self._keyring(spec, participant).seal(
            mkvs, self._seal_context(spec, participant.editor, spec.name, slot, len(mkvs))
        )
        report.seconds["seal"] = time.perf_counter() - started
        body["report"] = asdict(report)
        return body, {"sealed": np.frombuffer(blob, dtype=np.uint8)}

    def _reused(self, spec: ClientSpec, participant: Participant, args: dict, arrays: dict) -> dict:
        """Tag -> served z: plaintext rows, or rows of the sealed sets (a set that does not open
        gives nothing, and its tags are reported as refused)."""
        tags = args["reuse_tags"]
        if not args["sources"]:
            reuse_z = arrays.get("reuse_z", np.zeros((0, participant.editor.d_model), np.float32))
            return {tag: torch.from_numpy(np.asarray(z, dtype=np.float32)) for tag, z in zip(tags, reuse_z)}
        sources = args["sources"]
        opened = self._open(spec, participant, [(s, arrays[f"sealed.{j}"]) for j, s in enumerate(sources)])
        reused = {}
        for tag, j, row in zip(tags, args["reuse_source"], args["reuse_row"]):
            if isinstance(opened[j], MKVSet):
                reused[tag] = opened[j].z[row]
            else:
                log.error("%s: a z served for reuse from %s: %s", spec.name, sources[j]["sender"], opened[j])
                participant.refused_reuse.append(tag)
        return reused

    def op_reedit(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        """FedEdit's re-edit of the sets other clients uploaded (one set per sender, Eq. 8 per set).
        A sealed set that does not open, or that belongs to another slot than the one just edited
        (a replay), is refused and its sender reported; nothing of it is applied."""
        participant = self.participant(spec)
        ids, senders = args["ids"], args["senders"]
        received: list[MKVSet] = []
        if ids:
            merged = MKVSet.from_arrays(ids, arrays)
            merged.validate(participant.editor.d_model, participant.editor.d_ff, tuple(participant.editor.hp.layers))
            for sender in dict.fromkeys(senders):
                received.append(merged.select([i for i, s in enumerate(senders) if s == sender]))
        known = set(participant.suspects)
        if args["sources"]:
            self._open_for_reedit(spec, participant, args["sources"], arrays, received)
        gate = args["gate"] if spec.reedit_gate == "server" else spec.reedit_gate
        report = participant.reedit(
            received, args["alpha"], gate=gate, vector=args["vector"], tau=args["tau"], margin=spec.rollback_margin
        )
        return {"report": asdict(report), "suspects": sorted(set(participant.suspects) - known)}, {}

    def _open_for_reedit(
        self, spec: ClientSpec, participant: Participant, sources: list[dict], arrays: dict, received: list
    ) -> None:
        """Open the sealed sets of a re-edit into ``received``; a set of another slot than the one
        just edited (a replay) or one that does not open is refused: its sender becomes a suspect."""
        started, slot = time.perf_counter(), participant.next_slot - 1
        refused: dict[str, str] = {}
        current = []
        for j, source in enumerate(sources):
            if source["slot"] == slot:
                current.append((source, arrays[f"sealed.{j}"]))
            else:
                refused[source["sender"]] = (
                    f"its set of slot {source['slot']} was served again in slot {slot} (a replay)"
                )
        for (source, _), mkvs in zip(current, self._open(spec, participant, current)):
            if isinstance(mkvs, MKVSet):
                received.append(mkvs)
            else:
                refused[source["sender"]] = mkvs
        for sender, why in refused.items():
            log.error("%s refuses the set of %s: %s", spec.name, sender, why)
            participant.suspects[sender] = why
        if participant.reports:  # checkpointed with the re-edit that follows
            report = participant.reports[-1]
            report.seconds["open"] = report.seconds.get("open", 0.0) + time.perf_counter() - started
            report.refused_sets += len(refused)
            report.received_sets += len(refused)

    def op_editavg_update(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        participant = self.participant(spec)
        slot = self._slot(args, participant)
        update, report = participant.editavg_update(slot)
        return (
            {"n": report.edited, "report": asdict(report), "fingerprint": participant.editor.covariance.fingerprint},
            {f"delta.{l}": d.cpu().numpy() for l, d in update.items()},
        )

    def op_editavg_factors(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        participant = self.participant(spec)
        factors, report = participant.editavg_factors(self._slot(args, participant))
        arrays = {}
        for l, (a, r) in factors.items():
            arrays[f"factor_k.{l}"], arrays[f"factor_r.{l}"] = a.cpu().numpy(), r.cpu().numpy()
        return {
            "n": report.edited,
            "report": asdict(report),
            "fingerprint": participant.editor.covariance.fingerprint,
        }, arrays

    def op_editavg_apply(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        participant = self.participant(spec)
        layers = participant.editor.hp.layers
        missing = [l for l in layers if f"delta.{l}" not in arrays]
        if missing:
            raise WorkerError(f"the averaged update lacks layers {missing}")
        average = {l: torch.from_numpy(np.asarray(arrays[f"delta.{l}"])) for l in layers}
        participant.editavg_apply(average, self._slot(args, participant))
        return {}, {}

    def op_collab(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        """CollabEdit: apply the summed statistics of layer ``apply`` (if given; dense, or the thin
        factor of the sums with ``transport='lowrank'``), then return this client's statistics of layer
        ``stats`` (if given), read on the updated model, in the same form."""
        participant = self.participant(spec)
        slot = self._slot(args, participant)
        for key in ("apply", "stats"):
            if args[key] is not None and args[key] >= len(participant.editor.hp.layers):
                raise WorkerError(
                    f"{key} names layer index {args[key]}; {len(participant.editor.hp.layers)} are edited"
                )
        lowrank = args["transport"] == "lowrank"
        if lowrank and args.get("secure"):
            raise WorkerError("secure aggregation sums the dense statistics; thin factors cannot be masked and summed")
        reply: dict = {}
        if args.get("apply") is not None:
            if lowrank:
                width = arrays["kf"].shape[1]
                if width != arrays["rf"].shape[1] or width > participant.editor.d_ff:
                    raise WorkerError(
                        f"the factors of the summed statistics must have one width <= d_ff "
                        f"{participant.editor.d_ff}, got {width} and {arrays['rf'].shape[1]}"
                    )
                rk, kk = statistics_from_factors(arrays["kf"], arrays["rf"])
                factor = torch.from_numpy(np.asarray(arrays["kf"], dtype=np.float64))
            else:
                if not positive_semidefinite(arrays["kk"]):
                    raise WorkerError("the summed K K^T is not positive semi-definite")
                rk, kk = torch.from_numpy(np.asarray(arrays["rk"])), torch.from_numpy(np.asarray(arrays["kk"]))
                factor = None
            betas = float(args["beta0"]), float(args["beta1"])
            participant.collab_apply(slot, int(args["apply"]), rk, kk, *betas, key_factor=factor)
            reply["report"] = asdict(participant.reports[-1])
        out: dict = {}
        if args.get("stats") is not None:
            index = int(args["stats"])
            stats, norm = participant.collab_statistics(
                slot,
                index,
                lowrank=lowrank,
                skip=tuple(args.get("skip", [])),
                conflicts=tuple(args.get("conflicts", [])),
            )
            reply["n"] = len(participant.slots[slot])
            reply["n_used"] = len(participant.used_rows(slot))
            if norm is not None:
                reply["resid_norm"] = norm
            reply["fingerprint"] = participant.editor.covariance.fingerprint
            if args.get("secure"):  # kept here until SecAgg+ asks for them (op_collab_masked)
                self._sealed[(spec.run, spec.name)] = (slot, index, stats["rk"], stats["kk"])
                reply["max_abs"] = float(max(np.abs(a).max(initial=0.0) for a in stats.values()))
            else:  # thin factors travel in float64: they are small, and the sums they carry keep exact
                out = {name: a.astype(np.float64 if lowrank else np.float32) for name, a in stats.items()}
        return reply, out

    def op_collab_masked(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        """The held-back statistics divided by the federation's ``scale`` (so that every value lies in
        SecAgg+'s clipping range); only SecAgg+ sees them, and it sends them masked."""
        sealed = self._sealed.get((spec.run, spec.name))
        want = (args.get("slot"), args.get("stats"))
        if sealed is None or sealed[:2] != want:
            held = "none" if sealed is None else f"slot {sealed[0]}, layer index {sealed[1]}"
            raise WorkerError(
                f"{spec.name}: no CollabEdit statistics held for slot {want[0]}, layer index "
                f"{want[1]} (held: {held}; did the worker restart?)"
            )
        scale = float(args["scale"])
        _, _, rk, kk = self._sealed.pop((spec.run, spec.name))
        return {}, {"rk": rk / scale, "kk": kk / scale}

    def op_rejected(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        log.error("the server rejected %s's upload: %s", spec.name, args.get("error"))
        return {"acknowledged": True}, {}

    def op_evaluate(self, spec: ClientSpec, args: dict, arrays: dict) -> tuple[dict, dict]:
        """Metrics of the client's own edited requests and, in simulation (oracle), of the other
        clients' requests it absorbed: ``others='reedited'`` (FedEdit), ``'all'`` (merged strategies)."""
        participant = self.participant(spec)
        editor = participant.editor
        kind = dataset_kind(resolve_data(spec.requests))
        own = participant.edited_requests()
        absorbed = self._absorbed(spec, participant, args.get("others", "none"))
        limit = int(args.get("others_limit", 0) or 0)
        if 0 < limit < len(absorbed):  # an even sample over the senders, to bound the evaluation's cost
            absorbed = [absorbed[i * len(absorbed) // limit] for i in range(limit)]
        others = [r for _, r in absorbed]
        fluency = bool(args.get("fluency", False))
        participant.activate()
        others_result = evaluate(editor.model, editor.tok, others, kind) if others else None
        reply = {
            "client": spec.name,
            "kind": kind,
            "n_own": len(own),
            "n_others": len(others),
            "own": _metrics(evaluate(editor.model, editor.tok, own, kind, fluency=fluency)) if own else None,
            "others": _metrics(others_result),
            "reports": [asdict(r) for r in participant.reports],
        }
        if args.get("per_request"):
            reply["reedited_ids"] = list(participant.reedited_ids)
            reply["others_ids"] = [rid for rid, _ in absorbed]
            rows = others_result["per_request"] if others_result else []
            reply["others_per_request"] = [{k: v for k, v in row.items() if k != "case_id"} for row in rows]
        shown = own[:1] + others[:1]
        after = generate_greedy(editor.model, editor.tok, [r.text for r in shown], max_new_tokens=10)
        reply["own_before"] = reply["others_before"] = None  # the unedited model's, when asked for
        with editor.at_base():
            if args.get("baseline", True):
                reply["own_before"] = _metrics(evaluate(editor.model, editor.tok, own, kind)) if own else None
                reply["others_before"] = _metrics(evaluate(editor.model, editor.tok, others, kind)) if others else None
            before = generate_greedy(editor.model, editor.tok, [r.text for r in shown], max_new_tokens=10)
        generations = [
            {
                "prompt": r.text,
                "target": r.target_new,
                "whose": "own" if i < len(own[:1]) else "other",
                "before": " ".join(b[len(r.text) :].split()),
                "after": " ".join(a[len(r.text) :].split()),
            }
            for i, (r, b, a) in enumerate(zip(shown, before, after))
        ]
        # text stays on the client: written beside its checkpoint, never put in the reply
        path = generations_path(spec.state_dir, spec.run, spec.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(generations, indent=1))
        return reply, {}

    @staticmethod
    def _absorbed(spec: ClientSpec, participant: Participant, which: str) -> list[tuple[str, EditRequest]]:
        """(MKV id ``<client>/<slot>/<index>``, request) of the other clients' requests this one took in."""
        if which == "none" or not spec.oracle:
            return []
        slots = {name: split_into_slots(reqs, spec.num_slots) for name, reqs in spec.requests_by_client().items()}
        if which == "all":
            return [
                (f"{name}/{t}/{i}", r)
                for name, s in slots.items()
                if name != spec.name
                for t, slot in enumerate(s[: participant.next_slot])
                for i, r in enumerate(slot)
            ]
        if which == "reedited":
            out = []
            for rid in participant.reedited_ids:  # ids with no request behind them (a crafted set) are skipped
                name, slot, index = rid.rsplit("/", 2)
                sender_slots, slot, index = slots.get(name, []), int(slot), int(index)
                if slot < len(sender_slots) and index < len(sender_slots[slot]):
                    out.append((rid, sender_slots[slot][index]))
            return out
        raise WorkerError(f"others must be 'none', 'reedited' or 'all', got {which!r}")
