"""Malformed replies: broken at the wire, or well-formed with wrong fields for their step."""

from __future__ import annotations

import json
import random

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from bench.fuzz.harness import FINGERPRINT, LAYERS, LIMITS, PER_SLOT, WRONG_VALUES
from wire.messages import pack

# --------------------------------------------------------------------------- mutations


def _npy(array: np.ndarray) -> bytes:
    return Array(np.ascontiguousarray(array)).data


def npy_with_header(descr: str, shape: tuple, payload: bytes) -> bytes:
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
            data=npy_with_header("<f4", rng.choice([(10**15,), (10**6, 10**6), (2**40 - 1, 2)]), payload),
        )
        return kind, _content(text, flower)
    if kind == "npy_bad_dtype":
        descr = rng.choice(["|O", "<c8", ">f4", "<U4", "|b1", "<i4", "|V8"])
        item = np.dtype(descr).itemsize if descr != "|O" else 8
        flower[name] = Array(
            dtype="x", shape=(2,), stype="numpy.ndarray", data=npy_with_header(descr, (2,), b"\x00" * 2 * item)
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


def replace_in(value, rng: random.Random):
    """``value`` with one leaf or element replaced by a value of the wrong type or form."""
    if isinstance(value, dict) and value and rng.random() < 0.6:
        key = rng.choice(sorted(value))
        return {**value, key: replace_in(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.6:
        i = rng.randrange(len(value))
        return value[:i] + [replace_in(value[i], rng)] + value[i + 1 :]
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
        mutated = {**body, key: replace_in(body[key], rng)}
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


def bad_array(name: str, array: np.ndarray, rng: random.Random) -> np.ndarray:
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
    arrays[name] = bad_array(name, arrays[name], rng)
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


def _sealed(client, body, arrays, rng):
    """A sealed blob of the wrong length or without the format's magic (what the server can see)."""
    if "sealed" not in arrays:
        return _layers(client, body, arrays, rng)
    blob = arrays["sealed"].tobytes()
    arrays["sealed"] = np.frombuffer(
        rng.choice([blob[:-1], blob + b"\0", b"FEs0" + blob[4:], blob[: len(blob) // 2], b""]), dtype=np.uint8
    )
    return body, arrays


def _count(client, body, arrays, rng):
    body["n"] = rng.choice([True, False, -1, 10**12, PER_SLOT + 1, 1.0, "2"])
    return body, arrays


def _statistics(client, body, arrays, rng):
    """Dense: K K^T not PSD or asymmetric. Thin factors: two widths, or wider than the client's slot."""
    if "kf" in arrays:
        key = rng.choice(["kf", "rf"])
        extra = rng.choice([1, 40])
        arrays[key] = np.concatenate([arrays[key], np.ones((len(arrays[key]), extra), np.float32)], axis=1)
        if rng.random() < 0.5:  # both wider: the width exceeds the client's requests in the slot
            other = "rf" if key == "kf" else "kf"
            arrays[other] = np.concatenate([arrays[other], np.ones((len(arrays[other]), extra), np.float32)], axis=1)
        return body, arrays
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
        ("sealed", _sealed),
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
        ("bad_statistics", _statistics),
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
