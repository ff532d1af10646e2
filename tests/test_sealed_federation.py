"""FedEdit with sealed MKVs (fedleke/sealing.py) end to end on the tiny world: what the server holds
and forwards carries no vector of any upload; a blob the server tampers with, re-labels or replays
is refused by its receiver with nothing applied; a client uploads plaintext only when allowed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fededit_core.client.worker import WorkerError
from strategies.federation import run_federation
from strategies.session import FederationError, Instruction
from strategies.settings import RunSettings
from strategies.store import MKVStore
from tests.federation_kit import DirectTransport, client_specs, isolated_tiny_world, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with isolated_tiny_world(tmp_path_factory, "sealed") as world:
        records = [json.loads(line) for line in Path(world["data"]).read_text().splitlines()]
        three = [{**r, "client": f"client-{i % 3}"} for i, r in enumerate(records)]
        yield {**world, "three": str(write_jsonl(world["root"] / "three.jsonl", three))}


def settings(tmp_path: Path, run: str, **extra) -> RunSettings:
    return RunSettings(
        run=run, num_slots=2, alpha=0.0, centralised=False, store_path=tmp_path / "store.sqlite", **extra
    )


def uploaded_rows(transport, specs) -> list[torch.Tensor]:
    """Every vector the clients uploaded (z, delta and the key of every layer), one per row."""
    rows = []
    for spec in specs.values():
        own = transport.worker.participant(spec).own
        rows += [own.z, own.delta] + [own.keys[:, j] for j in range(own.keys.shape[1])]
    return rows


def uploaded_vectors(rows: list[torch.Tensor]) -> np.ndarray:
    """The uploaded vectors zero-padded to one length, unit norm."""
    d = max(r.shape[1] for r in rows)
    padded = torch.cat([torch.nn.functional.pad(r, (0, d - r.shape[1])) for r in rows]).double().numpy()
    return padded / np.linalg.norm(padded, axis=1, keepdims=True)


def as_float_rows(array: np.ndarray, d: int) -> np.ndarray:
    """A float array as rows of length ``d`` to compare with the uploads: by its last axis, padded."""
    if array.dtype.kind != "f" or array.size == 0:
        return np.zeros((0, d))
    rows = array.reshape(-1, array.shape[-1]).astype(np.float64)
    return np.pad(rows, ((0, 0), (0, max(0, d - rows.shape[1]))))[:, :d]


def byte_rows(blob: np.ndarray, d: int) -> np.ndarray:
    """A byte blob read as float32 rows of length ``d`` at every offset (what a curious server would
    try). Random bytes read so have one huge entry per row, so their cosine to a vector is its largest
    coordinate by chance: only a near-exact match (a vector written in the clear) means anything."""
    out = []
    for offset in range(4):
        raw = blob[offset:]
        with np.errstate(invalid="ignore"):  # random bytes hold NaN patterns
            values = np.frombuffer(raw[: len(raw) // 4 * 4].tobytes(), dtype="<f4").astype(np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        out.append(values[: len(values) // d * d].reshape(-1, d))
    return np.concatenate(out)


def max_cosine(arrays: list[np.ndarray], uploads: np.ndarray, bytes_too: bool = False) -> float:
    """The largest |cosine| of a row of ``arrays`` to an upload: float arrays, or (``bytes_too``)
    the byte blobs read as float32."""
    best = 0.0
    for array in arrays:
        if (array.dtype == np.uint8) != bytes_too:
            continue
        rows = byte_rows(array, uploads.shape[1]) if bytes_too else as_float_rows(array, uploads.shape[1])
        norms = np.linalg.norm(rows, axis=1)
        rows = rows[norms > 0] / norms[norms > 0, None]
        if len(rows):
            best = max(best, float(np.abs(rows @ uploads.T).max()))
    return best


def written_in_clear(arrays: list[np.ndarray], uploads_fp32: list[bytes]) -> bool:
    """Whether the float32 bytes of any uploaded vector occur in a byte blob."""
    blobs = [a.tobytes() for a in arrays if a.dtype == np.uint8]
    return any(v in blob for v in uploads_fp32 for blob in blobs)


def everything_seen(transport, store_path: Path) -> list[np.ndarray]:
    """Every array the server stored and every array of every message it sent or received."""
    store = MKVStore(store_path)
    stored = [a for u in store.uploads("r") for a in u.arrays.values()]
    store.close()
    sent = [a for _, ins, reply in transport.log for a in (*ins.arrays.values(), *reply.arrays.values())]
    return stored + sent


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "plaintext"])
def test_a_sealed_run_shows_the_server_no_vector_of_any_upload(world, tmp_path, seal):
    specs = client_specs(world, tmp_path, "r")
    transport = DirectTransport(specs)
    report = run_federation(transport, list(specs), settings(tmp_path, "r", seal_mkvs=seal), {}, progress=False)
    assert [c["applied"] for c in report["clients"]] == [4, 4]  # alpha 0: every set re-edited either way
    seen, rows = everything_seen(transport, tmp_path / "store.sqlite"), uploaded_rows(transport, specs)
    uploads = uploaded_vectors(rows)
    closest, closest_in_bytes = max_cosine(seen, uploads), max_cosine(seen, uploads, bytes_too=True)
    in_clear = written_in_clear(seen, [v.float().numpy().astype("<f4").tobytes() for r in rows for v in r])
    if seal:
        assert closest < 0.5 and closest_in_bytes < 0.99 and not in_clear
    else:  # the same checks find the plaintext uploads, also when given as bytes (the checks can fail)
        as_bytes = [np.frombuffer(a.astype("<f4").tobytes(), np.uint8) for a in seen if a.dtype.kind == "f"]
        assert closest > 0.999 and max_cosine(as_bytes, uploads, bytes_too=True) > 0.999
        assert written_in_clear(as_bytes, [v.float().numpy().astype("<f4").tobytes() for r in rows for v in r])


class Meddling(DirectTransport):
    """Changes the re-edit instruction of ``victim`` in slot 1 with ``meddle(instruction)``; keeps the
    victim's layers just before it."""

    def __init__(self, specs, meddle, victim="client-0"):
        super().__init__(specs)
        self.meddle, self.victim, self.before = meddle, victim, None
        self.slot0: dict[str, tuple[int, np.ndarray]] = {}  # (count, sealed blob) of slot 0 by sender

    def __call__(self, instructions):
        for client, ins in list(instructions.items()):
            victim = self.worker.participant(self.specs[client])
            if ins.op == "reedit" and client == self.victim and victim.next_slot == 2:
                self.before = {layer: w.clone() for layer, w in victim.layers.items()}
                instructions[client] = self.meddle(ins, self)
        replies = super().__call__(instructions)
        for client, reply in replies.items():
            ins = instructions[client]
            if ins.op == "edit" and ins.args["slot"] == 0 and "sealed" in reply.arrays:
                self.slot0[client] = (len(reply.body["ids"]), reply.arrays["sealed"])
        return replies


