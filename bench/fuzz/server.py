"""The server's door: one malformed reply in a whole run on the real server path."""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path

import numpy as np
from flwr.proto.node_pb2 import NodeInfo
from tqdm import tqdm

from bench.fuzz.harness import (
    CLIENTS,
    LIMITS,
    SERVER_STEPS,
    SLOTS,
    STRATEGY_OF,
    TARGET,
    flower_identity,
    honest_reply,
    tally,
)
from bench.fuzz.mutations import malformed_content
from wire.messages import pack, unpack

# --------------------------------------------------------------------------- the server's door


class _Reply:
    """What ``grid.send_and_receive`` yields, holding any content (even what Flower would refuse)."""

    class _Meta:
        def __init__(self, src: int):
            self.src_node_id = src

    def __init__(self, content, src: int):
        self.content, self.metadata = content, self._Meta(src)

    def has_error(self) -> bool:
        return False


class FuzzGrid:
    """A Grid of scripted honest clients; ``target``'s first reply to ``op`` is malformed."""

    def __init__(self, op: str, rng: random.Random):
        self.op, self.rng, self.fired, self.kind = op, rng, False, ""
        self.nodes = {100 + i: name for i, name in enumerate(CLIENTS)}
        self.np_rng = np.random.default_rng(rng.randrange(2**32))
        # "rejected" is only asked after a rejection: make the target's first upload invalid first
        self.first_invalid = "edit" if op == "rejected" else None

    def get_nodes(self):
        return [NodeInfo(node_id=n) for n in self.nodes]

    def send_and_receive(self, messages, timeout=None):
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            client = self.nodes[node]
            body, arrays = unpack(message.content, LIMITS)
            reply_body, reply_arrays = honest_reply(client, body, arrays, self.np_rng)
            content = pack(reply_body, reply_arrays)
            if client == TARGET and body["op"] == self.first_invalid:
                self.first_invalid = None
                content = pack({**reply_body, "fingerprint": "another-model"}, reply_arrays)
            elif client == TARGET and body["op"] == self.op and not self.fired:
                self.fired = True
                self.kind, content = malformed_content(self.op, client, reply_body, reply_arrays, self.rng)
            out.append(_Reply(content, node))
        return out


def server_case(op: str, rng: random.Random, root: Path) -> tuple[str, str]:
    """(outcome, mutation kind) of one run with one malformed reply."""
    from server_app.app import FlowerTransport, discover
    from strategies.federation import run_federation
    from strategies.session import FederationError
    from strategies.settings import RunSettings

    grid = FuzzGrid(op, rng)
    settings = RunSettings(
        run="fuzz",
        strategy=STRATEGY_OF.get(op, "fededit"),
        num_slots=SLOTS,
        centralised=False,
        min_clients=2,
        output_dir=str(root),
        max_message_mb=1,
    )
    try:
        names = discover(grid, settings.min_clients, 0, None)
        if TARGET not in names:
            return ("rejected" if grid.fired else "crashed"), grid.kind
        transport = FlowerTransport(grid, names, None, limits=LIMITS)
        report = run_federation(transport, list(names), settings, settings.run_config(), progress=False)
    except FederationError as err:
        return f"crashed: FederationError: {str(err)[:200]}", grid.kind
    except Exception as err:  # noqa: BLE001 - the fuzz counts whatever escapes the server code
        return f"crashed: {type(err).__name__}: {str(err)[:200]}", grid.kind
    if not grid.fired:
        return "crashed: the malformed reply was never asked for", grid.kind
    failed = {c["client"]: c["failed"] for c in report["clients"]}
    if failed.get(TARGET) is None:
        return "accepted_invalid", grid.kind
    others = [c for c in CLIENTS if c != TARGET and failed.get(c)]
    if others:
        return f"crashed: honest clients {others} were dropped", grid.kind
    return "rejected", grid.kind


def fuzz_server(n: int, seed: int, progress: bool = True) -> dict:
    flower_identity()
    rng = random.Random(seed)
    results = []
    logging.getLogger("fededit").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(op, i) for op in SERVER_STEPS for i in range(n)]
        for op, i in tqdm(cases, desc="server fuzz", disable=not progress):
            root = Path(tmp) / f"{op}-{i}"
            outcome, kind = server_case(op, random.Random(rng.randrange(2**63)), root)
            results.append((outcome, op, kind))
    return tally(results)
