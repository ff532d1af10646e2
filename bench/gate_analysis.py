"""How FedEdit's re-edit conditions (fedleke/reedit.py, fedleke/probe.py) select on a benchmark workload.

For the main CounterFact workload of a preset (same requests, partition and slots as the benchmark),
it replays what the server serves: after the edits of slot t every client receives each other
client's slot-t MKVs. With the z cached by the benchmark on the base model it decides, for every
cosine rule (``paper``: per incoming vector against this slot's own; ``set``: a sender's whole set
against all own so far), both vectors (z and δ = z − h_L(base)) and α in a grid, and for the
``probe`` rule over τ (on a seeded sample of offers, since it runs the model), which MKVs each
receiver keeps, and splits them by whether the MKV's relation group is among the receiver's own
requests' groups so far ("related") or not: precision = related kept / kept, recall = related kept
/ related offered. ROC AUCs rank the offers by each signal under two labels: the benchmark's groups
(formed from the edited requests) and the groups of the whole file (the answer kinds that
``data/grouping.py`` describes). No editing: cheap once the z are cached, but for the probe.

    python -m bench.gate_analysis [--quick] --json results/bench/gate_analysis.json [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from bench.zcache import BaseZCache
from fededit_core.data.grouping import template_groups
from fededit_core.data.loaders import load_requests
from fededit_core.data.slots import split_into_slots
from fededit_core.fedleke.probe import probe_divergence, probe_requests
from fededit_core.fedleke.reedit import kept_rows
from fededit_core.memit.editor import make_editor
from fededit_core.memit.hparams import DEFAULT_EDITOR, EDITORS
from fededit_core.memit.keys import compute_keys, hidden_at_last_token
from fededit_core.model.loading import DEFAULT_MODEL, configure_threads
from fededit_core.paths import cache_dir

from .experiments import select_requests, workload
from .reproduce import DEFAULT_DATA, PRESETS, base_exp

log = logging.getLogger("fededit.bench")
ALPHAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.22, 0.3, 0.4, 0.5, 0.6, 0.7)
RULES = ("paper", "set")
PROBE_OFFERS = 240  # offers the probe replays (seeded sample): ~2 s each on 2 idle CPU cores, more late in a run
TAUS = (0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0)  # probe thresholds, nats


class Offer(NamedTuple):
    """One sender's slot-t rows served to one receiver, with what the receiver had edited by then."""

    related: torch.Tensor  # (sent,) bool: the row's relation group is among the receiver's own so far
    own: list[int]  # the receiver's own rows so far
    own_slot: list[int]  # its own rows of this slot
    sent: list[int]
    slot: int
    receiver: str


def offers(slots: dict[str, list[list[int]]], groups: list[int]) -> list[Offer]:
    """What the server serves, one offer per (slot, receiver, sender)."""
    out = []
    for t in range(max(len(s) for s in slots.values())):
        for receiver, own_slots in slots.items():
            own = [i for s in own_slots[: t + 1] for i in s]
            own_slot = own_slots[t] if t < len(own_slots) else []
            own_groups = {groups[i] for i in own}
            for sender, sender_slots in slots.items():
                sent = sender_slots[t] if t < len(sender_slots) else []
                if sender != receiver and sent:
                    related = torch.tensor([groups[i] in own_groups for i in sent])
                    out.append(Offer(related, own, own_slot, sent, t, receiver))
    return out


def _counts(served: list[Offer], keep) -> dict:
    """Related and unrelated MKVs offered and kept, precision and recall; ``keep(k, offer)`` -> (sent,) bool."""
    counts = {"related_offered": 0, "unrelated_offered": 0, "related_kept": 0, "unrelated_kept": 0}
    for k, offer in enumerate(served):
        kept, related = keep(k, offer), offer.related
        counts["related_offered"] += int(related.sum())
        counts["unrelated_offered"] += int((~related).sum())
        counts["related_kept"] += int((kept & related).sum())
        counts["unrelated_kept"] += int((kept & ~related).sum())
    kept_all = counts["related_kept"] + counts["unrelated_kept"]
    return {
        **counts,
        "precision": counts["related_kept"] / kept_all if kept_all else None,
        "recall": counts["related_kept"] / counts["related_offered"] if counts["related_offered"] else None,
    }


def replay(
    vectors: dict[str, torch.Tensor], slots: dict[str, list[list[int]]], groups: list[int], alphas=ALPHAS
) -> dict:
    """Every cosine rule's selection on the served MKVs. ``vectors``: name -> (n, d) rows; ``slots``:
    client -> per slot the rows it edited; ``groups``: each row's relation group. Returns
    {rule: {vector: [{alpha, related_offered, unrelated_offered, related_kept, unrelated_kept,
    precision, recall}]}}."""
    served = offers(slots, groups)
    out: dict = {}
    for rule in RULES:
        out[rule] = {}
        for name, m in vectors.items():
            out[rule][name] = [
                {
                    "alpha": a,
                    **_counts(
                        served, lambda k, o, m=m, r=rule, a=a: kept_rows(r, m[o.own], m[o.own_slot], m[o.sent], a)
                    ),
                }
                for a in alphas
            ]
    return out


