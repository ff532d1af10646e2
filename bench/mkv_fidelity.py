"""How closely the text-free MKV apply follows the text-based MEMIT edit, layer by layer.

    python -m bench.mkv_fidelity --n 64 --receiver-edits 64 --json results/engine/mkv_fidelity.json

A sender edits the first N CounterFact requests text-based on the base model and makes their MKVs.
A receiver that first edits the next M requests (its own, text-based; M = 0: the base model) then
takes the N edits in twice: text-based (MEMIT with the requests' text and the sender's z) and
text-free from the MKVs, by each estimate of h_L(current) that the apply can use:

* first order: h_L(base) + sum_l (W_l - W_l(base)) k_l at the template-averaged keys (no correction);
* plain keys: the same sum at the keys of the plain prompt, where MEMIT reads h_L (route a);
* corrections: plus the sender's c_i, the part of its own edit's effect on h_L that the first-order
  sum misses, measured on its text (route b; ``EditResult.corrections``);
* plain keys + corrections: both, c_i taken against the plain keys.

Printed: ES/PS/NS/Score on the N requests, and the cosine of each layer's text-free update to the
text-based one. The variant with base-model keys (keys read without the edit) is shown as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fededit_core.model.loading import DEFAULT_MODEL


def _plain_corrections(result, layers) -> torch.Tensor:
    """c_i against the plain keys: c_i + sum_{j<i} Delta_j (k_j - k_j^plain), (n, |R|, d)."""
    out, extra = [], torch.zeros_like(result.corrections[layers[0]], dtype=torch.float64)
    for layer in layers:
        out.append(result.corrections[layer].double() + extra)
        gap = (result.keys[layer] - result.plain_keys[layer]).double()
        extra = extra + gap @ result.deltas[layer].double().cpu().T
    return torch.stack(out, dim=1).float()


def main(argv: list[str] | None = None) -> int:
    from dataclasses import replace

    from bench.memit_speed import default_data
    from fededit_core.data.loaders import load_requests
    from fededit_core.eval.metrics import counterfact_metrics
    from fededit_core.eval.tables import format_table
    from fededit_core.fedleke.mkv import apply_mkvs, compute_mkvs
    from fededit_core.memit.editor import MemitEditor, hparams_for
    from fededit_core.memit.target import ZResult
    from fededit_core.model.loading import configure_threads, load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--receiver-edits", type=int, default=0, help="edits the receiver carries first")
    parser.add_argument("--data")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    configure_threads()
    data = Path(args.data) if args.data else default_data()
    if data is None or not data.is_file():
        raise SystemExit("no CounterFact file: pass --data")
    everything = load_requests(data, n=args.n + args.receiver_edits)
    requests, own = everything[: args.n], everything[args.n :]
    model, tok = load_model(args.model)
    editor = MemitEditor(model, tok, hparams_for(model))
    layers = editor.hp.layers
    keep = ("es", "ps", "ns", "score")

    sent = editor.edit(requests, progress=False, plain_keys=True)  # the sender, on the base model
    mkvs = compute_mkvs(editor, requests, edit=sent)
    variants = {
        "first order": replace(mkvs, corrections=None, plain_keys=None),
        "plain keys (a)": replace(mkvs, corrections=None),
        "corrections (b)": replace(mkvs, plain_keys=None),
        "plain keys + corrections": replace(mkvs, corrections=_plain_corrections(sent, layers)),
        "first order, base-model keys": replace(compute_mkvs(editor, requests, z=sent.z), corrections=None),
    }
    editor.reset()
    if own:
        editor.edit(own, progress=False)
    start = editor.edited_layers()

    def update() -> dict[int, torch.Tensor]:
        return {l: (editor.family.weight_matrix(model, l).double() - start[l].double()).float() for l in layers}

    editor.edit(requests, z=ZResult(sent.z.z, sent.z.h), progress=False)  # text-based on the receiver
    text_based = update()
    rows = [{"path": "text-based", **{k: counterfact_metrics(model, tok, requests)[k] for k in keep}}]
    for name, variant in variants.items():
        editor.load_layers(start)
        apply_mkvs(editor, variant)
        metrics = counterfact_metrics(model, tok, requests)
        cosine = {
            l: float(torch.nn.functional.cosine_similarity(text_based[l].flatten(), u.flatten(), dim=0))
            for l, u in update().items()
        }
        rows.append({"path": name, **{k: metrics[k] for k in keep}, **{f"cos L{l}": c for l, c in cosine.items()}})
    print(
        f"{len(requests)} CounterFact edits from {data.name} onto a receiver carrying {len(own)} others, "
        f"layers {list(layers)}"
    )
    print(format_table(rows, list(rows[-1])))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {"n": len(requests), "receiver_edits": len(own), "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
