"""Killed with SIGKILL inside a time slot and restarted, a federation ends with the models of an
uninterrupted run, nothing lost and nothing applied twice (bench.faults.kills; tiny model)."""

from __future__ import annotations

import pytest

from bench.faults.kills import prepare_world, run_strategy

# the kill points where state is half-written: one client done and the other not, the client
# inside its re-edit, the server with both replies unread (bench.faults runs every point)
POINTS = {
    "fededit": ["reedit#6:mid", "reedit#6:inside"],
    "editavg": ["editavg_apply#4:mid"],
    "collabedit": ["tags#5:mid", "collab#7:mid"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return prepare_world(root), root


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(POINTS))
def test_a_server_killed_inside_a_slot_resumes_to_the_uninterrupted_models(world, strategy):
    world, root = world
    rows = run_strategy(strategy, world, root, only=POINTS[strategy], log=lambda _: None)
    assert [r["kill_at"] for r in rows] == POINTS[strategy]
    for row in rows:
        assert row["killed"] and row["completed"], row.get("error")
        assert row["sets_lost"] == row["sets_applied_twice"] == 0
        assert row["max_weight_diff_vs_uninterrupted"] <= 1e-6
