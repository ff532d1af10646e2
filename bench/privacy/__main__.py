"""The privacy benchmark: ``fededit bench privacy --data FILE --n N --pool FILE --json OUT``
(= ``python -m bench.privacy ...``).

N victims (the first N records of ``--data``) are edited by a real federation (``run_federation``
with in-process clients, ``bench/inprocess.py``; 4 clients, iid, 2 time slots, z optimised once on
the base model and shared by every run, ``bench/zcache.py``) under each of: FedEdit plaintext and
sealed, CollabEdit plain and with secure aggregation, EditAvg. The attacks of ``attacks.py`` then
run on exactly what the server holds afterwards: its MKV store (FedEdit) and the messages it
exchanged (the transport's log; for secure aggregation the sums it learnt). Candidates: the
victims' subjects among ``--pool-size`` other subjects of ``--pool``; objects: every distinct
new object of the victims and of those pool records.

On the sealed path the server holds blobs: it reads their payload bytes as the documented float32
layout (z, delta, keys) and attacks those "vectors", as a curious server would; non-finite values
become 0 and rows are rescaled to the norm of a typical hidden state before z is injected.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.experiments import write_workload
from bench.inprocess import InProcessTransport
from bench.privacy.attacks import Attacker, basis_of_delta, basis_of_kk, top_k
from bench.zcache import BaseZCache
from fededit_core.client.worker import ClientSpec, EditWorker
from fededit_core.data.clients import client_name
from fededit_core.data.loaders import dataset_kind, load_requests
from fededit_core.data.slots import split_into_slots
from fededit_core.fedleke.sealing import HEADER, TAG_BYTES
from fededit_core.memit.update import DEFAULT_STATISTICS_FORM, statistics_from_factors
from fededit_core.model.loading import DEFAULT_MODEL
from fededit_core.paths import cache_dir
from strategies.federation import run_federation
from strategies.settings import RunSettings
from strategies.store import MKVStore

N_CLIENTS, N_SLOTS = 4, 2
RUNS = {  # name -> (strategy, seal-mkvs, secure-aggregation)
    "fededit/plaintext": ("fededit", False, False),
    "fededit/sealed": ("fededit", True, False),
    "collabedit": ("collabedit", False, False),
    "collabedit_secagg": ("collabedit", False, True),
    "editavg": ("editavg", False, False),
}


def workload(data: str, n: int, pool_file: str, pool_size: int, seed: int):
    """(client -> victims, candidate subjects, candidate objects)."""
    victims = load_requests(data, n)
    if len(victims) < n:
        raise SystemExit(f"{data} holds {len(victims)} records, fewer than --n {n}")
    own = {r.subject for r in victims}
    others, objects = [], {r.target_new for r in victims}
    for record in load_requests(pool_file):
        if record.subject not in own and record.subject not in others:
            others.append(record.subject)
            objects.add(record.target_new)
        if len(others) == pool_size:
            break
    subjects = sorted(own) + others
    random.Random(seed).shuffle(subjects)
    parts = {client_name(i): victims[i::N_CLIENTS] for i in range(N_CLIENTS)}
    return parts, subjects, sorted(objects)


def run_one(name: str, parts: dict, work: Path, worker: EditWorker, model: str, hparams: dict, kind: str):
    strategy, seal, secure = RUNS[name]
    folder = work / name.replace("/", "-")
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted run starts over
    data = write_workload(parts, folder / "data.jsonl", kind)
    specs = {
        c: ClientSpec(
            run="privacy",
            name=c,
            model=model,
            hparams=hparams,
            requests=str(data),
            partition="field",
            count=N_CLIENTS,
            num_slots=N_SLOTS,
            state_dir=str(folder / "state"),
            secret_file=str(work / "federation.secret"),
            oracle=True,
            allow_plaintext_mkvs=not seal,
        )
        for c in parts
    }
    settings = RunSettings(
        run="privacy",
        strategy=strategy,
        num_slots=N_SLOTS,
        seal_mkvs=seal,
        secure_aggregation=secure,
        collab_transport="dense" if secure else DEFAULT_STATISTICS_FORM,
        centralised=False,
        baseline=False,
        store_path=folder / "mkv_store.sqlite",
    )
    transport = InProcessTransport(specs, worker)
    started = time.perf_counter()
    report = run_federation(transport, list(specs), settings, settings.run_config(), progress=False)
    return report, transport, folder / "mkv_store.sqlite", time.perf_counter() - started


def victim_of(parts: dict, client: str, slot: int, i: int):
    return split_into_slots(parts[client], N_SLOTS)[slot][i]


def fededit_view(store_path: Path, d: int, d_ff: int, n_layers: int):
    """(client, slot, z rows, first-layer key rows) of every stored upload: its arrays, or on the
    sealed path its blob's payload bytes read as the float32 layout."""
    store = MKVStore(store_path)
    for upload in store.uploads("privacy"):
        n = len(upload.ids)
        if not n:
            continue
        if "sealed" in upload.arrays:
            payload = upload.arrays["sealed"].tobytes()[HEADER:-TAG_BYTES]
            values = np.frombuffer(payload, dtype="<f4").astype(np.float64)
            z = values[: n * d].reshape(n, d)
            keys = values[2 * n * d : 2 * n * d + n * n_layers * d_ff].reshape(n, n_layers, d_ff)
        else:
            z, keys = upload.arrays["z"].astype(np.float64), upload.arrays["keys"].astype(np.float64)
        yield upload.client, upload.slot, z, keys[:, 0]
    store.close()


