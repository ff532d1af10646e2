"""The run report: per client, weighted over clients, against the centralised upper bound.

Weighted metrics: each part (ES/PS/NS or EA/PA/NA) is the mean over clients weighted by their
numbers of requests, and the weighted Score is the harmonic mean of the weighted parts (so it is
computed exactly like the Score of one model on the union). Retention = weighted Score / centralised
Score on the same requests.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from fededit_core.eval.metrics import harmonic_mean
from fededit_core.eval.tables import SCORE_PARTS, format_table
from fededit_core.io import atomic_write


def weighted(rows: list[tuple[int, dict | None]], kind: str) -> dict | None:
    rows = [(n, m) for n, m in rows if m and n > 0]
    if not rows:
        return None
    total = sum(n for n, _ in rows)
    out: dict = {"n": total}
    for key in (*SCORE_PARTS[kind], "fluency"):
        values = [(n, m[key]) for n, m in rows if m.get(key) is not None and not math.isnan(m[key])]
        if values:
            out[key] = sum(n * v for n, v in values) / sum(n for n, _ in values)
    parts = [out[k] for k in SCORE_PARTS[kind] if k in out]
    out["score"] = harmonic_mean(parts) if parts else None
    return out


def _sum_reports(reports: list[dict]) -> dict:
    totals = {
        k: sum(r.get(k, 0) for r in reports)
        for k in ("edited", "optimised", "reused", "received_sets", "kept_sets", "refused_sets", "applied")
    }
    seconds: dict[str, float] = defaultdict(float)
    for r in reports:
        for phase, s in r.get("seconds", {}).items():
            seconds[phase] += s
    return {**totals, "seconds": dict(seconds)}


def build_report(
    run: str,
    strategy: str,
    config: dict,
    kind: str,
    evaluations: dict[str, dict],
    ledgers: dict,
    server_seconds: dict,
    centralised: dict[str, dict] | None,
    summary: dict,
) -> dict:
    clients = []
    for name in sorted(ledgers):
        ev = evaluations.get(name, {})
        ledger = ledgers[name]
        by_slot = ledger.bytes_by_slot()
        clients.append(
            {
                "client": name,
                "n": ev.get("n_own", 0),
                "own": ev.get("own"),
                "own_before": ev.get("own_before"),
                "n_others": ev.get("n_others", 0),
                "others": ev.get("others"),
                "others_before": ev.get("others_before"),
                **{k: ev[k] for k in ("reedited_ids", "others_ids", "others_per_request") if ev.get(k) is not None},
                **_sum_reports(ev.get("reports", [])),
                "bytes_sent": sum(b["sent_to_server"] for b in by_slot),
                "bytes_received": sum(b["received_from_server"] for b in by_slot),
                "bytes_by_slot": by_slot,
                "failed": ledger.failed,
                "generations": ev.get("generations", []),
                "centralised": (centralised or {}).get(name),
            }
        )
    ok = [c for c in clients if not c["failed"]]
    weighted_own = weighted([(c["n"], c["own"]) for c in ok], kind)
    central = weighted([(c["n"], c["centralised"]) for c in ok], kind) if centralised else None
    score, central_score = (weighted_own or {}).get("score"), (central or {}).get("score")
    return {
        "run_id": run,
        "strategy": strategy,
        "kind": kind,
        "config": config,
        "clients": clients,
        "weighted": weighted_own,
        "weighted_others": weighted([(c["n_others"], c["others"]) for c in ok], kind),
        "unedited": weighted([(c["n"], c["own_before"]) for c in ok], kind),
        "centralised": central,
        "retention": score / central_score if score is not None and central_score else None,
        "server_seconds": dict(server_seconds),
        "server": summary,
    }


def client_table(report: dict, markdown: bool = False) -> str:
    parts = list(SCORE_PARTS[report["kind"]])
    rows = []
    for c in report["clients"]:
        own, others = c["own"] or {}, c["others"] or {}
        rows.append(
            {
                "client": c["client"],
                "n": c["n"],
                **{p: own.get(p) for p in parts},
                "score": own.get("score"),
                "others n": c["n_others"],
                "others score": others.get("score"),
                "recv/kept/applied": f"{c['received_sets']}/{c['kept_sets']}/{c['applied']}",
                "reused": c["reused"],
                "KB up/down": f"{c['bytes_sent'] / 1e3:.0f}/{c['bytes_received'] / 1e3:.0f}",
                "status": "failed" if c["failed"] else "ok",
            }
        )
    for label, key in (("weighted", "weighted"), ("unedited", "unedited"), ("centralised", "centralised")):
        m = report.get(key)
        if m:
            rows.append({"client": label, "n": m.get("n"), **{p: m.get(p) for p in parts}, "score": m.get("score")})
    if report.get("weighted_others"):
        rows.append(
            {
                "client": "weighted (others)",
                "others n": report["weighted_others"]["n"],
                "others score": report["weighted_others"]["score"],
            }
        )
    return format_table(rows, markdown=markdown)


def generations_table(report: dict, markdown: bool = False) -> str:
    rows = [
        {
            "client": c["client"],
            "whose": g["whose"],
            "prompt": g["prompt"],
            "new": g["target"],
            "before": g["before"],
            "after": g["after"],
        }
        for c in report["clients"]
        for g in c.get("generations") or []
    ]
    if not rows:  # deployment: text never reaches the server
        return (
            "(generations are text: each organisation keeps its own, in <state-dir>/<run>/<client>"
            ".generations.json on its machine)"
        )
    return format_table(rows, markdown=markdown)


def summary_line(report: dict) -> str:
    w, c = report.get("weighted") or {}, report.get("centralised") or {}
    line = f"{report['strategy']}: weighted Score {w.get('score', float('nan')):.3f}"
    if c:
        slots = (report.get("config") or {}).get("num-slots")
        schedule = f" (the union in the same {slots} time slots)" if slots else ""
        line += f", centralised{schedule} {c['score']:.3f}, retention {100 * report['retention']:.1f}%"
    return line


def write_report(report: dict, folder: Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``folder`` (each written whole, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    markdown = (
        "\n\n".join(
            [
                f"# fededit run {report['run_id']} ({report['strategy']})",
                summary_line(report),
                "## Clients",
                client_table(report, markdown=True),
                "## Generations (greedy, before -> after)",
                generations_table(report, markdown=True),
                "## Configuration",
                "```json\n" + json.dumps(report["config"], indent=2) + "\n```",
            ]
        )
        + "\n"
    )
    paths = []
    for name, text in (("report.json", json.dumps(report, indent=2, default=str)), ("report.md", markdown)):
        paths.append(atomic_write(folder / name, text))
    return paths[0], paths[1]
