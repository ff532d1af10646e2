"""FedEdit's main-table run at other α of the re-edit condition (Eq. 8), for any editor: what keeping
more of the other clients' MKVs does to the Score.

    python -m bench.gate_alpha --editor pmet --alphas 0.15,0.1 [--dataset counterfact]

Each run is the benchmark's ``main`` FedEdit experiment (``bench.reproduce.plan``) with only α
changed, cached with the benchmark's results; retention is against the editor's centralised run of
the same workload (run first when it is not cached). The gate replay without editing is
``bench.gate_analysis``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.reproduce import DEFAULT_DATA, PRESETS, Preset, make_runner, plan
from bench.tables import central_row, federated_row
from fededit_core.cli import add_hparam_args, add_model_args
from fededit_core.eval.tables import format_table
from fededit_core.memit.hparams import DEFAULT_EDITOR
from fededit_core.memit.overrides import memit_overrides
from fededit_core.paths import cache_dir

COLUMNS = {
    "counterfact": ["alpha", "kept_sets", "applied", "es", "ps", "ns", "score", "retention"],
    "zsre": ["alpha", "kept_sets", "applied", "ea", "pa", "na", "score", "retention"],
}


def sweep(preset: Preset, runner, dataset: str, editor: str, alphas: list[float]) -> list[dict]:
    """One row per α: the sets kept and MKVs applied, the weighted metrics and the retention."""
    planned = plan(preset, "main", dataset, editor)
    central = central_row(runner.run(planned["unedited+centralised"]))
    rows = []
    for alpha in alphas:
        row = federated_row(runner.run({**planned["fededit"], "alpha": alpha}), central, dataset)
        rows.append({"alpha": alpha, **{k: row.get(k) for k in COLUMNS[dataset][1:]}})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gate_alpha", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DEFAULT_DATA), default="counterfact")
    p.add_argument("--alphas", required=True, help="comma-separated, e.g. 0.15,0.1")
    p.add_argument("--data", default=None, help="the data set's file (default: the benchmark's)")
    p.add_argument("--cache", default=None, help="cache folder (default <fededit cache>/bench)")
    add_model_args(p)
    add_hparam_args(p)  # the benchmark's options: the same settings find the same cached runs
    args = p.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a]
    except ValueError:
        p.error(f"--alphas takes comma-separated numbers, got {args.alphas!r}")
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        p.error(f"each α is a cosine threshold in [0, 1], got {args.alphas!r}")
    data = Path(args.data or DEFAULT_DATA[args.dataset])
    if not data.is_file():
        p.error(f"{args.dataset} data {data} not found: pass --data PATH")
    cache = Path(args.cache) if args.cache else cache_dir("bench")
    hparams = memit_overrides(vars(args))
    runner = make_runner(cache, {args.dataset: data}, args.model, args.device, args.dtype, hparams)
    rows = sweep(PRESETS["default"], runner, args.dataset, hparams.get("editor", DEFAULT_EDITOR), alphas)
    print(format_table(rows, COLUMNS[args.dataset], markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
