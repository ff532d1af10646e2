"""The z optimisation's two early stops on SmolLM2-135M: steps, seconds and Score (README, "Early stop").

``target_prob`` stops a request once exp(-mean target NLL) > stop_prob (0.95); ``total_loss`` is the
reference code's rule (kmeng01/memit memit/compute_z.py line 162): NLL + KL + weight decay < 5e-2.
For each data set, the first ``--n`` requests are edited in one MEMIT batch from the base model
under each rule and scored (CounterFact ES/PS/NS, zsRE EA/PA/NA).

    python -m bench.stop_rule --n 64 --json results/engine/stop_rule.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

STOPS = ("target_prob", "total_loss")


def main(argv: list[str] | None = None) -> int:
    from fededit_core.data.loaders import dataset_kind, load_requests
    from fededit_core.eval.metrics import evaluate
    from fededit_core.eval.tables import SCORE_PARTS, format_table
    from fededit_core.memit.editor import MemitEditor, hparams_for, make_editor
    from fededit_core.model.loading import DEFAULT_MODEL
    from fededit_core.paths import recorded_path, shared_data_dir

    shared = shared_data_dir() or Path("../shared/data")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--counterfact", default=str(shared / "counterfact" / "counterfact-val.json"))
    parser.add_argument("--zsre", default=str(shared / "zsre" / "zsre_mend_eval-600.json"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    base = make_editor(args.model)
    rows = []

    def write(rows: list[dict]) -> None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {
            "n": args.n,
            "data": [recorded_path(Path(args.counterfact)), recorded_path(Path(args.zsre))],
            "v_steps": base.hp.v_steps,
            "stop_prob": base.hp.stop_prob,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(record, indent=2))

    for path in (Path(args.counterfact), Path(args.zsre)):
        requests = load_requests(path, n=args.n)
        kind = dataset_kind(path)
        for stop in STOPS:
            editor = MemitEditor(base.model, base.tok, hparams_for(base.model, stop_on=stop), templates=base.templates)
            editor.reset()
            z = editor.compute_z(requests)
            edit = editor.edit(requests, z=z, progress=False)
            metrics = evaluate(editor.model, editor.tok, requests, kind)
            editor.reset()
            capped = sum(s == editor.hp.v_steps - 1 for s in z.steps)
            rows.append(
                {
                    "data": kind,
                    "stop_on": stop,
                    "n": len(requests),
                    "steps_mean": statistics.mean(s + 1 for s in z.steps),
                    "at_step_cap": capped,
                    "target_prob_mean": statistics.mean(z.target_prob),
                    "z_s": z.seconds,
                    "layers_s": edit.seconds["layers"],
                    **{p: metrics[p] for p in (*SCORE_PARTS[kind], "score")},
                }
            )
            print(format_table(rows[-1:]), flush=True)
            if args.json:  # after every run: an interrupted benchmark keeps what it measured
                write(rows)
    columns = ["data", "stop_on", "steps_mean", "at_step_cap", "target_prob_mean", "z_s", "score"]
    print(format_table(rows, columns, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