def set_views(name: str, transport: InProcessTransport, layer: int):
    """(client or 'sum', slot, m, kind, arrays) of every statistic the server saw at the first layer."""
    if name == "collabedit":
        for client, ins, reply in transport.log:
            if ins.op == "collab" and ins.args.get("stats") == 0 and reply.arrays:
                yield client, ins.args["slot"], reply.body["n"], "collab", dense_statistics(reply.arrays)
    elif name == "collabedit_secagg":
        for args, sums in transport.sums:
            if args["stats"] == 0:
                scaled = {k: v.astype(np.float64) * args["scale"] for k, v in sums.items()}
                yield "sum", args["slot"], None, "collab", scaled
    elif name == "editavg":
        for client, ins, reply in transport.log:
            if ins.op == "editavg_update" and f"delta.{layer}" in reply.arrays:
                yield client, ins.args["slot"], reply.body["n"], "editavg", {"delta": reply.arrays[f"delta.{layer}"]}


def dense_statistics(arrays: dict) -> dict:
    """R K^T and K K^T as the server can form them from either transport (thin factors or dense)."""
    if "kf" not in arrays:
        return arrays
    rk, kk = statistics_from_factors(arrays["kf"], arrays["rf"])
    return {"rk": rk.numpy(), "kk": kk.numpy()}


def attack_keys(attacker: Attacker, parts: dict, view, objects: dict, h_norm: float) -> dict:
    subject_ranks, object_ranks = [], []
    for client, slot, z, keys in view:
        cos = attacker.nearest(keys)
        for i in range(len(z)):
            victim = victim_of(parts, client, slot, i)
            truth = attacker.subjects.index(victim.subject)
            subject_ranks.append(attacker.rank_of(cos[i], truth))
            guess = attacker.subjects[int(np.nanargmax(cos[i]))] if np.isfinite(cos[i]).any() else attacker.subjects[0]
            scores = attacker.object_scores(guess, plausible(z[i], h_norm))
            object_ranks.append(attacker.rank_of(scores, objects[victim.target_new]))
    return figures(subject_ranks, object_ranks)


def attack_sets(attacker: Attacker, parts: dict, views, objects: dict) -> dict:
    subject_ranks, object_ranks = [], []
    for who, slot, m, kind, arrays in views:
        clients = list(parts) if who == "sum" else [who]
        victims = [r for c in clients for r in split_into_slots(parts[c], N_SLOTS)[slot]]
        if not victims:
            continue
        m = len(victims) if m is None else m  # a sum: the server knows the slot's total count
        truths = [attacker.subjects.index(r.subject) for r in victims]
        if kind == "collab":
            scores = attacker.subspace_scores(basis_of_kk(arrays["kk"].astype(np.float64), m))
        else:
            scores = attacker.subspace_scores(basis_of_delta(arrays["delta"].astype(np.float64), m), editavg=True)
        for truth in truths:
            subject_ranks.append(attacker.rank_of(scores, truth, set(truths) - {truth}))
        found = [int(i) for i in np.argsort(scores)[::-1][:m]]
        rk = arrays["rk"].astype(np.float64) if kind == "collab" else attacker.editavg_rk(arrays["delta"], found)
        z_hat = attacker.z_estimates(attacker.residuals(rk, found), found)
        for victim, truth in zip(victims, truths):
            if truth not in found:
                object_ranks.append(len(objects))
                continue
            row = found.index(truth)
            scores_o = attacker.object_scores(attacker.subjects[truth], z_hat[row])
            object_ranks.append(attacker.rank_of(scores_o, objects[victim.target_new]))
    return figures(subject_ranks, object_ranks)