def probe_scores(editor, union: list, z: torch.Tensor, delta: torch.Tensor, served: list[Offer]) -> list[torch.Tensor]:
    """Per offer: max_i s_ij over the receiver's own relation prompts so far (fedleke/probe.py), for each
    sent row j, on the base model (the replay edits nothing)."""
    out = []
    for o in tqdm(served, desc="probe gate", unit="offer"):
        own = probe_requests([union[i] for i in o.own])
        s = probe_divergence(editor.model, editor.tok, own, z[o.sent], delta[o.sent], editor.hp.z_layer)
        out.append(s.max(dim=0).values)
    return out


def replay_probe(scores: list[torch.Tensor], served: list[Offer], taus=TAUS) -> list[dict]:
    """The probe rule's selection (keep(j) = max_i s_ij > tau) for every tau of the grid."""
    return [{"tau": t, **_counts(served, lambda k, o, t=t: scores[k] > t)} for t in taus]


def separability(vectors: dict[str, torch.Tensor], slots: dict[str, list[list[int]]], groups: list[int]) -> dict:
    """ROC AUC of ranking each served MKV by its best cosine (and mean of the best three) to the
    receiver's own vectors so far: 0.5 = no better than chance at telling related from unrelated."""
    served = offers(slots, groups)
    out = {}
    for name, m in vectors.items():
        unit = m.double() / m.double().norm(dim=1, keepdim=True)
        best, top3, related = [], [], []
        for flags, own, _, sent, *_ in served:
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


def label_summary(union: list, served: list[Offer], groups: list[int]) -> dict:
    """How the relatedness labels fall: groups, related offers, and related offers whose template is
    one of the receiver's own (the only ones a relation-identity signal could match exactly)."""
    same_template = sum(
        int(union[j].prompt in {union[i].prompt for i in o.own})
        for o in served
        for j, rel in zip(o.sent, o.related.tolist())
        if rel
    )
    related = sum(int(o.related.sum()) for o in served)
    return {
        "groups": len(set(groups)),
        "offered": sum(len(o.sent) for o in served),
        "related": related,
        "related_same_template": same_template,
    }


def oracles(union: list, served: list[Offer], file_groups: list[int]) -> dict:
    """What two rules that knew the relation would keep, counted against the benchmark's labels:
    ``template`` keeps an MKV whose template is one of the receiver's own, ``answer_kind`` one whose
    group in the whole file (its kind of answer) is among the receiver's own requests' groups."""

    def same_template(k, o):
        own = {union[i].prompt for i in o.own}
        return torch.tensor([union[j].prompt in own for j in o.sent])

    def same_kind(k, o):
        own = {file_groups[i] for i in o.own}
        return torch.tensor([file_groups[j] in own for j in o.sent])

    return {"template": _counts(served, same_template), "answer_kind": _counts(served, same_kind)}


def analyse(
    preset_name: str = "default",
    alphas=ALPHAS,
    data: Path = DEFAULT_DATA["counterfact"],
    probe_offers: int = PROBE_OFFERS,
    editor_name: str = DEFAULT_EDITOR,
) -> dict:
    """The replay of every rule, the probe's on a seeded sample of ``probe_offers`` offers (it runs the
    model: about 2 s an offer on 2 CPU cores), and ROC AUCs under two relatedness labels: the
    benchmark's (groups of the edited requests) and groups of the whole file. For another editor than
    MEMIT (``editor_name``) its targets: z and delta = z - its site before the edit (PMET: L's FFN
    output), no probe (it writes a z into h_L) and none of MEMIT's other vectors."""
    configure_threads()
    preset = PRESETS[preset_name]
    exp = base_exp(preset, "counterfact", "fededit")
    parts = workload(exp, {"counterfact": data})
    editor = make_editor(DEFAULT_MODEL, editor=editor_name)
    editor.z_cache = BaseZCache(cache_dir("bench") / "z")
    union = [r for reqs in parts.values() for r in reqs]
    editor.z_cache.prefill(editor, union)  # the benchmark's z, optimised in chunks when missing
    targets = editor.compute_z(union)
    z, h = targets.z, targets.h.float()
    row = {id(r): i for i, r in enumerate(union)}
    group_of = {
        t: g for g, ts in enumerate(template_groups(select_requests(data, exp["n_edits"], exp["seed"]))) for t in ts
    }
    slots = {c: [[row[id(r)] for r in s] for s in split_into_slots(reqs, exp["n_slots"])] for c, reqs in parts.items()}
    groups = [group_of[r.prompt] for r in union]
    file_group_of = {t: g for g, ts in enumerate(template_groups(load_requests(data))) for t in ts}
    file_groups = [file_group_of[r.prompt] for r in union]
    vectors = {"z": z, "delta": z - h}
    served = offers(slots, groups)
    sample, scores, probe_auc = [], [], {}
    if editor_name == "memit":
        n_layers = editor.model.config.num_hidden_layers
        vectors |= {
            "keys_L": compute_keys(editor.model, editor.tok, union, editor.hp.z_layer, editor.templates),
            "last_token_L": hidden_at_last_token(editor.model, editor.tok, union, editor.hp.z_layer),
            "last_token_final": hidden_at_last_token(editor.model, editor.tok, union, n_layers - 1),
        }
        sample = sorted(random.Random(0).sample(range(len(served)), min(probe_offers, len(served))))
        scores = probe_scores(editor, union, z, z - h, [served[k] for k in sample])
        for name, labels in (("benchmark", groups), ("file", file_groups)):
            relabelled = offers(slots, labels)
            related = torch.cat([relabelled[k].related for k in sample])
            probe_auc[name] = {"best": _auc(torch.cat(scores).tolist(), related.tolist())}
    probe = {"probe": probe_auc["benchmark"]} if probe_auc else {}
    probe_file = {"probe": probe_auc["file"]} if probe_auc else {}
    out = {
        "preset": preset_name,
        "editor": editor_name,
        "n_edits": exp["n_edits"],
        "n_clients": exp["n_clients"],
        "n_slots": exp["n_slots"],
        "alphas": list(alphas),
        "kept": replay({k: vectors[k] for k in ("z", "delta")}, slots, groups, alphas),
        "probe_offers": len(sample),
        "labels": {
            "benchmark": label_summary(union, served, groups),
            "file": label_summary(union, offers(slots, file_groups), file_groups),
        },
        "oracles": oracles(union, served, file_groups),
        "auc": {**separability(vectors, slots, groups), **probe},
        "auc_file_groups": {**separability(vectors, slots, file_groups), **probe_file},
    }
    if sample:
        out["probe"] = replay_probe(scores, [served[k] for k in sample])
    return out


