"""``python -m bench.faults --json OUT``: every kill point of every strategy (``kills``).

Writes ``{"runs": [{strategy, kill_at, killed, completed, max_weight_diff_vs_uninterrupted,
sets_lost, sets_applied_twice}, ...], "poisoning": ...}``. The poisoning block against the default
job is not measured yet (it needs four SmolLM2 default jobs); it says so instead of a number.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.faults.kills import STRATEGIES, prepare_world, run_strategy
from fededit_core.io import atomic_write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True, help="where to write the results")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fededit-faults-") as folder:
        root = Path(folder)
        world = prepare_world(root)
        runs = [row for strategy in args.strategies for row in run_strategy(strategy, world, root)]
    result = {
        "runs": runs,
        "poisoning": {"measured": False, "why": "not run yet: needs four SmolLM2 default jobs (README)"},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.json, json.dumps(result, indent=1))
    bad = [r["kill_at"] for r in runs if not r["completed"] or r["sets_lost"] or r["sets_applied_twice"]]
    worst = max((r.get("max_weight_diff_vs_uninterrupted", 0.0) for r in runs), default=0.0)
    print(f"{len(runs)} kill points, {len(bad)} failed {bad}, largest relative weight difference {worst:.3g}")


if __name__ == "__main__":
    main()
