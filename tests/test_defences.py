"""A member cannot pass itself off as another, replay a set, or poison another's model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.fuzz.harness import LIMITS, flower_identity
from bench.fuzz.server import FuzzGrid
from fededit_core.client.participant import Participant
from fededit_core.data.loaders import load_requests
from fededit_core.fedleke.bounds import out_of_bounds
from fededit_core.fedleke.mkv import MKVSet
from fededit_core.memit.editor import make_editor
from server_app.app import FlowerTransport, discover
from strategies.federation import run_federation
from strategies.session import FederationError
from strategies.settings import RunSettings
from tests.federation_kit import DirectTransport, client_specs, tiny_world, write_jsonl
from wire.messages import pack, unpack


class NamedGrid(FuzzGrid):
    """Honest scripted clients whose node registrations carry ``registered`` names."""

    def __init__(self, registered: dict[int, str], declared: dict[int, str] | None = None):
        super().__init__("none", random.Random(0))
        self.registered, self.declared = registered, declared or {}

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [
            NodeInfo(node_id=n, name=self.registered[n]) if self.registered.get(n) else NodeInfo(node_id=n)
            for n in self.nodes
        ]

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            node = reply.metadata.src_node_id
            if node in self.declared:
                reply.content = pack({"client": self.declared[node]}, {})
        return replies


def test_a_node_is_named_by_its_registration_not_by_what_it_says():
    flower_identity()
    nodes = {100: "c-0", 101: "c-1", 102: "c-2", 103: "c-3"}
    # node 103 is registered as c-3 but claims to be c-0: it is left out, c-0 keeps its name
    names = discover(NamedGrid(nodes, declared={103: "c-0"}), 2, 0, None)
    assert names == {"c-0": 100, "c-1": 101, "c-2": 102}
    # with registration, an unregistered node is left out even with a free name
    names = discover(NamedGrid({100: "c-0", 101: "c-1", 102: "c-2"}), 2, 0, None)
    assert sorted(names) == ["c-0", "c-1", "c-2"]


def test_two_nodes_claiming_one_name_are_both_left_out_and_the_run_goes_on():
    flower_identity()
    names = discover(NamedGrid({}, declared={101: "c-0"}), 2, 0, None)
    assert names == {"c-2": 102, "c-3": 103}
    with pytest.raises(FederationError, match="only 0 healthy client"):
        discover(NamedGrid({}, declared={101: "c-0", 102: "c-3"}), 2, 0, None)


class ReplayGrid(FuzzGrid):
    """c-0 uploads, under its own ids, the z that c-1 uploaded in slot 0 (which c-0 received)."""

    def __init__(self):
        super().__init__("none", random.Random(1))
        self.seen: dict[str, np.ndarray] = {}

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        for message, reply in zip(messages, replies):
            body, arrays = unpack(message.content, LIMITS)
            client = self.nodes[message.metadata.dst_node_id]
            if body["op"] == "reedit" and client == "c-0" and "z" in arrays:
                senders = body["senders"]
                self.seen["c-1"] = arrays["z"][[i for i, s in enumerate(senders) if s == "c-1"]]
            if body["op"] == "edit" and client == "c-0" and body["slot"] == 1:
                reply_body, reply_arrays = unpack(reply.content, LIMITS)
                reply_arrays["z"] = self.seen["c-1"]
                reply.content = pack(reply_body, reply_arrays)
        return replies


def test_a_replayed_set_is_rejected(tmp_path):
    flower_identity()
    grid = ReplayGrid()
    settings = RunSettings(run="replay", num_slots=2, centralised=False, output_dir=str(tmp_path), seal_mkvs=False)
    names = discover(grid, 2, 0, None)
    report = run_federation(
        FlowerTransport(grid, names, None, limits=LIMITS), list(names), settings, {}, progress=False
    )
    failed = {c["client"]: c["failed"] for c in report["clients"]}
    assert "already uploaded (a replayed set)" in failed["c-0"]
    assert [failed[c] for c in ("c-1", "c-2", "c-3")] == [None, None, None]


# --- poisoning ------------------------------------------------------------------------------------


@pytest.fixture
def victim(tmp_path, monkeypatch):
    """A client of the tiny world (edits that work) that has edited its 4 requests."""
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))
    world = tiny_world(tmp_path)
    editor = make_editor(world["model"], **world["hparams"])
    requests = [r for r in load_requests(world["data"])][::2]
    participant = Participant("victim", editor, requests, n_slots=1)
    participant.edit_slot(0)
    return participant


def _poison(own: MKVSet, scale: float) -> MKVSet:
    """The victim's own vectors (so the `set` rule of Eq. 8 on delta keeps the set) plus one that pushes its first fact back by
    ``scale`` times its own shift, at its own key: z = h - scale * delta."""
    h = own.z - own.delta
    z = torch.cat([own.z, h[:1] - scale * own.delta[:1]])
    delta = torch.cat([own.delta, -scale * own.delta[:1]])
    keys = torch.cat([own.keys, own.keys[:1]])
    return MKVSet([f"evil/0/{i}" for i in range(len(z))], own.layers, z, delta, keys)


def _own_nll(p: Participant) -> torch.Tensor:
    p.activate()
    return p.own_nll(p.edited_requests())


def _weight_shift(p: Participant, start: dict) -> float:
    return max(float((p.layers[l] - start[l]).norm() / start[l].norm()) for l in start)


def test_a_harmful_set_that_keeps_the_bounds_is_rolled_back(victim):
    """Scale 3: within the bounds, but it undoes the victim's facts; the NLL check rolls it back."""
    clean, start = _own_nll(victim), {l: w.clone() for l, w in victim.layers.items()}
    poison = _poison(victim.own, 3.0)
    assert out_of_bounds(poison, victim.own, victim.editor.hp.clamp_norm_factor) is None
    victim.reedit(
        [poison], gate="set", vector="delta", alpha=0.5, margin=None, check_bounds=False
    )  # defences off: the set is applied
    assert victim.reports[-1].kept_sets == 1 and float((_own_nll(victim) - clean).max()) > 1.0
    victim.layers, victim.reedited_ids, victim.reports[-1].kept_sets = start, [], 0
    victim.reedit([poison], gate="set", vector="delta", alpha=0.5)
    assert victim.reports[-1].kept_sets == 0 and victim.reports[-1].refused_sets == 1
    assert torch.allclose(_own_nll(victim), clean, atol=1e-5)
    assert "raises the target NLL of an own edit" in victim.suspects["evil"]


