"""The benchmark's outputs: one JSON per data set, Markdown tables (FedLEKE Tables 1-3), PNG plots.

Retention = federated figure / centralised figure on the same requests (Score and each part).
The centralised reference is MEMIT of the union in the same time slots; the one-batch edit of the
union is reported beside it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from fededit_core.eval.tables import SCORE_PARTS, format_table
from fededit_core.fedleke.reedit import DEFAULT_GATE
from fededit_core.io import atomic_write
from fededit_core.memit.hparams import DEFAULT_EDITOR
from fededit_core.paths import recorded_path

from .experiments import workload
from .plots import write_plots
from .selectivity import selectivity

MAIN_METHODS = (  # federated
    "local",
    "editavg",
    "editavg-factors",
    "sa",
    "ta",
    "ties",
    "fededit-noreedit",
    "fededit",
    "collabedit",
)
# the first slot's edits after every slot; each section's size and methods: the preset's ``<section>_edits``, ``_methods``
SEQUENTIAL_SECTIONS = ("sequential", "sequential_long")
METHOD_ORDER = ("unedited", "centralised", "centralised_one_batch", *MAIN_METHODS, "collabedit-dense")


def _parts(kind: str, with_fluency: bool = True) -> list[str]:
    return [*SCORE_PARTS[kind], *(["fluency"] if with_fluency and kind == "counterfact" else [])]


def _ratio(a, b):
    return a / b if a is not None and b else None


def federated_row(result: dict, central: dict | None, kind: str) -> dict:
    """The figures of one federated run, with retention against ``central``."""
    rep = result["report"]
    w = dict(rep["weighted"] or {})
    clients = [c for c in rep["clients"] if not c["failed"]]
    n_edits = sum(c["n"] for c in clients)
    sums = {
        k: sum(c.get(k, 0) for c in clients) for k in ("optimised", "reused", "received_sets", "kept_sets", "applied")
    }
    up = sum(c["bytes_sent"] for c in clients)
    down = sum(c["bytes_received"] for c in clients)
    out = {
        **w,
        **sums,
        "n_clients": len(rep["clients"]),
        "failed_clients": len(rep["clients"]) - len(clients),
        "bytes_up_per_client": up / max(1, len(clients)),
        "bytes_down_per_client": down / max(1, len(clients)),
        "bytes_per_edit": (up + down) / max(1, n_edits),
        "wall_s": result["wall_s"],
        "others": rep.get("weighted_others"),
    }
    if central:
        out["retention"] = _ratio(w.get("score"), central.get("score"))
        out["retention_parts"] = {p: _ratio(w.get(p), central.get(p)) for p in _parts(kind) if p in w}
    return out


def _reedits(result: dict) -> bool:
    """A FedEdit run whose clients reported what they re-edited (``per_request``)."""
    return any(c.get("reedited_ids") is not None for c in result["report"]["clients"])


@functools.lru_cache(maxsize=16)
def _workload(inputs: str, files: tuple) -> dict:
    """An experiment's partition, once per run of the benchmark (the outputs are rewritten after every
    experiment; the cluster partition embeds every question)."""
    return workload(json.loads(inputs), {name: Path(path) for name, path in files})


def _selectivity(result: dict, central: dict | None, data_files: dict) -> dict:
    """``gate``, ``others_related`` / ``others_unrelated`` and ``union`` (bench.selectivity)."""
    inputs = result["inputs"]
    files = tuple(sorted((name, str(path)) for name, path in data_files.items()))
    parts = _workload(json.dumps(inputs, sort_keys=True, default=str), files)
    found = selectivity(inputs["kind"], parts, inputs["n_slots"], result["report"], central)
    # only FedEdit gates; the merging strategies absorb everything and their clients re-edit nothing
    rule = {"fededit": inputs.get("gate", DEFAULT_GATE), "fededit-noreedit": "none"}.get(inputs["method"])
    gated = inputs["method"] == "fededit"
    found["gate"] = {
        "rule": rule,
        "vector": inputs.get("vector") if gated else None,
        "alpha": inputs.get("alpha") if gated else None,
        **found["gate"],
    }
    return found


def central_row(result: dict | None) -> dict | None:
    """The weighted figures and timings of one centralised run (None when it has not run)."""
    if not result:
        return None
    return {**result["weighted"], "wall_s": result["wall_s"], "seconds": result.get("seconds")}


def _curve(section: dict, key: str, kind: str) -> list[dict]:
    """Rows of a Figure 5/6 sweep (``label = "<x>/<method>"``) with retention against the centralised run at x."""
    rows = []
    for label, result in section.items():
        x, method = label.split("/", 1)
        if method == "centralised":
            continue
        central = central_row(section.get(f"{x}/centralised"))
        rows.append(
            {
                key: int(x),
                "method": method,
                **federated_row(result, central, kind),
                "centralised_score": (central or {}).get("score"),
            }
        )
    return rows


def _inspected(result: dict, kind: str) -> dict:
    """A CollabEdit challenge run: its figures, what the merged model did (``inspect``) and the
    server's summary (duplicates, conflicts, residual norms)."""
    return {**federated_row(result, None, kind), **result["inspect"], "server": result["report"].get("server")}


