"""One benchmark experiment = one federated run (or the centralised edit) on a prepared workload.

An experiment is a plain dict of its inputs (data set, edits, partition, clients, slots, method,
α, reuse, ...). Its result is cached as JSON under ``<cache>/results/<key>.json`` with
key = sha256(inputs, data file digest, model), so an interrupted benchmark continues where it
stopped and methods that share work share it (z on the base model: ``fededit_core.zcache``).

Federated runs go through ``strategies.federation.run_federation`` with in-process edit workers:
the same strategy and worker steps as a Flower run, without the Flower transport.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path

from bench import collab_workloads
from bench.inprocess import InProcessTransport
from fededit_core.client.worker import ClientSpec, EditWorker
from fededit_core.data.loaders import DEFAULT_ZSRE_TARGET, load_requests, save_requests_jsonl
from fededit_core.data.partition import client_name, partition_requests
from fededit_core.data.requests import EditRequest
from fededit_core.data.slots import split_into_slots
from fededit_core.eval.centralised import centralised_metrics
from fededit_core.eval.metrics import evaluate
from fededit_core.fedleke.probe import DEFAULT_PROBE_TAU
from fededit_core.fedleke.reedit import DEFAULT_ALPHA, DEFAULT_GATE, DEFAULT_VECTOR
from fededit_core.io import atomic_write
from fededit_core.memit.dynamic_covariance import DEFAULT_BETA1
from fededit_core.memit.update import DEFAULT_STATISTICS_FORM
from strategies.collabedit import DEFAULT_CONFLICT_POLICY, DEFAULT_DEDUP
from strategies.federation import run_federation
from strategies.report import weighted
from strategies.settings import RunSettings

log = logging.getLogger("fededit.bench")


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def experiment_key(exp: dict) -> str:
    return hashlib.sha256(json.dumps(exp, sort_keys=True).encode()).hexdigest()[:20]


# --- workloads -----------------------------------------------------------------------------------
def select_requests(path: Path, n: int, seed: int, zsre_target: str = DEFAULT_ZSRE_TARGET) -> list[EditRequest]:
    """``n`` requests of the file: the first ``n`` of a seeded permutation, in file order (so the
    requests of a smaller preset are among those of a larger one, and share their cached z)."""
    requests = load_requests(path, zsre_target=zsre_target)
    if n > len(requests):
        raise ValueError(f"{path}: {n} edits asked for, the file has {len(requests)}")
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)  # the same permutation for every n: a smaller draw is a subset
    return [requests[i] for i in sorted(order[:n])]


def add_overlap(parts: dict[str, list[EditRequest]], share: float, seed: int) -> dict[str, list[EditRequest]]:
    """About ``share`` of all requests also appear at one other client: copies taken from the first
    half of their owner's list (edited in early slots) and appended to another client's list (edited
    in late slots), so the copy can reuse the z the owner uploaded."""
    rng = random.Random(seed)
    names = sorted(parts)
    total = sum(len(v) for v in parts.values())
    pool = [(name, r) for name in names for r in parts[name][: max(1, len(parts[name]) // 2)]]
    picked = rng.sample(pool, min(len(pool), round(share * total)))
    out = {name: list(reqs) for name, reqs in parts.items()}
    for owner, request in picked:
        other = rng.choice([n for n in names if n != owner])
        out[other].append(request)
    return out


def workload(exp: dict, data_files: dict[str, Path]) -> dict[str, list[EditRequest]]:
    """``{client: requests}`` of an experiment, from its inputs alone."""
    return workload_and_meta(exp, data_files)[0]


def workload_and_meta(exp: dict, data_files: dict[str, Path]) -> tuple[dict[str, list[EditRequest]], dict]:
    """The workload and, for CollabEdit's challenge workloads (``exp["workload"]``), what the
    inspection of the merged model needs (``bench.collab_workloads``)."""
    path = data_files[exp["dataset"]]
    target = exp.get("zsre_target", DEFAULT_ZSRE_TARGET)
    requests = select_requests(path, exp["n_edits"], exp["seed"], target)
    if exp.get("workload"):
        return collab_workloads.build(exp, requests, load_requests(path, zsre_target=target))
    parts = partition_requests(requests, exp["n_clients"], exp["partition"], exp["seed"])
    if exp.get("overlap", 0):
        parts = add_overlap(parts, exp["overlap"], exp["seed"])
    return parts, {}


def write_workload(parts: dict[str, list[EditRequest]], path: Path, kind: str) -> Path:
    """One JSON Lines file with a ``client`` field per record (partition scheme ``field``), evaluated
    as ``kind`` (zsRE requests keep their token-accuracy metrics)."""
    names = sorted(parts)
    return save_requests_jsonl(
        [r for n in names for r in parts[n]], path, kind, extra=[{"client": n} for n in names for _ in parts[n]]
    )


# --- running ---------------------------------------------------------------------------------------
class Runner:
    """Runs experiments once each; results cached under ``cache/results``."""

    def __init__(
        self,
        cache: Path,
        data_files: dict[str, Path],
        model: str,
        hparams: dict,
        worker: EditWorker,
        plain_worker_factory=None,
        device: str = "cpu",
        dtype: str = "fp32",
    ):
        self.cache, self.data_files, self.model, self.hparams = cache, data_files, model, hparams
        self.device, self.dtype = device, dtype
        self.worker = worker  # shares z optimised on the base model (BaseZCache)
        self.plain_worker_factory = plain_worker_factory  # a worker that optimises z for real (overlap)
        self._plain_worker: EditWorker | None = None
        self.digests = {name: file_digest(p) for name, p in data_files.items()}
        (cache / "results").mkdir(parents=True, exist_ok=True)

    def full_inputs(self, exp: dict) -> dict:
        return {
            **exp,
            "model": self.model,
            "hparams": self.hparams,
            "data": self.digests[exp["dataset"]],
            "device": self.device,
            "dtype": self.dtype,
        }

    def result_path(self, exp: dict) -> Path:
        return self.cache / "results" / f"{experiment_key(self.full_inputs(exp))}.json"

    def cached(self, exp: dict) -> dict | None:
        path = self.result_path(exp)
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, exp: dict) -> dict:
        done = self.cached(exp)
        if done is not None:
            return done
        label = " ".join(f"{k}={v}" for k, v in exp.items())
        log.info("running %s", label)
        started = time.perf_counter()
        result = self._centralised(exp) if exp["method"] == "centralised" else self._federated(exp)
        result = {"inputs": self.full_inputs(exp), "wall_s": time.perf_counter() - started, **result}
        atomic_write(self.result_path(exp), json.dumps(result, indent=1, default=str))
        return result

    def _worker_for(self, exp: dict) -> EditWorker:
        if not exp.get("real_z"):
            return self.worker
        if self._plain_worker is None:
            self._plain_worker = self.plain_worker_factory()
        return self._plain_worker

    def _centralised(self, exp: dict) -> dict:
        parts = workload(exp, self.data_files)
        spec = ClientSpec(
            run="bench",
            name=client_name(0),
            model=self.model,
            hparams=self.hparams,
            device=self.device,
            dtype=self.dtype,
            requests="builtin",
            state_dir=str(self.cache / "work"),
        )
        editor = self._worker_for(exp).editor(spec)  # the model only: the requests come from ``parts``
        editor.reset()
        unedited = {
            c: evaluate(editor.model, editor.tok, reqs, exp["kind"], fluency=exp.get("fluency", False))
            for c, reqs in parts.items()
            if reqs
        }
        curve: list[dict] = []
        firsts = [r for reqs in parts.values() for r in split_into_slots(reqs, exp["n_slots"])[0]]

        def first_slot(t: int, edited) -> None:  # the first slot's edits after slot t (issue: forgetting curve)
            m = evaluate(edited.model, edited.tok, firsts, exp["kind"])
            curve.append({"slot": t, **{k: v for k, v in m.items() if k != "per_request"}})

        metrics, seconds = centralised_metrics(
            editor,
            parts,
            exp["kind"],
            fluency=exp.get("fluency", False),
            n_slots=exp["n_slots"],
            per_request=True,
            after_slot=first_slot if exp.get("first_slot_curve") else None,
        )
        per_request = {
            c: [{k: v for k, v in row.items() if k != "case_id"} for row in m.pop("per_request")]
            for c, m in metrics.items()
        }
        return {
            "weighted": weighted([(len(parts[c]), m) for c, m in metrics.items()], exp["kind"]),
            "unedited": weighted([(len(parts[c]), m) for c, m in unedited.items()], exp["kind"]),
            "clients": metrics,
            "per_request": per_request,  # by client, in the order of its requests (the union evaluation)
            "seconds": seconds,
            **({"first_slot_curve": curve} if curve else {}),
        }

    def _specs(self, exp: dict, parts: dict[str, list[EditRequest]], work: Path) -> dict[str, ClientSpec]:
        data = write_workload(parts, work / "data.jsonl", exp["kind"])
        return {
            name: ClientSpec(
                run="bench",
                name=name,
                model=self.model,
                hparams=self.hparams,
                device=self.device,
                dtype=self.dtype,
                requests=str(data),
                partition="field",
                count=len(parts),
                num_slots=exp["n_slots"],
                state_dir=str(work / "state"),
                secret_file=str(work / "secret"),
                oracle=True,
                rollback_margin=None,  # the reproduction follows the paper: no rollback of re-edits
                reuse_min_prob=0.0,  # and reuses a stored z unchecked
            )
            for name in sorted(parts)
        }

    def _federated(self, exp: dict) -> dict:
        parts, meta = workload_and_meta(exp, self.data_files)
        work = self.cache / "work" / experiment_key(self.full_inputs(exp))
        shutil.rmtree(work, ignore_errors=True)  # an interrupted experiment starts over
        work.mkdir(parents=True)
        specs = self._specs(exp, parts, work)
        worker = self._worker_for(exp)
        settings = RunSettings(
            run="bench",
            strategy=exp["method"],
            num_slots=exp["n_slots"],
            alpha=exp.get("alpha", DEFAULT_ALPHA),
            gate=exp.get("gate", DEFAULT_GATE),
            vector=exp.get("vector", DEFAULT_VECTOR),
            probe_tau=exp.get("tau", DEFAULT_PROBE_TAU),
            collab_transport=exp.get("collab_transport", DEFAULT_STATISTICS_FORM),
            collab_dedup=exp.get("collab_dedup", DEFAULT_DEDUP),
            collab_conflict=exp.get("collab_conflict", DEFAULT_CONFLICT_POLICY),
            collab_beta1=exp.get("beta1", DEFAULT_BETA1),
            reuse=exp.get("reuse", True),
            fluency=exp.get("fluency", False),
            baseline=False,
            others_limit=exp.get("others_limit", 0),
            per_request=True,
            store_path=work / "mkv_store.sqlite",
        )
        curve: list[dict] = []

        def first_slot(slot: int) -> None:  # each client's own first-slot edits, on its model after ``slot``
            scores = []
            for spec in specs.values():
                participant = worker.participant(spec)
                if participant.slots and participant.slots[0]:
                    participant.activate()
                    m = evaluate(participant.editor.model, participant.editor.tok, participant.slots[0], exp["kind"])
                    scores.append((len(participant.slots[0]), m))
            curve.append({"slot": slot, **(weighted(scores, exp["kind"]) or {})})

        try:
            report = run_federation(
                InProcessTransport(specs, worker, keep_log=False),
                list(specs),
                settings,
                config=self.full_inputs(exp),
                progress=True,
                after_slot=first_slot if exp.get("first_slot_curve") else None,
            )
            inspected = {}
            if exp.get("workload"):  # CollabEdit: every client holds the merged model; read the first's
                participant = worker.participant(next(iter(specs.values())))
                participant.activate()
                editor = participant.editor
                inspected = {"inspect": collab_workloads.inspect(exp, editor.model, editor.tok, parts, meta)}
        finally:
            worker.forget("bench")
            shutil.rmtree(work, ignore_errors=True)
        for c in report["clients"]:
            c.pop("generations", None)
        return {"report": report, **inspected, **({"first_slot_curve": curve} if curve else {})}
