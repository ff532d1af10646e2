"""What FedEdit's re-edit condition took in, split by relatedness, and the authors' union Score.

Only a benchmark can say which MKVs a receiver *should* keep: it knows every request. A request's
group is its CounterFact relation group (``data.grouping.template_groups`` over the workload) or, for
zsRE, its question cluster (the cluster partition puts cluster i at client i, so the group is the
owner). An MKV that client ``s`` sends in slot ``t`` is *related* to receiver ``c`` when its group is
among the groups of ``c``'s own requests of slots 0..t. Offered = every other client's slot-t MKVs
(what the server serves); kept = the ids the receiver re-edited (its evaluate reply).

From the absorbed requests each client evaluated (``others_per_request``, a sample of at most
``others_limit`` per client) come the others' Score on related and on unrelated requests, and the
FedLEKE authors' figure (zongkaiz/FLEKE FedEdit/evaluate_main.py: ``all_records``, a client's own
records plus those it re-edited, scored after the last slot): per client
``union = own ∪ re-edited``, each part the mean over own requests and re-edited ones (the sample
standing for all re-edited), Score the harmonic mean; its retention is against the centralised run
of the same editor on the same requests with the same weights.
"""

from __future__ import annotations

from fededit_core.data.grouping import template_groups
from fededit_core.data.requests import EditRequest
from fededit_core.data.slots import split_into_slots
from fededit_core.eval.metrics import summarise
from fededit_core.eval.tables import SCORE_PARTS
from strategies.report import weighted


def request_groups(kind: str, parts: dict[str, list[EditRequest]]) -> dict[str, list[int]]:
    """Each client's requests' groups, in the order of its requests (module docstring)."""
    if kind == "zsre":
        return {name: [c] * len(reqs) for c, (name, reqs) in enumerate(sorted(parts.items()))}
    union = [r for name in sorted(parts) for r in parts[name]]
    group_of = {t: g for g, ts in enumerate(template_groups(union)) for t in ts}
    return {name: [group_of[r.prompt] for r in reqs] for name, reqs in parts.items()}


def mkv_positions(parts: dict[str, list[EditRequest]], n_slots: int) -> dict[str, tuple[str, int, int]]:
    """MKV id ``<client>/<slot>/<index>`` -> (client, slot, position in the client's requests)."""
    out = {}
    for name, reqs in parts.items():
        position = 0
        for t, slot in enumerate(split_into_slots(reqs, n_slots)):
            for i in range(len(slot)):
                out[f"{name}/{t}/{i}"] = (name, t, position)
                position += 1
    return out


def _is_related(receiver: str, owner: str, position: int, slot: int, own_groups: dict, groups: dict) -> bool:
    return groups[owner][position] in own_groups[receiver][slot]


def _rate(rows: list[dict], kind: str) -> dict:
    if not rows:
        return {"n": 0, "score": None}
    return summarise(rows, SCORE_PARTS[kind])


def selectivity(
    kind: str, parts: dict[str, list[EditRequest]], n_slots: int, report: dict, central: dict | None
) -> dict:
    """``gate`` counts, ``others_related`` / ``others_unrelated`` and ``union`` of one federated run
    (its report's clients carry ``reedited_ids``, ``others_ids`` and ``others_per_request``); ``central``:
    the centralised result with ``clients`` and ``per_request`` on the same workload, or None."""
    groups = request_groups(kind, parts)
    where = mkv_positions(parts, n_slots)
    own_groups = {}  # receiver -> per slot t, the groups of its own requests of slots 0..t
    for name, reqs in parts.items():
        seen, per_slot, position = set(), [], 0
        for slot in split_into_slots(reqs, n_slots):
            seen |= set(groups[name][position : position + len(slot)])
            position += len(slot)
            per_slot.append(set(seen))
        own_groups[name] = per_slot
    clients = [c for c in report["clients"] if not c["failed"]]
    counts = {"related_offered": 0, "related_kept": 0, "unrelated_offered": 0, "unrelated_kept": 0}
    for c in clients:
        receiver = c["client"]
        for rid, (owner, slot, position) in where.items():
            if owner != receiver:
                related = _is_related(receiver, owner, position, slot, own_groups, groups)
                counts["related_offered" if related else "unrelated_offered"] += 1
        for rid in c.get("reedited_ids") or []:
            owner, slot, position = where[rid]
            related = _is_related(receiver, owner, position, slot, own_groups, groups)
            counts["related_kept" if related else "unrelated_kept"] += 1
    related_rows, unrelated_rows, union, union_central, by_client = [], [], [], [], []
    for c in clients:
        receiver, ids = c["client"], c.get("others_ids") or []
        rows = c.get("others_per_request") or []
        for rid, row in zip(ids, rows):
            owner, slot, position = where[rid]
            related = _is_related(receiver, owner, position, slot, own_groups, groups)
            (related_rows if related else unrelated_rows).append(row)
        n_reedited = len(c.get("reedited_ids") or [])
        sample = _rate(rows, kind) if rows else None
        mine = weighted([(c["n"], c["own"]), (n_reedited, sample)], kind)
        union.append((c["n"] + n_reedited, mine))
        entry = {"client": c["client"], "n": c["n"] + n_reedited, "score": (mine or {}).get("score")}
        if central:
            central_rows = [central["per_request"][where[rid][0]][where[rid][2]] for rid in ids]
            theirs = weighted(
                [(c["n"], central["clients"].get(receiver)), (n_reedited, _rate(central_rows, kind) if rows else None)],
                kind,
            )
            union_central.append((c["n"] + n_reedited, theirs))
            entry["centralised_score"] = (theirs or {}).get("score")
        by_client.append(entry)
    union_all = weighted(union, kind) or {"n": 0, "score": None}
    central_all = weighted(union_central, kind) if central else None
    score, central_score = union_all.get("score"), (central_all or {}).get("score")
    return {
        "gate": counts,
        "others_related": _rate(related_rows, kind),
        "others_unrelated": _rate(unrelated_rows, kind),
        "union": {
            **union_all,
            "centralised_score": central_score,
            "retention": score / central_score if score is not None and central_score else None,
            "by_client": by_client,
        },
    }