def _challenges(results: dict, kind: str) -> dict:
    """The ``collab_overlap``, ``conflict`` and ``forgetting`` sections (bench.collab_workloads)."""
    out: dict = {}
    if "collab_overlap" in results:
        out["collab_overlap"] = {k.replace(" ", "_"): _inspected(r, kind) for k, r in results["collab_overlap"].items()}
    if "conflict" in results:
        out["conflict"] = {policy: _inspected(r, kind) for policy, r in results["conflict"].items()}
    if "forgetting" in results:
        out["forgetting"] = [
            {"beta1": r["inputs"]["beta1"], "rounds": r["inputs"]["n_slots"], **r["inspect"]["old"]}
            for r in results["forgetting"].values()
        ]
    return out


def suffix_of(editor: str) -> str:
    """Output names: ``counterfact.json`` for MEMIT, ``counterfact-pmet.json`` for another editor."""
    return "" if editor == DEFAULT_EDITOR else f"-{editor}"


def _sequential(section: dict) -> list[dict]:
    """The first slot's edits after every slot (``first_slot_curve``), per method."""
    return [
        {"method": method, **{**point, "slot": point["slot"] + 1}}
        for method, result in section.items()
        for point in result.get("first_slot_curve", [])
    ]


def dataset_json(
    preset, dataset: str, results: dict, env: dict, data_files: dict, model: str, editor: str = DEFAULT_EDITOR
) -> dict:
    """Every figure of one data set, with the exact configuration and the environment."""
    kind = dataset
    out: dict = {
        "dataset": dataset,
        "n_edits": preset.n_edits[dataset],
        "n_clients": preset.n_clients,
        "n_slots": preset.n_slots,
        "preset": preset.name,
        "config": {
            "editor": editor,
            "alpha": preset.alpha,
            "gate": preset.gate,
            "reedit_vector": preset.vector,
            "collab_transport": preset.collab_transport,
            **({"zsre_target": preset.zsre_target} if dataset == "zsre" else {}),
            "seed": preset.seed,
            "partition": {
                "counterfact": "relation groups + 1/10 moved across clients",
                "zsre": "spectral clustering of question embeddings",
            }[dataset],
            "data_file": recorded_path(data_files[dataset]),
            "model": model,
            "z": "optimised once per request on the base model and shared by all methods "
            "(fededit_core.zcache); the overlap workload optimises z for real",
        },
        "environment": env,
        "methods": {},
    }
    main = results.get("main", {})
    central = central_row(main.get("unedited+centralised"))
    unedited = (main.get("unedited+centralised") or {}).get("unedited")
    if unedited:
        out["methods"]["unedited"] = {
            **unedited,
            "retention": _ratio(unedited.get("score"), (central or {}).get("score")),
        }
    if central:
        out["methods"]["centralised"] = {**central, "schedule": f"{preset.n_slots} time slots"}
    one = central_row(main.get("centralised (one batch)"))
    if one:
        out["methods"]["centralised_one_batch"] = {
            **one,
            "retention": _ratio(one.get("score"), (central or {}).get("score")),
        }
    for method in (*MAIN_METHODS, "collabedit-dense"):
        if method in main:
            out["methods"][method] = federated_row(main[method], central, kind)
            if _reedits(main[method]):
                out["methods"][method].update(_selectivity(main[method], main.get("unedited+centralised"), data_files))
    dense = out["methods"].get("collabedit-dense")
    if dense and "collabedit" in out["methods"]:  # what the dense statistics would have moved
        out["methods"]["collabedit"]["dense_bytes_up_per_client"] = dense["bytes_up_per_client"]
        out["methods"]["collabedit"]["dense_bytes_down_per_client"] = dense["bytes_down_per_client"]
    out["methods"] = {m: out["methods"][m] for m in METHOD_ORDER if m in out["methods"]}
    if "ablation" in results:
        out["ablation"] = _curve(results["ablation"], "n_edits", kind)
    if "clients" in results:
        out["clients"] = _curve(results["clients"], "n_clients", kind)
    if "slots" in results:
        out["slots"] = _curve(results["slots"], "n_slots", kind)
    if "merging" in results:
        out["merging"] = _curve(results["merging"], "n_edits", kind)
    if "overlap" in results:
        ov = results["overlap"]
        with_reuse, without = (federated_row(ov[k], None, kind) for k in ("reuse", "no reuse"))
        total = with_reuse["optimised"] + with_reuse["reused"]
        out["overlap"] = {
            "reuse": with_reuse,
            "no_reuse": without,
            "n_requests": total,
            "reused_share": with_reuse["reused"] / max(1, total),
            "z_optimisations": {"reuse": with_reuse["optimised"], "no_reuse": without["optimised"]},
            "wall_saved_s": without["wall_s"] - with_reuse["wall_s"],
            "wall_saved_share": 1 - with_reuse["wall_s"] / without["wall_s"],
        }
    if "iid" in results:
        iid = results["iid"]
        c = central_row(iid.get("centralised"))
        out["iid"] = {"centralised": c, **{m: federated_row(r, c, kind) for m, r in iid.items() if m != "centralised"}}
    out.update(_challenges(results, kind))
    for section in SEQUENTIAL_SECTIONS:
        if section in results:
            out[section] = _sequential(results[section])
    return out


