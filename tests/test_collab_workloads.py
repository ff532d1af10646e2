"""CollabEdit's challenge workloads: copies land in the slot chosen, at another client, and a
conflict is the same fact with another object of the same relation."""

from __future__ import annotations

from bench import collab_workloads as cw
from fededit_core.data.requests import EditRequest
from fededit_core.data.slots import split_into_slots

OBJECTS = ("Rome", "Paris", "Berlin", "London", "Madrid")


def requests(n: int) -> list[EditRequest]:
    return [
        EditRequest(
            case_id=f"c{i}",
            subject=f"Subject {i}",
            prompt="The {} is in" if i % 2 else "{} was born in",
            target_new=OBJECTS[i % 5],
            target_true=OBJECTS[(i + 1) % 5],
        )
        for i in range(n)
    ]


def slots_of(parts: dict, n_slots: int) -> dict:
    return {c: split_into_slots(reqs, n_slots) for c, reqs in parts.items()}


def test_deal_fills_every_client_and_slot_and_split_into_slots_gives_the_chunks_back():
    grid = cw.deal(requests(25), n_clients=3, n_slots=2, seed=1)
    assert [[len(chunk) for chunk in slot] for slot in grid] == [[4, 4, 4], [4, 4, 4]]
    ids = [r.case_id for slot in grid for chunk in slot for r in chunk]
    assert len(set(ids)) == 24
    split = slots_of(cw.by_client(grid), 2)
    assert all(split[f"client-{c}"][s] == grid[s][c] for s in range(2) for c in range(3))


def test_overlap_copies_sit_at_another_client_in_the_same_slot():
    grid = cw.deal(requests(40), n_clients=4, n_slots=2, seed=0)
    copied, repeated = cw.with_overlap(grid, share=0.25, seed=3)
    assert len(repeated) == 2 * round(0.25 * 20)
    for s, slot in enumerate(copied):
        holders: dict[str, set[int]] = {}
        for c, chunk in enumerate(slot):
            for r in chunk:
                holders.setdefault(r.case_id, set()).add(c)
        twice = {cid for cid, cs in holders.items() if len(cs) == 2}
        assert twice and twice <= set(repeated)
        assert all(len(cs) <= 2 for cs in holders.values())
    assert [[len(chunk) for chunk in slot] for slot in copied] == [[5] * 4] * 2  # copies replace, not add
    assert grid != copied  # the input grid is left as it was


def test_conflicts_edit_the_same_fact_to_another_object_of_its_relation_in_this_or_the_next_slot():
    pool = requests(60)
    grid = cw.deal(pool[:40], n_clients=4, n_slots=2, seed=0)
    changed, conflicts = cw.with_conflicts(grid, share=0.1, pool=pool, seed=2)
    assert len(conflicts) == 4
    where = {r.case_id: (s, c) for s, slot in enumerate(changed) for c, chunk in enumerate(slot) for r in chunk}
    same_relation = {r.prompt: {x.target_new for x in pool if x.prompt == r.prompt} for r in pool}
    for conflict in conflicts:
        first, second = conflict["first"], conflict["second"]
        assert (first.subject, first.prompt) == (second.subject, second.prompt)
        assert first.target_new != second.target_new and first.target_true not in (first.target_new, second.target_new)
        assert [first.case_id, second.case_id].count(f"{first.case_id.removesuffix('-conflict')}-conflict") == 1
        assert {first.target_new, second.target_new} <= same_relation[first.prompt]
        (s1, c1), (s2, c2) = where[first.case_id], where[second.case_id]
        assert c1 != c2 and (s1, f"client-{c1}") < (s2, f"client-{c2}")  # writing order
        assert s2 - s1 == (0 if conflict["placement"] == "same slot" else 1)
    assert [c["placement"] for c in conflicts].count(
        "same slot"
    ) == 2  # half, though half the cells are the last slot's
    _, most = cw.with_conflicts(grid, share=0.2, pool=pool, seed=2, same_slot=0.75)
    assert [c["placement"] for c in most].count("same slot") == 6 and len(most) == 8
    _, one_slot = cw.with_conflicts(cw.deal(pool[:40], n_clients=4, n_slots=1, seed=0), share=0.1, pool=pool, seed=2)
    assert [c["placement"] for c in one_slot] == ["same slot"] * 4


def test_forgetting_rounds_give_each_client_its_requests_in_rounds():
    rounds = cw.forgetting_rounds(requests(12), n_clients=3, per_round=2)
    assert [r.case_id for r in rounds["client-1"]] == ["c1", "c4", "c7", "c10"]
