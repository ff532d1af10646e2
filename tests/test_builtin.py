"""The built-in federation set adapts to the number of clients (plain ``flwr run .`` simulates 2)."""

import json

import pytest

from fededit_core.data.builtin import BUILTIN_CLIENTS, BUILTIN_FEDERATION
from fededit_core.data.loaders import DataError
from fededit_core.data.partition import load_partitions


def _records() -> dict[tuple[str, str], str]:
    """(subject, target) -> the client the file names."""
    rows = [json.loads(line) for line in BUILTIN_FEDERATION.read_text().splitlines() if line.strip()]
    return {(r["subject"], r["target_new"]): r["client"] for r in rows}


@pytest.mark.parametrize("n_clients", [1, 2, 3, 4])
def test_builtin_records_of_client_k_go_to_client_k_mod_n(n_clients):
    named = _records()
    parts = load_partitions("builtin", n_clients, "field")
    assert sorted(parts) == [f"client-{i}" for i in range(n_clients)]
    assert sum(len(p) for p in parts.values()) == len(named) == 24
    for client, requests in parts.items():
        for r in requests:
            k = int(named[(r.subject, r.target_new)].split("-")[1])
            assert f"client-{k % n_clients}" == client


def test_two_clients_each_hold_one_side_of_both_related_pairs():
    """client-0 and client-1 share landmarks, client-2 and client-3 languages: with 2 clients each
    holds a landmark side and a language side, so each still has a related partner."""
    named = _records()
    parts = load_partitions("builtin", 2, "field")
    held = {c: sorted({named[(r.subject, r.target_new)] for r in reqs}) for c, reqs in parts.items()}
    assert held == {"client-0": ["client-0", "client-2"], "client-1": ["client-1", "client-3"]}


def test_more_clients_than_the_builtin_set_names_the_flags_that_fix_it():
    with pytest.raises(DataError, match=f"num-supernodes={BUILTIN_CLIENTS}.*partition=.iid"):
        load_partitions("builtin", BUILTIN_CLIENTS + 1, "field")


def test_a_file_naming_other_clients_names_the_flags_that_fix_it(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"subject": "Rome", "prompt": "{} is in", "target_new": "France", "client": "client-3"}) + "\n"
    )
    with pytest.raises(DataError, match="num-supernodes=N.*partition='iid'"):
        load_partitions(str(data), 2, "field")