def tampered(ins: Instruction, transport) -> Instruction:
    blob = ins.arrays["sealed.0"].copy()
    blob[len(blob) // 2] ^= 1
    return Instruction(ins.op, ins.args, {**ins.arrays, "sealed.0": blob})


def swapped(ins: Instruction, transport) -> Instruction:
    sources = ins.args["sources"]
    a, b = sources[0]["sender"], sources[1]["sender"]
    relabelled = [{**sources[0], "sender": b}, {**sources[1], "sender": a}]
    return Instruction(ins.op, {**ins.args, "sources": relabelled}, ins.arrays)


def replayed_as_new(ins: Instruction, transport) -> Instruction:
    """client-1's blob of slot 0, labelled as its set of slot 1."""
    assert ins.args["sources"][0]["sender"] == "client-1"
    n, blob = transport.slot0["client-1"]
    sources = [{**ins.args["sources"][0], "n": n}, *ins.args["sources"][1:]]
    return Instruction(ins.op, {**ins.args, "sources": sources}, {**ins.arrays, "sealed.0": blob})


def replayed_as_old(ins: Instruction, transport) -> Instruction:
    """client-1's blob of slot 0 served again as what it is."""
    n, blob = transport.slot0["client-1"]
    sources = [{"sender": "client-1", "slot": 0, "n": n}, *ins.args["sources"][1:]]
    return Instruction(ins.op, {**ins.args, "sources": sources}, {**ins.arrays, "sealed.0": blob})


@pytest.mark.parametrize(
    "meddle, why",
    [
        (tampered, "does not open"),
        (swapped, "does not open"),
        (replayed_as_new, "does not open"),
        (replayed_as_old, "a replay"),
    ],
    ids=["tampered", "swapped", "replayed-as-new", "replayed-as-old"],
)
def test_a_blob_the_server_meddles_with_is_refused_and_nothing_of_it_is_applied(world, tmp_path, meddle, why):
    specs = client_specs(world, tmp_path, "r", n_clients=3, data=world["three"])
    transport = Meddling(specs, meddle)  # no gate: every set that opens is applied
    report = run_federation(
        transport, list(specs), settings(tmp_path, "r", strategy="fededit-noreedit"), {}, progress=False
    )
    assert [c["failed"] for c in report["clients"]] == [None] * 3  # the run goes on
    victim = transport.worker.participant(specs["client-0"])
    meddled = {"client-1", "client-2"} if meddle is swapped else {"client-1"}
    for sender in meddled:
        assert why in victim.suspects[sender]
        assert not any(i.startswith(f"{sender}/1/") for i in victim.reedited_ids)
    assert set(report["server"]["refused_senders"]) == meddled
    if meddle is swapped:  # both sets refused: the slot's re-edit changed nothing
        for layer, weight in transport.before.items():
            assert torch.equal(victim.layers[layer], weight)
    else:  # the untouched set of client-2 still applies
        assert any(i.startswith("client-2/1/") for i in victim.reedited_ids)


def test_a_client_uploads_plaintext_only_when_its_node_allows_it(world, tmp_path):
    specs = client_specs(world, tmp_path, "r", allow_plaintext_mkvs=False)
    with pytest.raises(FederationError, match="fewer than the minimum"):
        run_federation(
            DirectTransport(specs), list(specs), settings(tmp_path, "r", seal_mkvs=False), {}, progress=False
        )
    worker = DirectTransport(specs).worker
    with pytest.raises(WorkerError, match="uploads them sealed only"):
        worker.handle("edit", specs["client-0"], {"slot": 0, "reuse_tags": []}, {})
    assert worker.participant(specs["client-0"]).next_slot == 0  # refused before anything was edited


def test_sealing_needs_the_federation_secret(world, tmp_path):
    specs = client_specs(world, tmp_path, "r", secret_file=None)
    with pytest.raises(FederationError, match="no client holds a federation secret"):
        run_federation(DirectTransport(specs), list(specs), settings(tmp_path, "r"), {}, progress=False)


@pytest.mark.parametrize("fault", ["length", "replay"])
def test_the_server_refuses_a_blob_of_another_length_and_a_replayed_blob(world, tmp_path, fault):
    specs = client_specs(world, tmp_path, "r")  # 2 clients, 2 requests per slot each
    inner = DirectTransport(specs)
    first: dict[str, np.ndarray] = {}

    def transport(instructions):
        replies = inner(instructions)
        for client, reply in replies.items():
            if instructions[client].op != "edit" or "sealed" not in reply.arrays:
                continue
            slot, blob = instructions[client].args["slot"], reply.arrays["sealed"]
            if client == "client-0" and slot == 0:
                first["client-0"] = blob
            if client == "client-1" and slot == (0 if fault == "length" else 1):
                # a truncated blob, or client-0's blob of slot 0 as client-1's of slot 1
                bad = blob[:-1] if fault == "length" else first["client-0"]
                replies[client] = type(reply)(client, reply.body, {"sealed": bad})
        return replies

    report = run_federation(transport, list(specs), settings(tmp_path, "r", min_clients=1), {}, progress=False)
    failed = {c["client"]: c["failed"] for c in report["clients"]}
    assert failed["client-0"] is None
    expected = "bytes, this one" if fault == "length" else "its sealed set was already uploaded (a replayed set)"
    assert expected in failed["client-1"]
    store = MKVStore(tmp_path / "store.sqlite")
    assert {(u.client, u.slot) for u in store.uploads("r")} == (
        {("client-0", 0), ("client-0", 1)} if fault == "length" else {("client-0", 0), ("client-0", 1), ("client-1", 0)}
    )
    store.close()


class EchoWorker:
    _editors: dict = {}  # what the health check counts

    def handle(self, op, spec, args, arrays):
        return {"spec": spec.model_dump(mode="json")}, dict(arrays)


def test_a_sealed_blob_and_the_nodes_sealing_settings_cross_the_workers_grpc(tmp_path):
    from client_app.worker_service import RemoteWorker, serve
    from fededit_core.client.worker import ClientSpec

    socket = f"unix:{tmp_path / 'w.sock'}"
    server = serve(socket, EchoWorker())
    try:
        remote = RemoteWorker(socket, timeout=10)
        spec = ClientSpec(
            run="r",
            name="hospital-a",
            requests="builtin",
            state_dir=str(tmp_path),
            retired_secret_files=["/keys/old"],
            allow_plaintext_mkvs=True,
        )
        blob = np.frombuffer(b"FEs1" + bytes(range(256)), dtype=np.uint8)
        body, arrays = remote.handle("reedit", spec, {}, {"sealed.0": blob})
        np.testing.assert_array_equal(arrays["sealed.0"], blob)
        assert arrays["sealed.0"].dtype == np.uint8
        assert body["spec"]["retired_secret_files"] == ["/keys/old"] and body["spec"]["allow_plaintext_mkvs"]
        remote.close()
    finally:
        server.stop(0)
