"""CollabEdit's overlap and conflict workloads (its paper's first two challenges), built slot by slot,
and what the merged model answers on them.

A grid holds ``per_slot`` requests per client and time slot, dealt from a seeded permutation, so
client c's list is its slots' chunks in order and ``split_into_slots`` gives back exactly the chunk
of each slot. A copy replaces one of another client's own requests, so it lands in the slot chosen:

- overlap: about ``share`` of each slot's requests also sent by one other client in the same slot
  (what de-duplication must count once);
- conflict: about ``share`` of all requests edited by one other client to a different object of
  the same relation (another request's target_new under the same template), a share of them in the
  same slot (half by default) and the rest in the next one. First and second writer are ordered by (slot, client name), the order in
  which ``last-writer`` lets the later edit win.

:func:`object_votes` says which of the first writer's object, the second's and the true object the
merged model prefers (lowest NLL), as a share of the rewrite and paraphrase prompts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fededit_core.data.clients import client_name
from fededit_core.data.requests import EditRequest
from fededit_core.eval.metrics import evaluate, target_nll

Grid = list[list[list[EditRequest]]]  # [slot][client] -> that client's requests of the slot


def deal(requests: Sequence[EditRequest], n_clients: int, n_slots: int, seed: int) -> Grid:
    """The requests in a seeded order, ``len // (clients * slots)`` per client and slot."""
    per = len(requests) // (n_clients * n_slots)
    if per < 1:
        raise ValueError(f"{len(requests)} requests cannot fill {n_clients} clients x {n_slots} slots")
    order = list(requests)
    random.Random(seed).shuffle(order)
    it = iter(order)
    return [[[next(it) for _ in range(per)] for _ in range(n_clients)] for _ in range(n_slots)]


def by_client(grid: Grid) -> dict[str, list[EditRequest]]:
    """``{client: its requests, slot after slot}``."""
    return {client_name(c): [r for slot in grid for r in slot[c]] for c in range(len(grid[0]))}


def _free_position(grid: Grid, slot: int, avoid: int, used: set, rng: random.Random) -> tuple[int, int] | None:
    """A (client, row) of ``slot`` at a client other than ``avoid`` that no copy touched yet."""
    free = [
        (c, i)
        for c in range(len(grid[slot]))
        if c != avoid
        for i in range(len(grid[slot][c]))
        if (slot, c, i) not in used
    ]
    return rng.choice(free) if free else None


def with_overlap(grid: Grid, share: float, seed: int) -> tuple[Grid, list[str]]:
    """In each slot, about ``share`` of the positions hold a copy of another client's request of the
    same slot; returns the grid and the case ids of the repeated requests."""
    rng = random.Random(seed)
    grid = [[list(chunk) for chunk in slot] for slot in grid]
    repeated: list[str] = []
    for s, slot in enumerate(grid):
        cells = [(c, i) for c in range(len(slot)) for i in range(len(slot[c]))]
        wanted, made, used = round(share * len(cells)), 0, set()
        for c, i in rng.sample(cells, len(cells)):
            if made == wanted:
                break
            if (s, c, i) in used:
                continue
            target = _free_position(grid, s, c, used | {(s, c, i)}, rng)
            if target is None:
                break
            used |= {(s, c, i), (s, *target)}
            grid[s][target[0]][target[1]] = slot[c][i]
            repeated.append(slot[c][i].case_id)
            made += 1
    return grid, repeated


def other_object(request: EditRequest, pool: Sequence[EditRequest], rng: random.Random) -> str | None:
    """Another request's target_new under the same relation template, neither the request's old nor new
    object."""
    taken = {request.target_new.strip().casefold(), (request.target_true or "").strip().casefold()}
    options = sorted(
        {r.target_new for r in pool if r.prompt == request.prompt and r.target_new.strip().casefold() not in taken}
    )
    return rng.choice(options) if options else None


def with_conflicts(
    grid: Grid, share: float, pool: Sequence[EditRequest], seed: int, same_slot: float = 0.5
) -> tuple[Grid, list[dict]]:
    """About ``share`` of all requests edited again to another object by another client, ``same_slot``
    of them in the same slot and the rest in the next (all in the same slot when there is one slot);
    returns the grid and one record per conflict: the two requests in writing order, and
    ``placement`` (``same slot`` or ``next slot``)."""
    rng = random.Random(seed)
    grid = [[list(chunk) for chunk in slot] for slot in grid]
    n_slots = len(grid)
    cells = [(s, c, i) for s in range(n_slots) for c in range(len(grid[s])) for i in range(len(grid[s][c]))]
    wanted = round(share * len(cells))
    n_same = wanted if n_slots == 1 else round(same_slot * wanted)
    quota = {"same slot": n_same, "next slot": wanted - n_same}
    used: set = set()
    conflicts: list[dict] = []
    for s, c, i in rng.sample(cells, len(cells)):
        if not any(quota.values()):
            break
        # the last slot's requests have no next slot; the others fill the scarcer next-slot quota first
        options = ("same slot",) if s == n_slots - 1 else ("next slot", "same slot")
        placement = next((p for p in options if quota[p]), None)
        if (s, c, i) in used or placement is None:
            continue
        first = grid[s][c][i]
        obj = other_object(first, pool, rng) if first.target_true else None
        to_slot = s if placement == "same slot" else s + 1
        target = _free_position(grid, to_slot, c, used | {(s, c, i)}, rng)
        if obj is None or target is None:
            continue
        second = first.model_copy(update={"target_new": obj, "case_id": f"{first.case_id}-conflict"})
        used |= {(s, c, i), (to_slot, *target)}
        grid[to_slot][target[0]][target[1]] = second
        order = [(s, c, first), (to_slot, target[0], second)]
        order.sort(key=lambda x: (x[0], client_name(x[1])))
        conflicts.append({"first": order[0][2], "second": order[1][2], "placement": placement})
        quota[placement] -= 1
    return grid, conflicts


