"""CollabEdit's forgetting experiment at this machine's scale: old edits first, then rounds of new
ones, and the Score of the old edits after every round, with plain MEMIT statistics (beta1 = 0)
and with the dynamic covariance (beta1 = 1, the CollabEdit authors' setting; the paper's Eq. 7).

    python -m bench.forgetting --data ../shared/data/counterfact/counterfact-train.json \
        --json results/bench/forgetting.json

Each of ``--clients`` clients holds ``--per-round`` requests per round; round 0 holds the old edits.
The run with k rounds is a CollabEdit federation of the first k rounds (one time slot each). Every
client ends with the same merged model, on which the old edits of all clients are evaluated. Each
request's z is optimised once on the base model (``bench.zcache``), as in the reproduction
benchmark. The JSON is rewritten after every run, and a rerun keeps the runs it already holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tqdm import tqdm

from bench.experiments import select_requests, write_workload
from bench.inprocess import InProcessTransport
from bench.zcache import BaseZCache
from fededit_core.client.worker import ClientSpec, EditWorker
from fededit_core.data.clients import client_name
from fededit_core.data.loaders import dataset_kind
from fededit_core.eval.metrics import evaluate
from fededit_core.io import atomic_write
from fededit_core.model.loading import DEFAULT_MODEL
from fededit_core.paths import cache_dir
from strategies.federation import run_federation
from strategies.settings import RunSettings


def rounds_of(data: Path, clients: int, per_round: int, rounds: int, seed: int) -> dict[str, list]:
    """client -> its requests, ``per_round`` per round, in round order."""
    requests = select_requests(data, clients * per_round * rounds, seed)
    return {client_name(i): requests[i::clients] for i in range(clients)}


def old_edits_after(
    k: int, beta1: float, parts: dict[str, list], per_round: int, work: Path, worker: EditWorker, base: dict
) -> dict:
    """Metrics of round 0's requests after a CollabEdit federation of rounds 0..k-1."""
    run = f"forget-b{beta1:g}-k{k}"
    folder = work / run
    shutil.rmtree(folder, ignore_errors=True)
    prefix = {c: reqs[: k * per_round] for c, reqs in parts.items()}
    data = write_workload(prefix, folder / "data.jsonl", base["kind"])
    specs = {
        c: ClientSpec(
            run=run,
            name=c,
            model=base["model"],
            hparams=base["hparams"],
            requests=str(data),
            partition="field",
            count=len(parts),
            num_slots=k,
            state_dir=str(folder / "state"),
            secret_file=str(work / "federation.secret"),
            oracle=True,
        )
        for c in parts
    }
    settings = RunSettings(
        run=run,
        strategy="collabedit",
        num_slots=k,
        collab_beta1=beta1,
        centralised=False,
        baseline=False,
        store_path=folder / "store.sqlite",
    )
    try:
        run_federation(InProcessTransport(specs, worker, keep_log=False), list(specs), settings, {}, progress=False)
        participant = worker.participant(next(iter(specs.values())))
        participant.activate()
        old = [r for reqs in parts.values() for r in reqs[:per_round]]
        editor = participant.editor
        metrics = evaluate(editor.model, editor.tok, old, base["kind"])
    finally:
        worker.forget(run)
        shutil.rmtree(folder, ignore_errors=True)
    return {k: v for k, v in metrics.items() if k != "per_request"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="fededit bench forgetting", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a CounterFact (or zsRE) request file")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--per-round", type=int, default=4, help="requests per client and round")
    p.add_argument("--rounds", type=int, default=5, help="round 0 (the old edits) and the new rounds")
    p.add_argument("--beta1", type=float, nargs="+", default=[0.0, 1.0], help="dynamic covariance weights")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--hparams", default="{}", help="MEMIT overrides as JSON (tests: a tiny model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(cache_dir("bench") / "forgetting"), help="runs and the z cache")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    data = Path(args.data)
    base = {"model": args.model, "hparams": json.loads(args.hparams), "kind": dataset_kind(data)}
    config = {
        "data": data.name,
        "clients": args.clients,
        "per_round": args.per_round,
        "rounds": args.rounds,
        "seed": args.seed,
        "model": args.model,
    }
    out_path = Path(args.json)
    out = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if out.get("config") != config:
        out = {"config": config, "rows": []}
    done = {(r["beta1"], r["rounds"]) for r in out["rows"]}
    parts = rounds_of(data, args.clients, args.per_round, args.rounds, args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    worker = EditWorker(z_cache=BaseZCache(work / "zcache"))
    todo = [(b, k) for b in args.beta1 for k in range(1, args.rounds + 1) if (b, k) not in done]
    for beta1, k in tqdm(todo, desc="forgetting runs"):
        metrics = old_edits_after(k, beta1, parts, args.per_round, work, worker, base)
        row = {"beta1": beta1, "rounds": k, **metrics}
        print(json.dumps(row))
        out["rows"] = sorted([*out["rows"], row], key=lambda r: (r["beta1"], r["rounds"]))
        atomic_write(out_path, json.dumps(out, indent=1))
    for beta1 in args.beta1:
        row = next(r for r in out["rows"] if r["beta1"] == beta1 and r["rounds"] == args.rounds)
        print(f"beta1 {beta1:g}: old edits' Score after {args.rounds - 1} new rounds {row['score']:.3f}")
    return out


if __name__ == "__main__":
    main()
