"""Sweep of AlphaEdit's and PMET's settings on SmolLM2-135M, edited in sequence (the README's "Editor
sweep" table), beside MEMIT's default.

    python -m bench.sweep_editors --n 48 --batches 4 --json runs/bench/sweep_editors.json
    python -m bench.sweep_editors --n 48 --batches 4 --editors pmet   # one editor's rows

The first ``n`` of the reproduction benchmark's CounterFact requests, edited in ``batches`` batches one
after another on one model (a federation's time slots). Each request's target is optimised once on
the base model and shared, as in the benchmark (``bench.zcache``: MEMIT's z serve AlphaEdit too, and
PMET's targets are cached under its own settings). Reported after the last batch: ES / PS / NS and
Score over all the edits, and the Score of the first batch's edits (what later edits left of them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.sweep_smollm2 import sweep_parser

SETTINGS = [
    {"editor": "memit"},
    *(
        {"editor": "alphaedit", "nullspace_threshold": t, "alphaedit_l2": l2}
        for t in (5e-3, 1e-2, 2e-2, 5e-2)
        for l2 in (1.0, 10.0, 100.0)
    ),
    *(
        {"editor": "pmet", "clamp_norm_factor": c, "mom2_weight": lam}
        for c in (0.75, 4.0)
        for lam in (250.0, 500.0, 1000.0, 5000.0, 6000.0)
    ),
]


def main(argv: list[str] | None = None) -> int:
    from bench.experiments import select_requests
    from bench.zcache import BaseZCache
    from fededit_core.data.slots import split_into_slots
    from fededit_core.eval.metrics import counterfact_metrics
    from fededit_core.eval.tables import format_table
    from fededit_core.memit.editor import MemitEditor, hparams_for
    from fededit_core.memit.hparams import EDITORS
    from fededit_core.memit.templates import sample_context_templates
    from fededit_core.model.loading import configure_threads, load_model
    from fededit_core.paths import cache_dir, recorded_path

    parser = sweep_parser(__doc__, 48)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--editors", default=",".join(EDITORS), help="comma-separated: whose rows to run")
    args = parser.parse_args(argv)
    editors = set(args.editors.split(","))
    if editors - set(EDITORS):
        parser.error(f"unknown editors {sorted(editors - set(EDITORS))}; expected some of {list(EDITORS)}")
    configure_threads()
    data = Path(args.data)
    requests = select_requests(data, args.n, seed=0)
    batches = split_into_slots(requests, args.batches)
    model, tok = load_model(args.model)
    templates = sample_context_templates(model, tok)
    z_cache = BaseZCache(cache_dir("bench") / "z")
    unedited = counterfact_metrics(model, tok, requests)
    rows = [{"setting": "unedited", **{k: unedited[k] for k in ("es", "ps", "ns", "score")}}]
    for setting in (s for s in SETTINGS if s["editor"] in editors):
        editor = MemitEditor(model, tok, hparams_for(model, **setting), templates=templates)
        editor.z_cache = z_cache
        try:
            for batch in batches:
                editor.edit(batch, progress=False)
            every = counterfact_metrics(model, tok, requests)
            first = counterfact_metrics(model, tok, batches[0])
        finally:
            editor.reset()
        rows.append(
            {
                "setting": " ".join(f"{k}={v:g}" if isinstance(v, float) else str(v) for k, v in setting.items()),
                **{k: every[k] for k in ("es", "ps", "ns", "score")},
                "first_batch_score": first["score"],
            }
        )
        print(format_table(rows[-1:]), flush=True)
    columns = ["setting", "es", "ps", "ns", "score", "first_batch_score"]
    print(format_table(rows, columns, markdown=True))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {"n": len(requests), "batches": args.batches, "data": recorded_path(data), "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