# --- Markdown ----------------------------------------------------------------------------------------
def _pct(value, ratio) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ({100 * ratio:.1f}%)" if ratio is not None else "")


def main_table(js: dict) -> str:
    kind = js["dataset"]
    rows = []
    for method, m in js["methods"].items():
        rp = m.get("retention_parts", {})
        row = {"method": method, "Score": _pct(m.get("score"), m.get("retention"))}
        for p in _parts(kind):
            row[p.upper() if p != "fluency" else "Fluency"] = _pct(m.get(p), rp.get(p))
        others = m.get("others") or {}
        row["others' Score (n)"] = f"{others['score']:.3f} ({others['n']})" if others.get("score") is not None else "-"
        row["sets kept/received"] = f"{m['kept_sets']}/{m['received_sets']}" if "kept_sets" in m else "-"
        row["MKVs re-edited"] = m.get("applied", "-")
        row["z reused / optimised"] = f"{m['reused']}/{m['optimised']}" if "reused" in m else "-"
        row["KB up/down per client"] = (
            f"{m['bytes_up_per_client'] / 1e3:.0f}/{m['bytes_down_per_client'] / 1e3:.0f}"
            if "bytes_up_per_client" in m
            else "-"
        )
        row["wall s"] = f"{m['wall_s']:.0f}" if m.get("wall_s") is not None else "-"
        rows.append(row)
    return format_table(rows, markdown=True)


def _score_n(m: dict | None) -> str:
    return f"{m['score']:.3f} ({m['n']})" if m and m.get("score") is not None else "-"


def selectivity_table(js: dict) -> str:
    """FedEdit's re-edit condition on this workload: what it kept and what that did (bench.selectivity)."""
    rows = []
    for method, m in js["methods"].items():
        if "gate" not in m:
            continue
        g, u = m["gate"], m["union"]
        rows.append(
            {
                "method": method,
                "rule, vector, α": ", ".join(str(v) for v in (g["rule"], g["vector"], g["alpha"]) if v is not None)
                or "-",
                "related kept/offered": f"{g['related_kept']}/{g['related_offered']}",
                "unrelated kept/offered": f"{g['unrelated_kept']}/{g['unrelated_offered']}",
                "own Score": _pct(m.get("score"), m.get("retention")),
                "others' related Score (n)": _score_n(m["others_related"]),
                "others' unrelated Score (n)": _score_n(m["others_unrelated"]),
                "own ∪ re-edited Score (n)": _pct(u.get("score"), u.get("retention")) + f" ({u['n']})",
            }
        )
    return format_table(rows, markdown=True)


