"""Malformed input from another party never escapes as an exception and is never taken as valid.

Runs ``bench.fuzz`` at its full size: 1,000 malformed replies per step type on the real server
path, 1,000 malformed instructions on the real client path (tiny model), 1,000 malformed request
files (plus a named pipe, a folder and a file over the size cap) through the loaders.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from bench.fuzz.client import fuzz_client
from bench.fuzz.harness import CLIENTS, LIMITS, SERVER_STEPS, SLOTS, flower_identity
from bench.fuzz.loaders import fuzz_loaders
from bench.fuzz.mutations import npy_with_header
from bench.fuzz.server import FuzzGrid, fuzz_server
from tests.federation_kit import isolated_tiny_world
from wire.messages import Limits, MessageError, pack, unpack

N = 1000


@pytest.fixture(scope="module")
def tiny_federation(tmp_path_factory):
    with isolated_tiny_world(tmp_path_factory, "fuzz") as world:
        yield world


def _clean(tally: dict) -> None:
    assert tally["crashed"] == 0, tally["failures"]
    assert tally["accepted_invalid"] == 0, tally["failures"]
    assert tally["rejected"] == tally["cases"]


def test_the_server_rejects_every_malformed_reply_and_the_run_goes_on():
    tally = fuzz_server(N, seed=0, progress=False)
    assert tally["cases"] == N * len(SERVER_STEPS)
    assert set(tally["by_step"].values()) == {N}
    _clean(tally)


def test_honest_clients_finish_the_fuzz_run_unharmed(tmp_path):
    """The harness itself: without a mutation every client completes (so a rejection is the fuzz's doing)."""
    flower_identity()

    class Honest(FuzzGrid):
        def send_and_receive(self, messages, timeout=None):
            self.op = "none"
            return super().send_and_receive(messages, timeout)

    from server_app.app import FlowerTransport, discover
    from strategies.federation import run_federation
    from strategies.settings import RunSettings

    for strategy in ("fededit", "editavg", "collabedit", "local"):
        grid = Honest("none", random.Random(0))
        settings = RunSettings(
            run=f"honest-{strategy}", strategy=strategy, num_slots=SLOTS, centralised=False, output_dir=str(tmp_path)
        )
        names = discover(grid, 2, 0, None)
        report = run_federation(
            FlowerTransport(grid, names, None, limits=LIMITS), list(names), settings, {}, progress=False
        )
        assert [c["failed"] for c in report["clients"]] == [None] * len(CLIENTS), strategy


def test_the_client_rejects_every_malformed_instruction(tiny_federation):
    tally = fuzz_client(N, seed=0, model=tiny_federation["model"], progress=False)
    assert tally["cases"] >= N
    _clean(tally)


def test_the_loaders_reject_every_malformed_file_without_hanging():
    tally = fuzz_loaders(N, seed=0, progress=False)
    assert tally["cases"] == N + 3
    _clean(tally)


def test_an_npy_header_is_checked_before_anything_is_allocated():
    """A 128-byte header declaring 10^15 float32s is refused from its header, at once."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    data = npy_with_header("<f4", (10**15,), b"\0" * 16)
    content = RecordDict(
        {
            "step": ConfigRecord({"json": "{}"}),
            "arrays": ArrayRecord({"z": Array(dtype="float32", shape=(10**15,), stype="numpy.ndarray", data=data)}),
        }
    )
    with pytest.raises(MessageError, match="npy shape|declares"):
        unpack(content, Limits(max_message_bytes=1 << 20))


def test_a_well_formed_step_round_trips_through_the_bounded_decoder():
    arrays = {"z": np.arange(6, dtype=np.float32).reshape(2, 3), "layers": np.asarray([4, 5], np.int64)}
    body, out = unpack(pack({"op": "edit", "ids": ["a/0/0"]}, arrays), Limits(max_message_bytes=1 << 20))
    assert body == {"op": "edit", "ids": ["a/0/0"]}
    assert set(out) == {"z", "layers"} and all(np.array_equal(out[k], arrays[k]) for k in arrays)
    assert out["z"].flags.writeable
