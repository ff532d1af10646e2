"""Malformed input through the federation's three doors: the server's, the client's, the loaders'.

``python -m bench.fuzz --n 1000 --json OUT`` generates, with a fixed seed:

- **server**: ``n`` malformed replies per step type (whoami, hello, tags, edit, reedit, rejected,
  evaluate, editavg_update, editavg_apply, collab), each fed to one client's first reply to that
  step in a whole run on the real server path (``discover`` -> ``FlowerTransport`` with the wire
  decoder -> the strategy -> validation -> the SQLite store -> serving), among 4 scripted honest
  clients without a model (min-clients 2);
- **client**: ``n`` malformed instructions through the real ClientApp handler (wire decoder ->
  instruction schema -> the edit worker), on the model ``--model`` (default: the embedded one);
- **loaders**: ``n`` malformed request files (plus a named pipe, a folder and a file over the size
  cap) through ``load_requests``.

Each case ends one of three ways: ``rejected`` (the server left the client out and the run went on /
the client answered with its own step error / the loader raised ``DataError``), ``accepted_invalid``
(the input was taken as valid) or ``crashed`` (any other exception, or a loader that did not
return within 10 s). The goal is zero crashes and zero accepted-invalid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity
from tqdm import tqdm

from fededit_core.io import atomic_write
from wire.messages import Limits, pack, unpack

SERVER_STEPS = (
    "whoami",
    "hello",
    "tags",
    "edit",
    "reedit",
    "rejected",
    "evaluate",
    "editavg_update",
    "editavg_apply",
    "collab",
)
STRATEGY_OF = {"editavg_update": "editavg", "editavg_apply": "editavg", "collab": "collabedit"}
CLIENTS = ("c-0", "c-1", "c-2", "c-3")
TARGET = "c-0"
D_MODEL, D_FF, LAYERS, SLOTS, PER_SLOT = 8, 16, (1, 2), 2, 2
FINGERPRINT = "fuzz-model-fingerprint"
LIMITS = Limits(max_message_bytes=1 << 20)
WRONG_VALUES = ("x", True, 1.5, -1, 10**18, [], {}, None, [[1]], {"a": {"b": 1}}, "\ud800", "a" * 3000)


def _identity() -> None:
    """Flower Messages need a task identity, which a ServerApp / ClientApp process would have."""
    for attr in ("_run_id", "_node_id", "_task_id"):
        if getattr(TaskIdentity, attr) is None:
            setattr(TaskIdentity, attr, 1)


# --------------------------------------------------------------------------- honest clients


def _tag(client: str, slot: int, i: int) -> str:
    return hashlib.sha256(f"{client}/{slot}/{i}".encode()).hexdigest()


def _psd(rng: np.random.Generator, n: int) -> np.ndarray:
    k = rng.standard_normal((n, PER_SLOT)).astype(np.float32)
    return k @ k.T


def honest_reply(client: str, step: dict, arrays: dict, rng: np.random.Generator) -> tuple[dict, dict]:
    """What a correct client without a model answers to ``step``."""
    op = step["op"]
    report = {"slot": step.get("slot", 0), "edited": PER_SLOT, "seconds": {"edit": 0.1}}
    if op == "whoami":
        return {"client": client}, {}
    if op == "hello":
        return {
            "client": client,
            "fingerprint": FINGERPRINT,
            "templates": "t" * 16,
            "covariance": {"source": "self", "n_samples": 4, "model": FINGERPRINT},
            "hparams": {"layers": list(LAYERS), "mom2_weight": 100.0, "autocast": None},
            "d_model": D_MODEL,
            "d_ff": D_FF,
            "layers": list(LAYERS),
            "n_requests": SLOTS * PER_SLOT,
            "slot_sizes": [PER_SLOT] * SLOTS,
            "next_slot": 0,
            "kind": "counterfact",
            "reuse": True,
        }, {}
    if op == "tags":
        return {"tags": [_tag(client, step["slot"], i) for i in range(PER_SLOT)]}, {}
    if op == "edit":
        if not step.get("upload", True):
            return {"report": report}, {}
        n, slot = PER_SLOT, step["slot"]
        return {
            "ids": [f"{client}/{slot}/{i}" for i in range(n)],
            "tags": [_tag(client, slot, i) for i in range(n)],
            "report": report,
            "fingerprint": FINGERPRINT,
        }, {
            "z": rng.standard_normal((n, D_MODEL)).astype(np.float32),
            "delta": rng.standard_normal((n, D_MODEL)).astype(np.float32),
            "keys": rng.standard_normal((n, len(LAYERS), D_FF)).astype(np.float32),
            "layers": np.asarray(LAYERS, dtype=np.int64),
        }
    if op == "reedit":
        return {"report": report}, {}
    if op == "editavg_update":
        return {"n": PER_SLOT, "report": report, "fingerprint": FINGERPRINT}, {
            f"delta.{l}": rng.standard_normal((D_MODEL, D_FF)).astype(np.float32) for l in LAYERS
        }
    if op == "editavg_apply":
        return {}, {}
    if op == "collab":
        body: dict = {}
        if step.get("apply") is not None:
            body["report"] = report
        if step.get("stats") is None:
            return body, {}
        body.update(n=PER_SLOT, fingerprint=FINGERPRINT)
        return body, {
            "rk": rng.standard_normal((D_MODEL, D_FF)).astype(np.float32),
            "kk": _psd(rng, D_FF),
        }
    if op == "rejected":
        return {"acknowledged": True}, {}
    if op == "evaluate":
        metrics = {"n": PER_SLOT, "es": 1.0, "ps": 0.5, "ns": 0.75, "score": 0.7}
        return {
            "client": client,
            "kind": "counterfact",
            "n_own": SLOTS * PER_SLOT,
            "n_others": 0,
            "own": metrics,
            "others": None,
            "own_before": metrics,
            "others_before": None,
            "reports": [report],
        }, {}
    raise ValueError(f"no honest reply to {op!r}")


# --------------------------------------------------------------------------- mutations


def _npy(array: np.ndarray) -> bytes:
    return Array(np.ascontiguousarray(array)).data


def _npy_with_header(descr: str, shape: tuple, payload: bytes) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload


def _content(json_value, arrays: dict | None = None, extra: dict | None = None) -> RecordDict:
    records: dict = {"step": ConfigRecord({"json": json_value})}
    if arrays is not None:
        records["arrays"] = ArrayRecord(arrays) if isinstance(arrays, dict) else arrays
    records.update(extra or {})
    return RecordDict(records)


def _flower_arrays(arrays: dict) -> dict:
    return {name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()}


def wire_mutation(body: dict, arrays: dict, rng: random.Random):
    """A message whose encoding is wrong, whatever the step."""
    text = json.dumps(body)
    flower = _flower_arrays(arrays)
    kind = rng.choice(
        [
            "not_recorddict",
            "no_step",
            "step_wrong_type",
            "extra_record",
            "json_not_str",
            "json_extra_key",
            "invalid_json",
            "deep_json",
            "huge_int",
            "nan",
            "lone_surrogate",
            "not_object",
            "oversized_json",
            "arrays_wrong_type",
            "npy_garbage",
            "npy_huge",
            "npy_bad_dtype",
            "npy_bad_stype",
            "npy_truncated",
            "array_bad_name",
            "too_many_arrays",
            "oversized_arrays",
        ]
    )
    name = rng.choice(sorted(arrays)) if arrays else "z"
    if kind == "not_recorddict":
        return kind, rng.choice(["junk", None, 5, {"step": text}, ArrayRecord({})])
    if kind == "no_step":
        return kind, RecordDict({"arrays": ArrayRecord(flower)})
    if kind == "step_wrong_type":
        return kind, RecordDict({"step": ArrayRecord({}), "arrays": ArrayRecord(flower)})
    if kind == "extra_record":
        return kind, _content(text, flower, {"other": ConfigRecord({"x": 1})})
    if kind == "json_not_str":
        return kind, _content(rng.choice([text.encode(), 5, [text], 1.5, True]), flower)
    if kind == "json_extra_key":
        return kind, RecordDict({"step": ConfigRecord({"json": text, "op": "x"}), "arrays": ArrayRecord(flower)})
    if kind == "invalid_json":
        cut = rng.randrange(0, max(1, len(text) - 1))
        return kind, _content(rng.choice([text[:cut], text + "}", "{'a': 1}", "", "{" + text]), flower)
    if kind == "deep_json":
        depth = rng.choice([12, 200, 5000, 100_000])
        return kind, _content('{"a": ' * depth + "1" + "}" * depth, flower)
    if kind == "huge_int":
        digits = rng.choice([20, 400, 5000])
        return kind, _content(text[:-1] + (", " if body else "") + f'"big": {"9" * digits}' + "}", flower)
    if kind == "nan":
        return kind, _content(
            text[:-1] + (", " if body else "") + f'"v": {rng.choice(["NaN", "Infinity", "-Infinity"])}}}'
        )
    if kind == "lone_surrogate":
        key = rng.choice(sorted(body)) if body else "client"
        return kind, _content(json.dumps({**body, key: "\ud800x"}), flower)
    if kind == "not_object":
        return kind, _content(json.dumps(rng.choice([[body], 5, "text", None, [1, 2]])), flower)
    if kind == "oversized_json":
        return kind, _content(json.dumps({**body, "pad": "x" * (LIMITS.max_json_bytes + 1)}), flower)
    if kind == "arrays_wrong_type":
        return kind, _content(text, None, {"arrays": ConfigRecord({"z": 1})})
    if kind == "npy_garbage":
        flower[name] = Array(
            dtype="float32", shape=(2,), stype="numpy.ndarray", data=rng.randbytes(rng.randrange(0, 64))
        )
        return kind, _content(text, flower)
    if kind == "npy_huge":
        payload = b"\x00" * 64
        flower[name] = Array(
            dtype="float32",
            shape=(10**15,),
            stype="numpy.ndarray",
            data=_npy_with_header("<f4", rng.choice([(10**15,), (10**6, 10**6), (2**40 - 1, 2)]), payload),
        )
        return kind, _content(text, flower)
    if kind == "npy_bad_dtype":
        descr = rng.choice(["|O", "<c8", ">f4", "<U4", "|b1", "<i4", "|V8"])
        item = np.dtype(descr).itemsize if descr != "|O" else 8
        flower[name] = Array(
            dtype="x", shape=(2,), stype="numpy.ndarray", data=_npy_with_header(descr, (2,), b"\x00" * 2 * item)
        )
        return kind, _content(text, flower)
    if kind == "npy_bad_stype":
        data = _npy(arrays[name]) if arrays else _npy(np.zeros(2, np.float32))
        flower[name] = Array(dtype="float32", shape=(2,), stype=rng.choice(["torch.Tensor", "pickle", ""]), data=data)
        return kind, _content(text, flower)
    if kind == "npy_truncated":
        data = _npy(arrays[name]) if arrays else _npy(np.zeros(4, np.float32))
        flower[name] = Array(
            dtype="float32", shape=(2,), stype="numpy.ndarray", data=data[: rng.randrange(0, len(data))]
        )
        return kind, _content(text, flower)
    if kind == "array_bad_name":
        flower[rng.choice(["", "../z", "a" * 65, "z\n", "é"])] = Array(np.zeros(2, np.float32))
        return kind, _content(text, flower)
    if kind == "too_many_arrays":
        for i in range(LIMITS.max_arrays + 1):
            flower[f"extra{i}"] = Array(np.zeros(1, np.float32))
        return kind, _content(text, flower)
    flower[name] = Array(np.zeros(LIMITS.max_message_bytes // 4 + 16, np.float32))  # oversized_arrays
    return kind, _content(text, flower)


def _replace_in(value, rng: random.Random):
    """``value`` with one leaf or element replaced by a value of the wrong type or form."""
    if isinstance(value, dict) and value and rng.random() < 0.6:
        key = rng.choice(sorted(value))
        return {**value, key: _replace_in(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.6:
        i = rng.randrange(len(value))
        return value[:i] + [_replace_in(value[i], rng)] + value[i + 1 :]
    wrong = [w for w in WRONG_VALUES if type(w) is not type(value) or w == "a" * 3000]
    return rng.choice(wrong)


def field_mutation(op: str, client: str, body: dict, arrays: dict, rng: random.Random):
    """A well-encoded reply whose fields are wrong for ``op`` (missing, extra, wrong type or range,
    another client's ids, an empty error, ...). Returns (kind, body, arrays), invalid by construction."""
    specific = SPECIFIC.get(op, [])
    kinds = ["missing", "extra", "error_form"] + (["wrong_type"] if body else []) + ["specific"] * len(specific)
    kind = rng.choice(kinds)
    if kind == "missing" and body:
        key = rng.choice(sorted(body))
        return f"missing:{key}", {k: v for k, v in body.items() if k != key}, arrays
    if kind in ("missing", "extra"):
        return "extra", {**body, rng.choice(["unexpected", "op", "x"]): rng.choice([1, "x", None])}, arrays
    if kind == "error_form":
        return "error_form", {"error": rng.choice(["", 5, None, ["x"], {"e": 1}, "e" * 2001])}, {}
    if kind == "wrong_type":
        key = rng.choice(sorted(body))
        mutated = {**body, key: _replace_in(body[key], rng)}
        if _still_valid(op, mutated, arrays):
            mutated[key] = rng.choice(["a" * 3000, [[1]], {"a": {"b": {"c": 1}}}])
        return f"wrong_type:{key}", mutated, arrays
    name, mutate = rng.choice(specific)
    new_body, new_arrays = mutate(client, dict(body), dict(arrays), rng)
    return name, new_body, new_arrays


def _still_valid(op: str, body: dict, arrays: dict) -> bool:
    from strategies.replies import ReplyError, parse_reply

    try:
        parse_reply(op, body, arrays)
    except ReplyError:
        return False
    return True


def _arr(rng, *shape, dtype=np.float32):
    return np.random.default_rng(rng.randrange(2**32)).standard_normal(shape).astype(dtype)


def _bad_array(name: str, array: np.ndarray, rng: random.Random) -> np.ndarray:
    choice = rng.choice(["shape", "nan", "inf", "overflow32", "int", "rank"])
    if choice == "shape":
        return np.zeros(tuple(s + rng.choice([1, 2]) for s in array.shape) or (3,), np.float32)
    if choice == "rank":
        return np.zeros(array.shape + (1,), np.float32)
    if choice == "int":
        return np.zeros(array.shape, np.int64) if name != "layers" else np.asarray(LAYERS, np.float64)
    out = array.astype(np.float64 if choice == "overflow32" else np.float32)
    if out.size == 0:
        return np.zeros((3,), np.float32)
    out.flat[rng.randrange(out.size)] = {"nan": np.nan, "inf": np.inf, "overflow32": 1e39}[choice]
    return out


def _mutate_array(client, body, arrays, rng):
    name = rng.choice(sorted(arrays))
    arrays[name] = _bad_array(name, arrays[name], rng)
    return body, arrays


def _drop_array(client, body, arrays, rng):
    arrays.pop(rng.choice(sorted(arrays)))
    return body, arrays


def _extra_array(client, body, arrays, rng):
    arrays[rng.choice(["extra", "delta.99", "z2"])] = np.zeros((2, 2), np.float32)
    return body, arrays


def _ids(client, body, arrays, rng):
    n = len(body["ids"])
    slot = int(body["ids"][0].split("/")[1])
    body["ids"] = rng.choice(
        [
            [f"c-1/{slot}/{i}" for i in range(n)],  # another client's
            [f"{client}/{slot + 1}/{i}" for i in range(n)],  # another slot's
            [f"{client}/{slot}/0"] * n,
            [f"{client}/{slot}/{i}" for i in range(n)][::-1],
            [f"{client}/{slot}/{i}\n" for i in range(n)],
            [f"{client}/{slot}/{i}" for i in range(n + 1)],
            [],
        ]
    )
    return body, arrays


def _tags(client, body, arrays, rng):
    tags = list(body["tags"])
    i = rng.randrange(len(tags))
    if rng.random() < 0.3:  # one tag per request of the slot, no more, no fewer
        body["tags"] = tags[:-1] if rng.random() < 0.5 else tags + [tags[0]]
        return body, arrays
    tags[i] = rng.choice([tags[i].upper(), tags[i] + "\n", tags[i][:-1], "g" * 64, " " + tags[i][1:], 5, None])
    if tags[i] is None and "ids" not in body:
        tags[i] = "x"  # a missing tag (None) is valid in a tags reply
    body["tags"] = tags
    return body, arrays


def _fingerprint(client, body, arrays, rng):
    body["fingerprint"] = rng.choice(["another-model", "", FINGERPRINT + "x"])
    return body, arrays


def _layers(client, body, arrays, rng):
    arrays["layers"] = rng.choice(
        [
            np.asarray([1.0, 2.0]),
            np.asarray([[1, 2]], np.int64),
            np.asarray([2, 1], np.int64),
            np.asarray([1], np.int64),
            np.asarray([1.5, 2.0]),
            np.asarray([np.nan, 2.0]),
        ]
    )
    return body, arrays


def _count(client, body, arrays, rng):
    body["n"] = rng.choice([True, False, -1, 10**12, PER_SLOT + 1, 1.0, "2"])
    return body, arrays


def _kk(client, body, arrays, rng):
    kk = arrays["kk"].copy()
    if rng.random() < 0.5:
        kk -= (np.abs(kk).max() + 1.0) * np.eye(len(kk), dtype=np.float32)  # negative definite
    else:
        kk[0, 1] += np.abs(kk).max() + 1.0  # asymmetric
    arrays["kk"] = kk
    return body, arrays


def _max_abs(client, body, arrays, rng):
    body["max_abs"] = rng.choice([-1.0, "x", True, 10**30])
    return body, arrays


def _hello(client, body, arrays, rng):
    key, value = rng.choice(
        [
            ("d_model", 0),
            ("d_model", -4),
            ("d_model", 10**9),
            ("d_ff", 1.5),
            ("layers", ["a"]),
            ("layers", [1.5, 2]),
            ("layers", []),
            ("slot_sizes", [PER_SLOT, PER_SLOT + 1]),
            ("slot_sizes", [-1, PER_SLOT]),
            ("n_requests", 10**9),
            ("kind", "images"),
            ("reuse", "yes"),
            ("next_slot", -1),
            ("client", "../victim"),
            ("fingerprint", 5),
            ("templates", ["x"]),
            ("hparams", {"a": {"b": {"c": 1}}}),
        ]
    )
    body[key] = value
    return body, arrays


def _name(client, body, arrays, rng):
    body["client"] = rng.choice(["../victim", "", ".hidden", "a/b", "c-1", "x" * 101, "c 0", 5])
    return body, arrays


def _evaluate(client, body, arrays, rng):
    key, value = rng.choice(
        [
            ("n_own", -1),
            ("kind", "x"),
            ("own", "x"),
            ("own", {"es": float("inf")}),
            ("reports", "x"),
            ("reports", [[1]]),
            ("client", "../x"),
            ("n_others", 10**9),
        ]
    )
    body[key] = value
    return body, arrays


def _report(client, body, arrays, rng):
    body["report"] = rng.choice(
        ["x", [1], {"a": [[1]]}, {"k" * 65: 1}, {"a": "x" * 300}, {str(i): i for i in range(65)}]
    )
    return body, arrays


def _ack(client, body, arrays, rng):
    body["acknowledged"] = rng.choice([False, "yes", 1, None])
    return body, arrays


def _unexpected_arrays(client, body, arrays, rng):
    arrays["z"] = np.zeros((2, 2), np.float32)
    return body, arrays


SPECIFIC = {
    "whoami": [("name", _name)],
    "hello": [("hello_field", _hello), ("unexpected_arrays", _unexpected_arrays)],
    "tags": [("tag_form", _tags), ("unexpected_arrays", _unexpected_arrays)],
    "edit": [
        ("bad_array", _mutate_array),
        ("missing_array", _drop_array),
        ("extra_array", _extra_array),
        ("ids", _ids),
        ("tags", _tags),
        ("fingerprint", _fingerprint),
        ("layers", _layers),
        ("report", _report),
    ],
    "reedit": [("report", _report), ("unexpected_arrays", _unexpected_arrays)],
    "rejected": [("ack", _ack)],
    "evaluate": [("evaluate_field", _evaluate)],
    "editavg_update": [
        ("bad_array", _mutate_array),
        ("missing_array", _drop_array),
        ("extra_array", _extra_array),
        ("count", _count),
        ("fingerprint", _fingerprint),
    ],
    "editavg_apply": [("unexpected_arrays", _unexpected_arrays)],
    "collab": [
        ("bad_array", _mutate_array),
        ("missing_array", _drop_array),
        ("kk_not_psd", _kk),
        ("fingerprint", _fingerprint),
        ("max_abs", _max_abs),
    ],
}


def malformed_content(op: str, client: str, body: dict, arrays: dict, rng: random.Random):
    """(kind, content): a malformed reply to ``op``, at the wire (40%) or in its fields (60%)."""
    if rng.random() < 0.4:
        return wire_mutation(body, arrays, rng)
    kind, body, arrays = field_mutation(op, client, body, arrays, rng)
    return kind, pack(body, arrays)


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


# --------------------------------------------------------------------------- the client's door

CLIENT_STEPS = ("hello", "tags", "edit", "reedit", "editavg_update", "editavg_apply", "collab", "evaluate", "rejected")


def _instruction(op: str) -> tuple[dict, dict]:
    """A valid instruction of each step for a client of a 576-d model (shapes come from the model)."""
    return {
        "hello": ({}, {}),
        "tags": ({"slot": 0}, {}),
        "edit": ({"slot": 0, "reuse_tags": []}, {}),
        "reedit": ({"alpha": 0.5, "gate": True, "vector": "delta", "ids": [], "senders": []}, {}),
        "editavg_update": ({"slot": 0}, {}),
        "editavg_apply": ({"slot": 0}, {}),
        "collab": ({"slot": 0, "stats": 0, "secure": False}, {}),
        "evaluate": ({"others": "none", "fluency": False, "baseline": True, "others_limit": 0}, {}),
        "rejected": ({"error": "x"}, {}),
    }[op]


def _client_field_mutation(op: str, args: dict, d_model: int, d_ff: int, layers: tuple, rng: random.Random):
    """(kind, args, arrays): invalid arguments or arrays for ``op``."""
    n = len(layers)
    choices = [
        ("unknown_op", lambda: ({"op": rng.choice(["format_disk", "", "__init__", "op_hello"])}, {})),
        ("extra", lambda: ({**args, "unexpected": 1}, {})),
        ("wrong_type", lambda: ({**args, **{k: _replace_in(v, rng) for k, v in list(args.items())[:1]}}, {}))
        if args
        else ("extra", lambda: ({"x": 1}, {})),
        ("unexpected_arrays", lambda: (args, {"z": np.zeros((2, d_model), np.float32)}))
        if op not in ("edit", "reedit", "editavg_apply", "collab")
        else ("extra", lambda: ({**args, "y": [1]}, {})),
    ]
    if "slot" in args:
        choices.append(("slot", lambda: ({**args, "slot": rng.choice([-1, 10**6, 1.0, True, "0", None])}, {})))
    if op == "reedit":
        ids = [f"c-1/0/{i}" for i in range(2)]
        good = {
            "z": np.zeros((2, d_model), np.float32),
            "delta": np.zeros((2, d_model), np.float32),
            "keys": np.zeros((2, n, d_ff), np.float32),
            "layers": np.asarray(layers, np.int64),
        }
        base = {**args, "ids": ids, "senders": ["c-1", "c-1"]}
        choices += [
            ("alpha", lambda: ({**args, "alpha": rng.choice([-2.0, 1.5, float("nan"), "0.2", None])}, {})),
            ("gate", lambda: ({**args, "gate": rng.choice(["false", 0, None])}, {})),
            ("vector", lambda: ({**args, "vector": rng.choice(["h", "", 1])}, {})),
            ("own_ids", lambda: ({**base, "ids": ["client-0/0/0", "client-0/0/1"], "senders": ["client-0"] * 2}, good)),
            ("sender_mismatch", lambda: ({**base, "senders": ["c-2", "c-1"]}, good)),
            ("ids_senders_length", lambda: ({**base, "senders": ["c-1"]}, good)),
            ("ids_form", lambda: ({**base, "ids": ["c-1/0", "c-1/x/1"]}, good)),
            ("bad_array", lambda: (base, {**good, "z": _bad_array("z", good["z"], rng)})),
            ("bad_layers", lambda: (base, {**good, "layers": np.asarray(layers[::-1] + (99,), np.int64)})),
            ("missing_array", lambda: (base, {k: v for k, v in good.items() if k != "keys"})),
        ]
    if op == "edit":
        tag = "a" * 64
        choices += [
            (
                "reuse_mismatch",
                lambda: ({**args, "reuse_tags": [tag]}, {"reuse_z": np.zeros((2, d_model), np.float32)}),
            ),
            (
                "reuse_bad_z",
                lambda: (
                    {**args, "reuse_tags": [tag]},
                    {"reuse_z": _bad_array("z", np.zeros((1, d_model), np.float32), rng)},
                ),
            ),
            (
                "reuse_tag_form",
                lambda: ({**args, "reuse_tags": [tag + "\n"]}, {"reuse_z": np.zeros((1, d_model), np.float32)}),
            ),
            ("upload", lambda: ({**args, "upload": "no"}, {})),
        ]
    if op == "editavg_apply":
        good = {f"delta.{l}": np.zeros((d_model, d_ff), np.float32) for l in layers}
        choices += [
            (
                "bad_array",
                lambda: (args, {**good, f"delta.{layers[0]}": _bad_array("d", good[f"delta.{layers[0]}"], rng)}),
            ),
            ("missing_array", lambda: (args, dict(list(good.items())[1:]))),
        ]
    if op == "collab":
        rk, kk = np.zeros((d_model, d_ff), np.float32), np.eye(d_ff, dtype=np.float32)
        choices += [
            ("apply_index", lambda: ({**args, "apply": rng.choice([n, 10**3, -1])}, {"rk": rk, "kk": kk})),
            ("stats_index", lambda: ({**args, "stats": rng.choice([n, 4000])}, {})),
            ("kk_not_psd", lambda: ({**args, "apply": 0}, {"rk": rk, "kk": -kk})),
            ("bad_array", lambda: ({**args, "apply": 0}, {"rk": _bad_array("rk", rk, rng), "kk": kk})),
            ("secure", lambda: ({**args, "secure": "yes"}, {})),
        ]
    if op == "evaluate":
        choices += [
            ("others", lambda: ({**args, "others": rng.choice(["everything", "", 1])}, {})),
            ("others_limit", lambda: ({**args, "others_limit": rng.choice([-1, 1.5, "3"])}, {})),
        ]
    if op == "rejected":
        choices += [("error", lambda: ({"error": rng.choice([5, None, "e" * 2001])}, {}))]
    kind, make = rng.choice(choices)
    args, arrays = make()
    return kind, args, arrays


def client_case(op: str, rng: random.Random, context: Context, dims: tuple) -> tuple[str, str]:
    from client_app.app import SHAREABLE_ERRORS, _step

    args, arrays = _instruction(op)
    if rng.random() < 0.4:
        kind, content = wire_mutation({"op": op, **args}, arrays, rng)
        if not isinstance(content, RecordDict):  # Flower delivers only RecordDicts to a ClientApp
            content = RecordDict({"step": ConfigRecord({"json": "[]"})})
    else:
        kind, args, arrays = _client_field_mutation(op, args, *dims, rng)
        content = pack({"op": op, **args} if "op" not in args else args, arrays)
    message = Message(content, dst_node_id=1, message_type="query")
    try:
        reply = _step(message, context)
        body, _ = unpack(reply.content, LIMITS)
    except Exception as err:  # noqa: BLE001 - whatever escapes the ClientApp handler
        return f"crashed: {type(err).__name__}: {str(err)[:200]}", kind
    error = body.get("error")
    if error is None:
        return "accepted_invalid", kind
    if str(error).split(":")[0] in SHAREABLE_ERRORS:
        return "rejected", kind
    return f"crashed: {str(error)[:200]}", kind


def client_context(model: str, root: Path) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={"model": model, "num-slots": 2, "output-dir": str(root), "run-name": "fuzz", "max-message-mb": 1},
    )