def curve_table(rows: list[dict], key: str, kind: str) -> str:
    out = []
    for r in sorted(rows, key=lambda r: (r[key], r["method"])):
        rp = r.get("retention_parts", {})
        out.append(
            {
                key: r[key],
                "method": r["method"],
                "Score": _pct(r.get("score"), r.get("retention")),
                **{p.upper(): _pct(r.get(p), rp.get(p)) for p in SCORE_PARTS[kind]},
                "centralised Score": f"{r['centralised_score']:.3f}" if r.get("centralised_score") else "-",
                "sets kept/received": f"{r['kept_sets']}/{r['received_sets']}" if r["received_sets"] else "-",
                "wall s": f"{r['wall_s']:.0f}",
            }
        )
    return format_table(out, markdown=True)


def overlap_table(ov: dict) -> str:
    rows = [
        {
            "run": label,
            "z optimised": ov[key]["optimised"],
            "z reused": ov[key]["reused"],
            "Score": f"{ov[key]['score']:.3f}",
            "wall s": f"{ov[key]['wall_s']:.0f}",
        }
        for label, key in (("with reuse", "reuse"), ("without reuse", "no_reuse"))
    ]
    return format_table(rows, markdown=True) + (
        f"\n\nReused share of z: {100 * ov['reused_share']:.1f}% of {ov['n_requests']} requests; wall time saved "
        f"{ov['wall_saved_s']:.0f} s ({100 * ov['wall_saved_share']:.1f}%)."
    )


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def collab_overlap_table(ov: dict) -> str:
    rows = [
        {
            "run": run.replace("_", " "),
            "Score, sent once": f"{_f(m['once']['score'])} (n={m['once']['n']})",
            "Score, repeated": f"{_f(m['repeated']['score'])} (n={m['repeated']['n']})",
            "counted once": m["server"]["duplicates_counted_once"],
            "residual norm by slot": ", ".join(f"{v:.2f}" for v in m["server"]["residual_norm_by_slot"].values()),
        }
        for run, m in ov.items()
    ]
    return format_table(rows, markdown=True)


def conflict_table(conflict: dict) -> str:
    rows = []
    for policy, m in conflict.items():
        for placement, a in m["answers"].items():
            rows.append(
                {
                    "policy": policy,
                    "second edit": placement,
                    "conflicts": a["n"],
                    "first writer's object": _f(a["first"]),
                    "second writer's object": _f(a["second"]),
                    "true object": _f(a["true"]),
                    "Score, other requests": _f(m["others"]["score"]),
                }
            )
    return format_table(rows, markdown=True)


def forgetting_table(rows: list[dict]) -> str:
    betas = sorted({r["beta1"] for r in rows})
    by = {(r["beta1"], r["rounds"]): r for r in rows}
    table = [
        {"rounds": k, **{f"beta1 = {b:g}": _f(by.get((b, k), {}).get("score")) for b in betas}}
        for k in sorted({r["rounds"] for r in rows})
    ]
    return format_table(table, markdown=True)


def iid_table(iid: dict, kind: str) -> str:
    rows = []
    for method, m in iid.items():
        if m is None:
            continue
        rp = m.get("retention_parts", {})
        rows.append(
            {
                "method": method,
                "Score": _pct(m.get("score"), m.get("retention")),
                **{p.upper(): _pct(m.get(p), rp.get(p)) for p in SCORE_PARTS[kind]},
            }
        )
    return format_table(rows, markdown=True)


def sequential_table(rows: list[dict]) -> str:
    methods = sorted({r["method"] for r in rows})
    by = {(r["method"], r["slot"]): r for r in rows}
    table = [
        {"after slot": t, **{m: _f(by.get((m, t), {}).get("score")) for m in methods}}
        for t in sorted({r["slot"] for r in rows})
    ]
    return format_table(table, markdown=True)


def _section(title: str, table: str, note: str | None = None, image: str | None = None, level: int = 2) -> list[str]:
    """One Markdown section: heading, table, an optional note and an optional image."""
    out = ["#" * level + f" {title}", "", table, ""]
    if note:
        out += [note, ""]
    if image:
        out += [f"![{title}]({image})", ""]
    return out


SELECTIVITY_NOTE = (
    "Related: the MKV's relation group (CounterFact) or question cluster (zsRE) is among the receiver's own "
    "so far. Others' Scores on the absorbed requests each client evaluated; own ∪ re-edited is the FedLEKE "
    "authors' figure, its percentage against the centralised run on the same requests."
)
COLLAB_OVERLAP_NOTE = (
    "A share of each slot's positions hold another client's request of the same slot. Counted once: rows "
    "left out of the sums; residual norm: the mean |R| at the first edited layer."
)
CONFLICT_NOTE = (
    "Share of each conflicting fact's prompts (rewrite and paraphrases) on which the merged model prefers "
    "each object; writers in (slot, client name) order."
)
FORGETTING_NOTE = (
    "Round 1 holds the old edits; beta1 = 0 is plain MEMIT, beta1 = 1 the dynamic covariance (CollabEdit's "
    "Eq. 7, the authors' setting)."
)


