"""A member cannot pass itself off as another or replay a set."""

from __future__ import annotations

import random

import numpy as np
import pytest

from bench import fuzz
from server_app.app import FlowerTransport, discover
from strategies.federation import run_federation
from strategies.session import FederationError
from strategies.settings import RunSettings


class NamedGrid(fuzz.FuzzGrid):
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
                reply.content = fuzz.pack({"client": self.declared[node]}, {})
        return replies


def test_a_node_is_named_by_its_registration_not_by_what_it_says():
    fuzz._identity()
    nodes = {100: "c-0", 101: "c-1", 102: "c-2", 103: "c-3"}
    # node 103 is registered as c-3 but claims to be c-0: it is left out, c-0 keeps its name
    names = discover(NamedGrid(nodes, declared={103: "c-0"}), 2, 0, None)
    assert names == {"c-0": 100, "c-1": 101, "c-2": 102}
    # with registration, an unregistered node is left out even with a free name
    names = discover(NamedGrid({100: "c-0", 101: "c-1", 102: "c-2"}), 2, 0, None)
    assert sorted(names) == ["c-0", "c-1", "c-2"]


def test_two_nodes_claiming_one_name_are_both_left_out_and_the_run_goes_on():
    fuzz._identity()
    names = discover(NamedGrid({}, declared={101: "c-0"}), 2, 0, None)
    assert names == {"c-2": 102, "c-3": 103}
    with pytest.raises(FederationError, match="only 0 healthy client"):
        discover(NamedGrid({}, declared={101: "c-0", 102: "c-3"}), 2, 0, None)


class ReplayGrid(fuzz.FuzzGrid):
    """c-0 uploads, under its own ids, the z that c-1 uploaded in slot 0 (which c-0 received)."""

    def __init__(self):
        super().__init__("none", random.Random(1))
        self.seen: dict[str, np.ndarray] = {}

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        for message, reply in zip(messages, replies):
            body, arrays = fuzz.unpack(message.content, fuzz.LIMITS)
            client = self.nodes[message.metadata.dst_node_id]
            if body["op"] == "reedit" and client == "c-0" and "z" in arrays:
                senders = body["senders"]
                self.seen["c-1"] = arrays["z"][[i for i, s in enumerate(senders) if s == "c-1"]]
            if body["op"] == "edit" and client == "c-0" and body["slot"] == 1:
                reply_body, reply_arrays = fuzz.unpack(reply.content, fuzz.LIMITS)
                reply_arrays["z"] = self.seen["c-1"]
                reply.content = fuzz.pack(reply_body, reply_arrays)
        return replies


def test_a_replayed_set_is_rejected(tmp_path):
    fuzz._identity()
    grid = ReplayGrid()
    settings = RunSettings(run="replay", num_slots=2, centralised=False, output_dir=str(tmp_path))
    names = discover(grid, 2, 0, None)
    report = run_federation(
        FlowerTransport(grid, names, None, limits=fuzz.LIMITS), list(names), settings, {}, progress=False
    )
    failed = {c["client"]: c["failed"] for c in report["clients"]}
    assert "already uploaded (a replayed set)" in failed["c-0"]
    assert [failed[c] for c in ("c-1", "c-2", "c-3")] == [None, None, None]
