"""How FedEdit's re-edit conditions (fedleke/reedit.py) select on a benchmark workload, over α.

For the main CounterFact workload of a preset (same requests, partition and slots as the benchmark),
it replays what the server serves: after the edits of slot t every client receives each other
client's slot-t MKVs. With the z cached by the benchmark on the base model it decides, for every
rule (``paper``: per incoming vector against this slot's own; ``set``: a sender's whole set against
all own so far), both vectors (z and δ = z − h_L(base)) and α in a grid, which MKVs each receiver
keeps, and splits them by whether the MKV's relation group is among the receiver's own requests'
groups so far ("related") or not: precision = related kept / kept, recall = related kept / related
offered. No editing: cheap once the z are cached.

    python -m bench.gate_analysis [--quick] --json results/bench/gate_analysis.json [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from bench.zcache import BaseZCache
from fededit_core.data.grouping import template_groups
from fededit_core.data.slots import split_into_slots
from fededit_core.fedleke.reedit import kept_rows
from fededit_core.memit.editor import make_editor
from fededit_core.memit.keys import compute_keys, hidden_at_subject
from fededit_core.model.loading import DEFAULT_MODEL, configure_threads
from fededit_core.paths import cache_dir

from .experiments import select_requests, workload
from .reproduce import DEFAULT_DATA, PRESETS, base_exp

log = logging.getLogger("fededit.bench")
ALPHAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.22, 0.3, 0.4, 0.5, 0.6, 0.7)
RULES = ("paper", "set")


def offers(slots: dict[str, list[list[int]]], groups: list[int]) -> list[tuple]:
    """What the server serves: (related flags of the sent rows, the receiver's own rows so far, its
    own rows of this slot, the sent rows), one per (slot, receiver, sender)."""
    out = []
    for t in range(max(len(s) for s in slots.values())):
        for receiver, own_slots in slots.items():
            own = [i for s in own_slots[: t + 1] for i in s]
            own_slot = own_slots[t] if t < len(own_slots) else []
            own_groups = {groups[i] for i in own}
            for sender, sender_slots in slots.items():
                sent = sender_slots[t] if t < len(sender_slots) else []
                if sender != receiver and sent:
                    out.append((torch.tensor([groups[i] in own_groups for i in sent]), own, own_slot, sent))
    return out


def replay(
    vectors: dict[str, torch.Tensor], slots: dict[str, list[list[int]]], groups: list[int], alphas=ALPHAS
) -> dict:
    """Every rule's selection on the served MKVs. ``vectors``: name -> (n, d) rows; ``slots``:
    client -> per slot the rows it edited; ``groups``: each row's relation group. Returns
    {rule: {vector: [{alpha, related_offered, unrelated_offered, related_kept, unrelated_kept,
    precision, recall}]}}."""
    served = offers(slots, groups)
    out: dict = {}
    for rule in RULES:
        out[rule] = {}
        for name, m in vectors.items():
            rows = []
            for a in alphas:
                counts = {"related_offered": 0, "unrelated_offered": 0, "related_kept": 0, "unrelated_kept": 0}
                for related, own, own_slot, sent in served:
                    kept = kept_rows(rule, m[own], m[own_slot], m[sent], a)
                    counts["related_offered"] += int(related.sum())
                    counts["unrelated_offered"] += int((~related).sum())
                    counts["related_kept"] += int((kept & related).sum())
                    counts["unrelated_kept"] += int((kept & ~related).sum())
                kept_all = counts["related_kept"] + counts["unrelated_kept"]
                rows.append(
                    {
                        "alpha": a,
                        **counts,
                        "precision": counts["related_kept"] / kept_all if kept_all else None,
                        "recall": counts["related_kept"] / counts["related_offered"]
                        if counts["related_offered"]
                        else None,
                    }
                )
            out[rule][name] = rows
    return out


def separability(vectors: dict[str, torch.Tensor], slots: dict[str, list[list[int]]], groups: list[int]) -> dict:
    """ROC AUC of ranking each served MKV by its best cosine (and mean of the best three) to the
    receiver's own vectors so far: 0.5 = no better than chance at telling related from unrelated."""
    served = offers(slots, groups)
    out = {}
    for name, m in vectors.items():
        unit = m.double() / m.double().norm(dim=1, keepdim=True)
        best, top3, related = [], [], []
        for flags, own, _, sent in served:
            cos = unit[own] @ unit[sent].T  # (own, sent)
            best += cos.max(dim=0).values.tolist()
            top3 += cos.topk(min(3, len(own)), dim=0).values.mean(dim=0).tolist()
            related += flags.tolist()
        out[name] = {"best": _auc(best, related), "best3": _auc(top3, related)}
    return out


