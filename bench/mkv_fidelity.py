"""How closely the text-free MKV apply follows the text-based MEMIT edit, layer by layer.

    python -m bench.mkv_fidelity --n 32

Edits the first N CounterFact requests text-based, then applies their MKVs (keys from the edit,
and keys read on the base model) to the base model, and prints ES/PS/NS/Score of each and the
cosine similarity of each layer's text-free update to the text-based one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fededit_core.model.loading import DEFAULT_MODEL


def main(argv: list[str] | None = None) -> int:
    from bench.memit_speed import default_data
    from fededit_core.data.loaders import load_requests
    from fededit_core.eval.metrics import counterfact_metrics
    from fededit_core.eval.tables import format_table
    from fededit_core.fedleke.mkv import apply_mkvs, compute_mkvs
    from fededit_core.memit.editor import MemitEditor, hparams_for
    from fededit_core.model.loading import configure_threads, load_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--data")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    configure_threads()
    data = Path(args.data) if args.data else default_data()
    if data is None or not data.is_file():
        raise SystemExit("no CounterFact file: pass --data")
    requests = load_requests(data, n=args.n)
    model, tok = load_model(args.model)
    editor = MemitEditor(model, tok, hparams_for(model))
    keep = ("es", "ps", "ns", "score")

    result = editor.edit(requests, progress=False)
    rows = [{"path": "text-based", **{k: counterfact_metrics(model, tok, requests)[k] for k in keep}}]
    text_based = {l: editor.weight_shift(l).float() for l in editor.hp.layers}
    variants = {
        "text-free, keys from the edit": compute_mkvs(editor, requests, edit=result),
        "text-free, base-model keys": compute_mkvs(editor, requests, z=result.z),
    }
    editor.reset()
    for name, mkvs in variants.items():
        apply_mkvs(editor, mkvs)
        metrics = counterfact_metrics(model, tok, requests)
        cosine = {
            l: float(
                torch.nn.functional.cosine_similarity(
                    text_based[l].flatten(), editor.weight_shift(l).float().flatten(), dim=0
                )
            )
            for l in editor.hp.layers
        }
        rows.append({"path": name, **{k: metrics[k] for k in keep}, **{f"cos L{l}": c for l, c in cosine.items()}})
        editor.reset()
    print(f"{len(requests)} CounterFact edits from {data.name}, layers {list(editor.hp.layers)}")
    print(format_table(rows, list(rows[-1])))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"n": len(requests), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