def plot(out: dict, path: Path) -> None:
    """Related kept against unrelated kept, one curve per rule and vector (α on the points) and the
    probe's (τ on the points)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: the gate plot is skipped (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    curves = [(f"{rule}, {vector}", rows, "alpha") for rule, by in out["kept"].items() for vector, rows in by.items()]
    if "probe" in out:
        curves.append(("probe, KL (τ)", out["probe"], "tau"))
    for label, rows, knob in curves:
        xs = [r["unrelated_kept"] / max(r["unrelated_offered"], 1) for r in rows]
        ys = [r["related_kept"] / max(r["related_offered"], 1) for r in rows]
        ax.plot(xs, ys, marker="o", label=label)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(f"{r[knob]:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("unrelated MKVs kept (share of offered)")
    ax.set_ylabel("related MKVs kept (share of offered)")
    ax.set_title(f"FedEdit re-edit conditions, {out['preset']} CounterFact workload, {out['editor']}")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--counterfact", default=str(DEFAULT_DATA["counterfact"]))
    p.add_argument("--json", default=None)
    p.add_argument("--probe-offers", type=int, default=PROBE_OFFERS, help="offers the probe gate replays (sample)")
    p.add_argument("--plot", default=None, help="PNG: related kept against unrelated kept per alpha")
    p.add_argument("--editor", choices=EDITORS, default=DEFAULT_EDITOR, help="whose targets the gates compare")
    args = p.parse_args(argv)
    out = analyse(
        "quick" if args.quick else "default",
        data=Path(args.counterfact),
        probe_offers=args.probe_offers,
        editor_name=args.editor,
    )
    for rule, by_vector in out["kept"].items():
        for vector, rows in by_vector.items():
            first = rows[0]
            print(
                f"{rule:5s} {vector:5s} offered {first['related_offered']} related / "
                f"{first['unrelated_offered']} unrelated; kept (related/unrelated) "
                + "; ".join(f"α={r['alpha']}: {r['related_kept']}/{r['unrelated_kept']}" for r in rows)
            )
    if "probe" in out:
        print(
            "probe: kept (related/unrelated) "
            + "; ".join(f"τ={r['tau']}: {r['related_kept']}/{r['unrelated_kept']}" for r in out["probe"])
        )
    for name, o in out["oracles"].items():
        print(f"oracle {name}: kept (related/unrelated) {o['related_kept']}/{o['unrelated_kept']}")
    for labels in ("benchmark", "file"):
        summary = out["labels"][labels]
        print(
            f"labels from the {labels}'s groups ({summary['groups']} groups): {summary['related']} of "
            f"{summary['offered']} offers related, {summary['related_same_template']} of them with an own template"
        )
        for name, auc in out["auc" if labels == "benchmark" else "auc_file_groups"].items():
            what = "the probe's largest KL on own prompts" if name == "probe" else f"best cosine to own, {name}"
            extra = f", mean of best three {auc['best3']:.3f}" if "best3" in auc else ""
            print(f"  ROC AUC of related vs unrelated by {what}: best {auc['best']:.3f}{extra}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(out, Path(args.plot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