def object_votes(model, tok, conflicts: Sequence[dict]) -> list[dict]:
    """Per conflict, the share of its prompts (rewrite and paraphrases) on which the first writer's
    object, the second's or the true object has the lowest NLL."""
    prompts, targets, spans = [], [], []
    for conflict in conflicts:
        first, second = conflict["first"], conflict["second"]
        texts = [first.text, *first.paraphrase_prompts]
        objects = [first.target_new, second.target_new, first.target_true or ""]
        spans.append((len(prompts), len(texts)))
        for obj in objects:
            prompts += texts
            targets += [obj] * len(texts)
    nll = target_nll(model, tok, prompts, targets)
    out = []
    for conflict, (start, n) in zip(conflicts, spans):
        rows = nll[start : start + 3 * n].view(3, n)
        winner = rows.argmin(dim=0)
        shares = [float((winner == k).float().mean()) for k in range(3)]
        out.append({"placement": conflict["placement"], "first": shares[0], "second": shares[1], "true": shares[2]})
    return out


def forgetting_rounds(requests: Sequence[EditRequest], n_clients: int, per_round: int) -> dict[str, list[EditRequest]]:
    """The forgetting experiment's clients: client i holds requests i, i + n, ... in rounds of
    ``per_round``; round 0 holds the old edits."""
    return {client_name(i): list(requests[i::n_clients]) for i in range(n_clients)}


def build(exp: dict, requests: Sequence[EditRequest], pool: Sequence[EditRequest]) -> tuple[dict, dict]:
    """``({client: requests}, what :func:`inspect` needs)`` of the workload ``exp["workload"]``."""
    kind, seed = exp["workload"], exp["seed"]
    if kind == "forgetting":  # a run of k rounds edits the first k rounds, one time slot each
        rounds = forgetting_rounds(requests, exp["n_clients"], exp["per_round"])
        parts = {c: reqs[: exp["n_slots"] * exp["per_round"]] for c, reqs in rounds.items()}
        return parts, {"old": [r for reqs in rounds.values() for r in reqs[: exp["per_round"]]]}
    grid = deal(requests, exp["n_clients"], exp["n_slots"], seed)
    if kind == "collab_overlap":
        grid, repeated = with_overlap(grid, exp["overlap"], seed)
        return by_client(grid), {"repeated": set(repeated)}
    if kind == "conflict":
        grid, conflicts = with_conflicts(grid, exp["conflict_share"], pool, seed, exp["conflict_same_slot"])
        return by_client(grid), {"conflicts": conflicts}
    raise ValueError(f"unknown workload {kind!r}")


def _metrics(model, tok, requests: Sequence[EditRequest], kind: str) -> dict:
    if not requests:
        return {"n": 0, "score": None}
    return {k: v for k, v in evaluate(model, tok, list(requests), kind).items() if k != "per_request"}


def inspect(exp: dict, model, tok, parts: dict[str, list[EditRequest]], meta: dict) -> dict:
    """What the merged model does on the workload: the old edits (forgetting), the requests sent
    once and those repeated (overlap), which object each conflicting fact answers (conflict)."""
    kind = exp["kind"]
    unique = list({r.case_id: r for reqs in parts.values() for r in reqs}.values())
    if exp["workload"] == "forgetting":
        return {"old": _metrics(model, tok, meta["old"], kind)}
    if exp["workload"] == "collab_overlap":
        once = [r for r in unique if r.case_id not in meta["repeated"]]
        repeated = [r for r in unique if r.case_id in meta["repeated"]]
        return {"once": _metrics(model, tok, once, kind), "repeated": _metrics(model, tok, repeated, kind)}
    in_conflict = {c[k].case_id for c in meta["conflicts"] for k in ("first", "second")}
    votes = object_votes(model, tok, meta["conflicts"])
    table = {}
    for placement in ("same slot", "next slot"):
        rows = [v for v in votes if v["placement"] == placement]
        table[placement] = {
            "n": len(rows),
            **{k: sum(v[k] for v in rows) / len(rows) if rows else None for k in ("first", "second", "true")},
        }
    others = [r for r in unique if r.case_id not in in_conflict]
    return {"answers": table, "others": _metrics(model, tok, others, kind)}