def _auc(scores: list[float], labels: list[bool]) -> float | None:
    s, y = torch.tensor(scores), torch.tensor(labels)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    return float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())


def analyse(preset_name: str = "default", alphas=ALPHAS, data: Path = DEFAULT_DATA["counterfact"]) -> dict:
    configure_threads()
    preset = PRESETS[preset_name]
    exp = base_exp(preset, "counterfact", "fededit")
    parts = workload(exp, {"counterfact": data})
    editor = make_editor(DEFAULT_MODEL)
    editor.z_cache = BaseZCache(cache_dir("bench") / "z")
    union = [r for reqs in parts.values() for r in reqs]
    editor.z_cache.prefill(editor, union)  # the benchmark's z, optimised in chunks when missing
    z = editor.compute_z(union).z
    h = hidden_at_subject(editor.model, editor.tok, union, editor.hp.z_layer).float()
    row = {id(r): i for i, r in enumerate(union)}
    group_of = {
        t: g for g, ts in enumerate(template_groups(select_requests(data, exp["n_edits"], exp["seed"]))) for t in ts
    }
    slots = {c: [[row[id(r)] for r in s] for s in split_into_slots(reqs, exp["n_slots"])] for c, reqs in parts.items()}
    groups = [group_of[r.prompt] for r in union]
    last = compute_keys(editor.model, editor.tok, union, editor.hp.z_layer, editor.templates)
    vectors = {"z": z, "delta": z - h}
    return {
        "preset": preset_name,
        "n_edits": exp["n_edits"],
        "n_clients": exp["n_clients"],
        "n_slots": exp["n_slots"],
        "alphas": list(alphas),
        "kept": replay(vectors, slots, groups, alphas),
        "auc": separability({**vectors, "keys_L": last}, slots, groups),
    }


def plot(out: dict, path: Path) -> None:
    """Related kept against unrelated kept, one curve per rule and vector, α on the points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: the gate plot is skipped (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rule, by_vector in out["kept"].items():
        for vector, rows in by_vector.items():
            xs = [r["unrelated_kept"] / max(r["unrelated_offered"], 1) for r in rows]
            ys = [r["related_kept"] / max(r["related_offered"], 1) for r in rows]
            ax.plot(xs, ys, marker="o", label=f"{rule}, {vector}")
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"{r['alpha']:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("unrelated MKVs kept (share of offered)")
    ax.set_ylabel("related MKVs kept (share of offered)")
    ax.set_title(f"FedEdit re-edit conditions, {out['preset']} CounterFact workload")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--counterfact", default=str(DEFAULT_DATA["counterfact"]))
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: related kept against unrelated kept per alpha")
    args = p.parse_args(argv)
    out = analyse("quick" if args.quick else "default", data=Path(args.counterfact))
    for rule, by_vector in out["kept"].items():
        for vector, rows in by_vector.items():
            first = rows[0]
            print(
                f"{rule:5s} {vector:5s} offered {first['related_offered']} related / "
                f"{first['unrelated_offered']} unrelated; kept (related/unrelated) "
                + "; ".join(f"α={r['alpha']}: {r['related_kept']}/{r['unrelated_kept']}" for r in rows)
            )
    for name, auc in out["auc"].items():
        print(
            f"ROC AUC of related vs unrelated by best cosine to own, {name}: best {auc['best']:.3f}, "
            f"mean of best three {auc['best3']:.3f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(out, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
