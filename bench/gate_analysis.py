"""How FedEdit's re-edit condition (Eq. 8) behaves on a benchmark workload, for a grid of α.

For the main CounterFact workload of a preset (same requests, partition and slots as the benchmark),
it replays what the server serves: after the edits of slot t every client receives each other
client's slot-t set and compares it with all of its own vectors so far (slots 0..t). With the z cached by the benchmark on the
base model, it reports, for α in a grid and for both vectors (z and δ = z − h_L(base)), how many
sets are kept, split by whether the sender's set shares a relation group with the receiver's own
requests ("related") or not.

    python -m bench.gate_analysis [--quick] --json results/bench/gate_analysis.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.zcache import BaseZCache
from fededit_core.data.grouping import template_groups
from fededit_core.data.slots import split_into_slots
from fededit_core.fedleke.reedit import best_match_similarity
from fededit_core.memit.editor import make_editor
from fededit_core.memit.keys import hidden_at_subject
from fededit_core.model.loading import DEFAULT_MODEL, configure_threads
from fededit_core.paths import cache_dir

from .experiments import select_requests, workload
from .reproduce import DEFAULT_DATA, PRESETS, base_exp

ALPHAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.22, 0.3, 0.4, 0.5, 0.6, 0.7)


def analyse(preset_name: str = "default", alphas=ALPHAS, data: Path = DEFAULT_DATA["counterfact"]) -> dict:
    configure_threads()
    preset = PRESETS[preset_name]
    exp = base_exp(preset, "counterfact", "fededit")
    parts = workload(exp, {"counterfact": data})
    editor = make_editor(DEFAULT_MODEL)
    editor.z_cache = BaseZCache(cache_dir("bench") / "z")
    union = [r for reqs in parts.values() for r in reqs]
    z = editor.compute_z(union).z  # from the benchmark's cache (optimised there when missing)
    h = hidden_at_subject(editor.model, editor.tok, union, editor.hp.z_layer).float()
    row = {id(r): i for i, r in enumerate(union)}
    group_of = {
        t: g for g, ts in enumerate(template_groups(select_requests(data, exp["n_edits"], exp["seed"]))) for t in ts
    }
    slots = {c: split_into_slots(reqs, exp["n_slots"]) for c, reqs in parts.items()}
    vectors = {"z": z, "delta": z - h}
    pairs = []  # (related?, {vector: fraction of own vectors with a best match above each alpha})
    for t in range(exp["n_slots"]):
        for receiver in parts:
            own = [row[id(r)] for s in slots[receiver][: t + 1] for r in s]
            own_groups = {group_of[union[i].prompt] for i in own}
            for sender in parts:
                sent = [row[id(r)] for r in slots[sender][t]]
                if sender == receiver or not sent or not own:
                    continue
                related = any(group_of[union[i].prompt] in own_groups for i in sent)
                sims = {v: best_match_similarity(m[own], m[sent]) for v, m in vectors.items()}
                pairs.append((related, {v: [float((s > a).double().mean()) for a in alphas] for v, s in sims.items()}))
    out = {
        "preset": preset_name,
        "n_edits": exp["n_edits"],
        "n_clients": exp["n_clients"],
        "n_slots": exp["n_slots"],
        "sets_served": len(pairs),
        "related_sets": sum(r for r, _ in pairs),
        "alphas": list(alphas),
        "kept": {},
    }
    for v in vectors:
        out["kept"][v] = [
            {
                "alpha": a,
                "related_kept": sum(1 for r, f in pairs if r and f[v][k] >= 0.5),
                "unrelated_kept": sum(1 for r, f in pairs if not r and f[v][k] >= 0.5),
                "median_fraction_related": float(torch.tensor([f[v][k] for r, f in pairs if r] or [0.0]).median()),
            }
            for k, a in enumerate(alphas)
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--counterfact", default=str(DEFAULT_DATA["counterfact"]))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = analyse("quick" if args.quick else "default", data=Path(args.counterfact))
    print(f"{out['sets_served']} sets served, {out['related_sets']} related (share a relation group with the receiver)")
    for v, rows in out["kept"].items():
        print(
            f"vector {v}: "
            + "; ".join(f"α={r['alpha']}: {r['related_kept']}/{r['unrelated_kept']}" for r in rows)
            + "   (related kept / unrelated kept)"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