# --------------------------------------------------------------------------- the loaders' door

GOOD_RECORD = {
    "case_id": 1,
    "prompt": "{} is located in",
    "subject": "Paris",
    "target_new": "Rome",
    "target_true": "France",
}


def malformed_file(path: Path, rng: random.Random) -> str:
    """Write one malformed request file at ``path``; returns its kind."""
    good = json.dumps(GOOD_RECORD)
    kind = rng.choice(
        [
            "empty",
            "whitespace",
            "binary",
            "not_utf8",
            "truncated",
            "deep",
            "huge_int",
            "nan",
            "not_records",
            "record_not_object",
            "missing_field",
            "wrong_type",
            "no_placeholder",
            "prompts_not_strings",
            "infinite_timestamp",
            "two_placeholders",
            "empty_target",
            "bad_timestamp",
            "mixed_schemas",
            "counterfact_wrong",
            "zsre_wrong",
            "lone_surrogate",
        ]
    )
    record = dict(GOOD_RECORD)
    text = None
    if kind == "empty":
        text = ""
    elif kind == "whitespace":
        text = " \n\t\n"
    elif kind == "binary":
        path.write_bytes(rng.randbytes(rng.randrange(1, 512)))
        return kind
    elif kind == "not_utf8":
        path.write_bytes(good.encode()[:10] + b"\xff\xfe" + good.encode()[10:])
        return kind
    elif kind == "truncated":
        text = good[: rng.randrange(1, len(good) - 1)]
    elif kind == "deep":
        depth = rng.choice([50, 5000, 200_000])
        text = "[" * depth + "]" * depth
    elif kind == "huge_int":
        text = json.dumps(record)[:-1] + f', "timestamp": {"9" * rng.choice([40, 5000])}}}'
    elif kind == "nan":
        text = json.dumps(record)[:-1] + f', "timestamp": {rng.choice(["NaN", "Infinity"])}}}'
    elif kind == "not_records":
        text = json.dumps(rng.choice([5, "x", [], {}, None, [[]]]))
    elif kind == "record_not_object":
        text = good + "\n" + json.dumps(rng.choice([5, "x", [1], None])) + "\n"
    elif kind == "missing_field":
        record.pop(rng.choice(["prompt", "subject", "target_new"]))
    elif kind == "wrong_type":
        key = rng.choice(["prompt", "subject", "target_new", "case_id"])
        record[key] = rng.choice([5, None, [], {}, True]) if key != "case_id" else rng.choice([[], {}])
    elif kind == "no_placeholder":
        record["prompt"] = "Paris is located in"
    elif kind == "prompts_not_strings":
        record[rng.choice(["paraphrase_prompts", "neighborhood_prompts"])] = rng.choice([[5], [None], {}, 5, [["x"]]])
    elif kind == "infinite_timestamp":
        text = json.dumps(record)[:-1] + ', "timestamp": 1e400}\n'
    elif kind == "two_placeholders":
        record["prompt"] = "{} is {} located in"
    elif kind == "empty_target":
        record["target_new"] = rng.choice(["", " "])
    elif kind == "bad_timestamp":
        record["timestamp"] = rng.choice(["yesterday", [], {}])
    elif kind == "mixed_schemas":
        text = (
            good
            + "\n"
            + json.dumps({"src": "q?", "answers": ["a"], "rephrase": "r", "loc": "l", "loc_ans": "x"})
            + "\n"
        )
    elif kind == "counterfact_wrong":
        record = {"case_id": 0, "requested_rewrite": rng.choice(["x", {"prompt": "no subject", "subject": "S"}, {}])}
    elif kind == "zsre_wrong":
        record = {
            "src": "q?",
            "subject": "q",
            "answers": rng.choice(["a", [], [5]]),
            "rephrase": "r",
            "loc": "l",
            "loc_ans": "x",
        }
    elif kind == "lone_surrogate":
        text = json.dumps(record).replace("Rome", "\\ud800")
    if text is None:
        text = json.dumps(record) + "\n"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return kind


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def loader_case(path: Path) -> str:
    from fededit_core.data.errors import DataError
    from fededit_core.data.loaders import dataset_kind, load_requests

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        load_requests(path)
        dataset_kind(path)
    except DataError:
        return "rejected"
    except _Timeout:
        return "crashed: no answer within 10 s"
    except Exception as err:  # noqa: BLE001
        return f"crashed: {type(err).__name__}: {str(err)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return "accepted_invalid"