def markdown(preset, all_js: dict[str, dict], model: str, editor: str = DEFAULT_EDITOR) -> str:
    suffix = suffix_of(editor)
    parts = [
        f"# fededit reproduction benchmark ({preset.name} preset, editor {editor})",
        "",
        f"Model {model}, {preset.n_clients} clients, {preset.n_slots} time slots, α = {preset.alpha} on "
        f"{preset.vector}. Each federated figure is followed by its percentage of the centralised run "
        f"(the union, edited by {editor} in the same time slots).",
        "",
    ]
    titles = {"counterfact": "Table 1: CounterFact", "zsre": "Table 2: zsRE"}
    for dataset, js in all_js.items():
        if js["methods"]:
            parts += _section(f"{titles[dataset]} ({js['n_edits']} edits)", main_table(js))
            if any("gate" in m for m in js["methods"].values()):
                title = f"What the re-edit condition kept, {dataset}"
                parts += _section(title, selectivity_table(js), SELECTIVITY_NOTE, level=3)
    for dataset, js in all_js.items():
        if js.get("ablation"):
            parts += _section(f"Table 3: re-edit condition, {dataset}", curve_table(js["ablation"], "n_edits", dataset))
    for dataset, js in all_js.items():
        for key, title in (("clients", "Figure 5: number of clients"), ("slots", "Figure 6: number of time slots")):
            if js.get(key):
                table = curve_table(js[key], f"n_{key}", dataset)
                parts += _section(f"{title}, {dataset}", table, image=f"{key}_{dataset}{suffix}.png")
        if js.get("merging"):
            title = f"CollabEdit Figure 1: merging the clients' edits in one round, {dataset}"
            table = curve_table(js["merging"], "n_edits", dataset)
            parts += _section(title, table, image=f"merging_{dataset}{suffix}.png")
        if js.get("overlap"):
            title = f"Overlap workload, {dataset} (~30% of requests repeated at another client)"
            parts += _section(title, overlap_table(js["overlap"]))
        if js.get("iid"):
            parts += _section(f"IID split, {dataset}", iid_table(js["iid"], js["dataset"]))
        for key in SEQUENTIAL_SECTIONS:
            if js.get(key):
                note = f"Score of the edits of slot 1 (FedEdit: each client's own) after each slot, editor {editor}."
                title = (
                    f"Sequential editing: the first slot's edits after every slot, {dataset} "
                    f"({getattr(preset, key + '_edits')} edits in {preset.n_slots} slots)"
                )
                parts += _section(title, sequential_table(js[key]), note, image=f"{key}_{dataset}{suffix}.png")
        if js.get("collab_overlap"):
            table = collab_overlap_table(js["collab_overlap"])
            parts += _section(f"CollabEdit, overlap workload, {dataset}", table, COLLAB_OVERLAP_NOTE)
        if js.get("conflict"):
            parts += _section(
                f"CollabEdit, conflict workload, {dataset}", conflict_table(js["conflict"]), CONFLICT_NOTE
            )
        if js.get("forgetting"):
            title = f"CollabEdit, forgetting: the old edits' Score after each round, {dataset}"
            parts += _section(title, forgetting_table(js["forgetting"]), FORGETTING_NOTE)
    if any(js["methods"] for js in all_js.values()):
        parts += ["## Bytes per edit", "", f"![bytes per edit](bytes_per_edit{suffix}.png)", ""]
    return "\n".join(parts)


def write_outputs(
    out: Path,
    preset,
    results: dict[str, dict],
    env: dict,
    data_files: dict,
    model: str,
    editor: str = DEFAULT_EDITOR,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    suffix = suffix_of(editor)
    all_js = {d: dataset_json(preset, d, results[d], env, data_files, model, editor) for d in results}
    for dataset, js in all_js.items():
        atomic_write(out / f"{dataset}{suffix}.json", json.dumps(js, indent=1, default=str))
    atomic_write(out / f"README{suffix}.md", markdown(preset, all_js, model, editor))
    write_plots(out, all_js, suffix)
