"""``python -m bench.faults --json OUT``: every kill point of every strategy (``kills``) and the
poisoning member against the default job (``poisoning``).

Writes ``{"runs": [{strategy, kill_at, killed, completed, max_weight_diff_vs_uninterrupted,
sets_lost, sets_applied_twice}, ...], "poisoning": {victim_score_clean, victim_score_undefended,
victim_score_defended, clean_score_defences_on, ...}}``. ``--parts`` runs some of them; the others
are kept from an existing OUT (each block names the commit that measured it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.faults.kills import ROOT, STRATEGIES, prepare_world, run_strategy
from fededit_core.io import atomic_write

PARTS = ("kills", "poisoning")


def commit() -> str:
    """The checkout's commit, with ``+changes`` when the tree differs from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True)
    return (head.stdout.strip() or "unknown") + ("+changes" if dirty.stdout.strip() else "")


def kills(strategies: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="fededit-faults-") as folder:
        root = Path(folder)
        world = prepare_world(root)
        runs = [row for strategy in strategies for row in run_strategy(strategy, world, root)]
    bad = [r["kill_at"] for r in runs if not r["completed"] or r["sets_lost"] or r["sets_applied_twice"]]
    worst = max((r.get("max_weight_diff_vs_uninterrupted", 0.0) for r in runs), default=0.0)
    print(f"{len(runs)} kill points, {len(bad)} failed {bad}, largest relative weight difference {worst:.3g}")
    return {"runs": runs}


def poisoning() -> dict:
    from bench.faults.poisoning import measure, summary

    result = measure()
    print(summary(result))
    return {"poisoning": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = parser.parse_args()
    result = json.loads(args.json.read_text()) if args.json.is_file() else {}
    result.setdefault("poisoning", {"measured": False})
    for part in args.parts:
        started = time.perf_counter()
        block = kills(args.strategies) if part == "kills" else poisoning()
        result.update(block)
        result.setdefault("measured_by", {})[part] = {
            "commit": commit(),
            "seconds": round(time.perf_counter() - started),
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