def special_files(root: Path) -> list[tuple[str, Path]]:
    """A named pipe nobody writes to, a folder, and a sparse file over the size cap."""
    from fededit_core.data.loaders import MAX_DATA_BYTES

    fifo = root / "pipe.jsonl"
    os.mkfifo(fifo)
    folder = root / "folder.jsonl"
    folder.mkdir()
    huge = root / "huge.jsonl"
    with huge.open("wb") as handle:
        handle.truncate(MAX_DATA_BYTES + 1)
    return [("named_pipe", fifo), ("folder", folder), ("over_size_cap", huge)]


# --------------------------------------------------------------------------- driver


def _tally(results: list[tuple[str, str, str]]) -> dict:
    crashed = [r for r in results if r[0].startswith("crashed")]
    return {
        "cases": len(results),
        "crashed": len(crashed),
        "accepted_invalid": sum(r[0] == "accepted_invalid" for r in results),
        "rejected": sum(r[0] == "rejected" for r in results),
        "by_step": {step: sum(1 for r in results if r[1] == step) for step in dict.fromkeys(r[1] for r in results)},
        "failures": [
            {"step": step, "kind": kind, "outcome": outcome} for outcome, step, kind in results if outcome != "rejected"
        ][:50],
    }


def fuzz_server(n: int, seed: int, progress: bool = True) -> dict:
    _identity()
    rng = random.Random(seed)
    results = []
    logging.getLogger("fededit").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(op, i) for op in SERVER_STEPS for i in range(n)]
        for op, i in tqdm(cases, desc="server fuzz", disable=not progress):
            root = Path(tmp) / f"{op}-{i}"
            outcome, kind = server_case(op, random.Random(rng.randrange(2**63)), root)
            results.append((outcome, op, kind))
    return _tally(results)