def plausible(z: np.ndarray, h_norm: float) -> np.ndarray:
    """A row with its non-finite values 0, rescaled to 3 |h| when beyond 100 |h| (byte garbage)."""
    z = np.nan_to_num(np.asarray(z, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    norm = np.linalg.norm(z)
    return z * (3 * h_norm / norm) if norm > 100 * h_norm else z


def figures(subject_ranks: list[int], object_ranks: list[int]) -> dict:
    return {
        "subject_top1": top_k(subject_ranks, 1),
        "subject_top5": top_k(subject_ranks, 5),
        "object_top1": top_k(object_ranks, 1),
        "object_top5": top_k(object_ranks, 5),
        "victims": len(subject_ranks),
    }


def sealing_share(report: dict, seconds: float) -> dict:
    sealing = sum(c["seconds"].get("seal", 0.0) + c["seconds"].get("open", 0.0) for c in report["clients"])
    slots = seconds - report["server_seconds"].get("evaluate", 0.0)
    return {"seal_open_seconds": sealing, "slots_seconds": slots, "share": sealing / slots if slots else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="fededit bench privacy", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="CounterFact file whose first N records are the victims")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--pool", required=True, help="CounterFact file of candidate subjects and objects")
    p.add_argument("--pool-size", type=int, default=2000, help="candidate subjects besides the victims'")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(cache_dir("bench") / "privacy"), help="runs and the z cache")
    p.add_argument("--json", required=True, help="written after every run; a rerun keeps its finished runs")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="the runs to do")
    p.add_argument("--fresh", action="store_true", help="redo runs already in --json")
    args = p.parse_args(argv)

    kind = dataset_kind(Path(args.data))
    parts, subjects, object_list = workload(args.data, args.n, args.pool, args.pool_size, args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    worker = EditWorker(z_cache=BaseZCache(work / "zcache"))
    out: dict = {"n": args.n, "pool": len(subjects), "objects": len(object_list), "runs": {}}
    out["workload"] = {
        "data": Path(args.data).name,
        "pool": Path(args.pool).name,
        "seed": args.seed,
        "model": args.model,
    }
    out = earlier_runs(Path(args.json), out) if not args.fresh else out
    attacker = None
    objects = {o: i for i, o in enumerate(object_list)}
    todo = [name for name in args.runs if name not in out["runs"]]
    for name in tqdm(todo, desc="privacy runs"):
        report, transport, store, seconds = run_one(name, parts, work, worker, args.model, {}, kind)
        spec = next(iter(transport.specs.values()))
        editor = worker.editor(spec)
        if attacker is None:
            attacker = Attacker(editor, subjects, object_list)
            h_norm = float(np.linalg.norm(attacker.hidden(subjects[:64]), axis=1).mean())
        if name.startswith("fededit"):
            view = fededit_view(store, editor.d_model, editor.d_ff, len(editor.hp.layers))
            result = attack_keys(attacker, parts, view, objects, h_norm)
        else:
            result = attack_sets(attacker, parts, set_views(name, transport, attacker.layer), objects)
        result["score"] = (report["weighted"] or {}).get("score")
        result["bytes_up_per_client"] = sum(c["bytes_sent"] for c in report["clients"]) / len(report["clients"])
        if name.startswith("fededit"):
            result["sealing"] = sealing_share(report, seconds)
        out["runs"][name] = result
        print(name, json.dumps(result))
        write(Path(args.json), out)
    write(Path(args.json), out)
    return out


def earlier_runs(path: Path, out: dict) -> dict:
    """``out`` with the finished runs of an earlier ``--json`` on the same workload."""
    if not path.exists():
        return out
    earlier = json.loads(path.read_text())
    if any(earlier.get(k) != out[k] for k in ("n", "pool", "objects", "workload")):
        raise SystemExit(f"{path} holds runs of another workload; pass --fresh or another --json")
    return {**out, "runs": dict(earlier.get("runs", {}))}


def write(path: Path, out: dict) -> None:
    """The runs so far, also keyed as the issue's checks read them: strategy, then path."""
    for name, result in out["runs"].items():
        strategy, _, variant = name.partition("/")
        if variant:
            out.setdefault(strategy, {})[variant] = result
        else:
            out[name] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
