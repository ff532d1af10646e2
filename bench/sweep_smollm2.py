"""Sweep of MEMIT's edited layers and lambda on SmolLM2-135M (the README's "SmolLM2 sweep" table).

    python -m bench.sweep_smollm2 --n 32 --json runs/bench/sweep_smollm2.json

Requests come from CounterFact's train split (the benchmark evaluates on the val split). z depends
only on L = max(R), so every setting with the same L reuses the same z.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fededit_core.model.loading import DEFAULT_MODEL


def sweep_parser(description: str, n: int) -> argparse.ArgumentParser:
    """The arguments every SmolLM2 sweep takes: --n requests of --data, --model, --json."""
    from bench.reproduce import DEFAULT_DATA

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--data", default=str(DEFAULT_DATA["counterfact"]), help="CounterFact file")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--json")
    return parser


LAYER_SETS = [(2, 3, 4, 5, 6), (3, 4, 5, 6, 7), (4, 5, 6, 7, 8), (6, 7, 8, 9, 10), (8, 9, 10, 11, 12)]
LAMBDAS = [1000.0, 5000.0, 15000.0]


def main(argv: list[str] | None = None) -> int:
    from fededit_core.data.loaders import load_requests
    from fededit_core.eval.metrics import counterfact_metrics
    from fededit_core.eval.tables import format_table
    from fededit_core.memit.editor import MemitEditor, hparams_for
    from fededit_core.memit.templates import sample_context_templates
    from fededit_core.model.loading import configure_threads, load_model
    from fededit_core.paths import recorded_path

    args = sweep_parser(__doc__, 32).parse_args(argv)
    configure_threads()
    data = Path(args.data)
    requests = load_requests(data, n=args.n)
    model, tok = load_model(args.model)
    templates = sample_context_templates(model, tok)
    unedited = counterfact_metrics(model, tok, requests)
    rows = [{"layers": "unedited", "lambda": None, **{k: unedited[k] for k in ("es", "ps", "ns", "score")}}]
    for layers in LAYER_SETS:
        z = None
        for lam in LAMBDAS:
            editor = MemitEditor(model, tok, hparams_for(model, layers=layers, mom2_weight=lam), templates=templates)
            z = z or editor.compute_z(requests)
            result = editor.edit(requests, z=z)
            metrics = counterfact_metrics(model, tok, requests)
            editor.reset()
            rows.append(
                {
                    "layers": f"{layers[0]}-{layers[-1]}",
                    "lambda": lam,
                    "z_s": z.seconds,
                    "layers_s": result.seconds["layers"],
                    **{k: metrics[k] for k in ("es", "ps", "ns", "score")},
                }
            )
            print(format_table(rows[-1:]), flush=True)
    print(format_table(rows, ["layers", "lambda", "es", "ps", "ns", "score", "z_s", "layers_s"]))
    print()
    print(format_table(rows, ["layers", "lambda", "es", "ps", "ns", "score"], markdown=True))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {"n": len(requests), "data": recorded_path(data), "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