def test_one_fact_pushed_back_is_rolled_back_even_when_the_mean_moves_less_than_the_margin(victim):
    """The check is per own edit: a margin above the mean rise but below the pushed-back fact's rise
    still rolls the set back."""
    clean, start = _own_nll(victim), {l: w.clone() for l, w in victim.layers.items()}
    poison = _poison(victim.own, 3.0)
    victim.reedit([poison], gate="set", vector="delta", alpha=0.5, margin=None, check_bounds=False)
    rise = _own_nll(victim) - clean
    assert float(rise.max()) > 2 * float(rise.mean()) > 0  # one fact moves, the others much less
    victim.layers, victim.reedited_ids, victim.reports[-1].kept_sets = start, [], 0
    victim.reedit([poison], gate="set", vector="delta", alpha=0.5, margin=float(rise.mean() + rise.max()) / 2)
    assert victim.reports[-1].kept_sets == 0 and "evil" in victim.suspects
    assert torch.allclose(_own_nll(victim), clean, atol=1e-5)


def test_a_scaled_up_set_is_refused_by_the_bounds(victim):
    """Scale 1e5: the weights would move by thousands of times their norm; the bounds refuse it."""
    start = {l: w.clone() for l, w in victim.layers.items()}
    poison = _poison(victim.own, 1e5)
    assert "shift" in out_of_bounds(poison, victim.own, victim.editor.hp.clamp_norm_factor)
    victim.reedit([poison], gate="set", vector="delta", alpha=0.5, margin=None, check_bounds=False)
    assert _weight_shift(victim, start) > 100
    victim.layers, victim.reedited_ids, victim.reports[-1].kept_sets = start, [], 0
    victim.reedit([poison], gate="set", vector="delta", alpha=0.5)
    assert _weight_shift(victim, start) == 0.0 and victim.reports[-1].refused_sets == 1
    assert "shift" in victim.suspects["evil"]


def test_honest_mkvs_keep_the_bounds(victim):
    assert out_of_bounds(victim.own, victim.own, victim.editor.hp.clamp_norm_factor) is None


def test_the_poisoning_benchmarks_attacker_gets_its_crafted_set_stored_and_kept(tmp_path, monkeypatch):
    """bench/faults/poisoning.py's attacker, on the tiny world with 4 clients and no defences: its
    crafted uploads pass the server's checks, and every victim's Eq. 8 keeps them."""
    from bench.faults.poisoning import ATTACKED_GATE, ATTACKER, REPEAT, Attacker

    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))
    world = tiny_world(tmp_path)
    records = [json.loads(line) for line in Path(world["data"]).read_text().splitlines()]
    data = write_jsonl(tmp_path / "four.jsonl", [{**r, "client": f"client-{i % 4}"} for i, r in enumerate(records)])
    specs = client_specs(world, tmp_path, "poison", n_clients=4, data=str(data))
    transport = Attacker(DirectTransport(specs))
    settings = RunSettings(
        run="poison",
        num_slots=2,
        centralised=False,
        output_dir=str(tmp_path / "runs"),
        seal_mkvs=False,
        **ATTACKED_GATE,
    )
    report = run_federation(transport, list(specs), settings, {}, progress=False)
    assert [c["failed"] for c in report["clients"]] == [None] * 4
    served = {sender: len(rows) for sender, rows in transport.served.items()}
    assert served == {"client-0": 2, "client-1": 2, "client-2": 2}  # one request per slot each
    for victim in ("client-0", "client-1", "client-2"):
        kept = transport.inner.worker.participant(specs[victim]).reedited_ids
        assert sum(i.startswith(f"{ATTACKER}/1/") for i in kept) == 3 + 3 * REPEAT  # copies and pushed back