def fuzz_client(n: int, seed: int, model: str, progress: bool = True) -> dict:
    from fededit_core.client.worker import ClientSpec, EditWorker

    _identity()
    rng = random.Random(seed + 1)
    results = []
    logging.getLogger("fededit").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp:
        context = client_context(model, Path(tmp))
        spec = ClientSpec(run="dims", name="dims", model=model, requests="builtin", state_dir=tmp)
        editor = EditWorker().editor(spec)
        dims = (editor.d_model, editor.d_ff, tuple(editor.hp.layers))
        cases = [(op, i) for op in CLIENT_STEPS for i in range(-(-n // len(CLIENT_STEPS)))]
        for op, i in tqdm(cases, desc="client fuzz", disable=not progress):
            outcome, kind = client_case(op, random.Random(rng.randrange(2**63)), context, dims)
            results.append((outcome, op, kind))
    return _tally(results)


def fuzz_loaders(n: int, seed: int, progress: bool = True) -> dict:
    rng = random.Random(seed + 2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind, path in special_files(root):
            results.append((loader_case(path), "file", kind))
        for i in tqdm(range(n), desc="loader fuzz", disable=not progress):
            path = root / f"case-{i}.jsonl"
            kind = malformed_file(path, random.Random(rng.randrange(2**63)))
            results.append((loader_case(path), "file", kind))
            path.unlink()
    return _tally(results)


def main(argv: list[str] | None = None) -> int:
    from fededit_core.model.loading import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="cases per server step type, client and loaders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the client's model (default: %(default)s)")
    parser.add_argument("--only", choices=["server", "client", "loaders"], action="append")
    parser.add_argument("--json", type=Path, help="write the tallies here")
    args = parser.parse_args(argv)
    parts = args.only or ["server", "client", "loaders"]
    started = time.perf_counter()
    out: dict = {}
    if "server" in parts:
        out["server"] = fuzz_server(args.n, args.seed)
    if "client" in parts:
        out["client"] = fuzz_client(args.n, args.seed, args.model)
    if "loaders" in parts:
        out["loaders"] = fuzz_loaders(args.n, args.seed)
    out["seconds"] = round(time.perf_counter() - started, 1)
    for part in parts:
        t = out[part]
        print(
            f"{part:8s} cases {t['cases']:6d}  crashed {t['crashed']:4d}  accepted_invalid {t['accepted_invalid']:4d}  rejected {t['rejected']:6d}"
        )
        for failure in t["failures"][:10]:
            print("   ", failure)
    if args.json:
        atomic_write(args.json, json.dumps(out, indent=1))
    return 0 if all(out[p]["crashed"] == 0 and out[p]["accepted_invalid"] == 0 for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
