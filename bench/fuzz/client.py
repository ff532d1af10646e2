"""The client's door: malformed instructions through the real ClientApp handler."""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from tqdm import tqdm

from bench.fuzz.harness import LIMITS, flower_identity, tally
from bench.fuzz.mutations import bad_array, replace_in, wire_mutation
from fededit_core.fedleke.sealing import sealed_length
from wire.messages import pack, unpack

# --------------------------------------------------------------------------- the client's door

CLIENT_STEPS = ("hello", "tags", "edit", "reedit", "editavg_update", "editavg_apply", "collab", "evaluate", "rejected")


def _instruction(op: str) -> tuple[dict, dict]:
    """A valid instruction of each step for a client of a 576-d model (shapes come from the model)."""
    return {
        "hello": ({}, {}),
        "tags": ({"slot": 0}, {}),
        "edit": ({"slot": 0, "reuse_tags": [], "seal": True}, {}),
        "reedit": ({"alpha": 0.5, "gate": "set", "vector": "delta", "tau": 1.0, "ids": [], "senders": []}, {}),
        "editavg_update": ({"slot": 0}, {}),
        "editavg_apply": ({"slot": 0}, {}),
        "collab": ({"slot": 0, "stats": 0, "secure": False, "transport": "dense", "beta0": 1.0, "beta1": 0.0}, {}),
        "evaluate": ({"others": "none", "fluency": False, "baseline": True, "others_limit": 0}, {}),
        "rejected": ({"error": "x"}, {}),
    }[op]


def _client_field_mutation(op: str, args: dict, d_model: int, d_ff: int, layers: tuple, rng: random.Random):
    """(kind, args, arrays): invalid arguments or arrays for ``op``."""
    n = len(layers)

    def source(sender: str = "c-1", count: int = 2) -> dict:
        return {"sender": sender, "slot": 0, "n": count}

    def blob(count: int) -> np.ndarray:  # the length of a sealed set of ``count`` MKVs
        return np.zeros(sealed_length(count, d_model, d_ff, n), np.uint8)

    def reuse(j: int = 0, row: int = 0) -> dict:
        return {**args, "reuse_tags": ["a" * 64], "sources": [source()], "reuse_source": [j], "reuse_row": [row]}

    choices = [
        ("unknown_op", lambda: ({"op": rng.choice(["format_disk", "", "__init__", "op_hello"])}, {})),
        ("extra", lambda: ({**args, "unexpected": 1}, {})),
        ("wrong_type", lambda: ({**args, **{k: replace_in(v, rng) for k, v in list(args.items())[:1]}}, {}))
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
            "corrections": np.zeros((2, n, d_model), np.float32),
            "layers": np.asarray(layers, np.int64),
        }
        base = {**args, "ids": ids, "senders": ["c-1", "c-1"]}
        choices += [
            ("alpha", lambda: ({**args, "alpha": rng.choice([-2.0, 1.5, float("nan"), "0.2", None])}, {})),
            ("gate", lambda: ({**args, "gate": rng.choice(["false", 0, None, True, "Paper"])}, {})),
            ("vector", lambda: ({**args, "vector": rng.choice(["h", "", 1])}, {})),
            ("tau", lambda: ({**args, "tau": rng.choice([-1.0, 1e9, float("nan"), "1", None])}, {})),
            ("own_ids", lambda: ({**base, "ids": ["client-0/0/0", "client-0/0/1"], "senders": ["client-0"] * 2}, good)),
            ("sender_mismatch", lambda: ({**base, "senders": ["c-2", "c-1"]}, good)),
            ("ids_senders_length", lambda: ({**base, "senders": ["c-1"]}, good)),
            ("ids_form", lambda: ({**base, "ids": ["c-1/0", "c-1/x/1"]}, good)),
            ("bad_array", lambda: (base, {**good, "z": bad_array("z", good["z"], rng)})),
            ("bad_layers", lambda: (base, {**good, "layers": np.asarray(layers[::-1] + (99,), np.int64)})),
            ("missing_array", lambda: (base, {k: v for k, v in good.items() if k != "keys"})),
            ("sealed_own", lambda: ({**args, "sources": [source("client-0")]}, {"sealed.0": blob(2)})),
            ("sealed_twice", lambda: ({**args, "sources": [source()] * 2}, {"sealed.0": blob(2), "sealed.1": blob(2)})),
            ("sealed_length", lambda: ({**args, "sources": [source()]}, {"sealed.0": blob(2)[:-1]})),
            ("sealed_dtype", lambda: ({**args, "sources": [source()]}, {"sealed.0": blob(2).astype(np.float32)})),
            ("sealed_missing", lambda: ({**args, "sources": [source()]}, {})),
            ("sealed_and_plain", lambda: ({**base, "sources": [source()]}, {**good, "sealed.0": blob(2)})),
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
                    {"reuse_z": bad_array("z", np.zeros((1, d_model), np.float32), rng)},
                ),
            ),
            (
                "reuse_tag_form",
                lambda: ({**args, "reuse_tags": [tag + "\n"]}, {"reuse_z": np.zeros((1, d_model), np.float32)}),
            ),
            ("upload", lambda: ({**args, "upload": "no"}, {})),
            ("reuse_row", lambda: (reuse(row=5), {"sealed.0": blob(2)})),
            ("reuse_source", lambda: (reuse(j=1), {"sealed.0": blob(2)})),
            ("reuse_rows_length", lambda: ({**reuse(), "reuse_row": []}, {"sealed.0": blob(2)})),
        ]
    if op == "editavg_apply":
        good = {f"delta.{l}": np.zeros((d_model, d_ff), np.float32) for l in layers}
        choices += [
            (
                "bad_array",
                lambda: (args, {**good, f"delta.{layers[0]}": bad_array("d", good[f"delta.{layers[0]}"], rng)}),
            ),
            ("missing_array", lambda: (args, dict(list(good.items())[1:]))),
        ]
    if op == "collab":
        rk, kk = np.zeros((d_model, d_ff), np.float32), np.eye(d_ff, dtype=np.float32)
        choices += [
            ("apply_index", lambda: ({**args, "apply": rng.choice([n, 10**3, -1])}, {"rk": rk, "kk": kk})),
            ("stats_index", lambda: ({**args, "stats": rng.choice([n, 4000])}, {})),
            ("kk_not_psd", lambda: ({**args, "apply": 0}, {"rk": rk, "kk": -kk})),
            ("bad_array", lambda: ({**args, "apply": 0}, {"rk": bad_array("rk", rk, rng), "kk": kk})),
            ("secure", lambda: ({**args, "secure": "yes"}, {})),
            ("transport", lambda: ({**args, "transport": rng.choice(["sparse", "", None, 1])}, {})),
            ("skip", lambda: ({**args, "skip": rng.choice([[-1], [10**6], [0, 0], ["0"], 3])}, {})),
            ("beta", lambda: ({**args, rng.choice(["beta0", "beta1"]): rng.choice([-1.0, 1e9, "1", None])}, {})),
            ("secure_lowrank", lambda: ({**args, "secure": True, "transport": "lowrank"}, {})),
            (
                "factor_width",
                lambda: (
                    {**args, "apply": 0, "transport": "lowrank"},
                    rng.choice(
                        [
                            {"kf": np.ones((d_ff, 2), np.float32), "rf": np.ones((d_model, 3), np.float32)},
                            {
                                "kf": np.ones((d_ff, d_ff + 1), np.float32),
                                "rf": np.ones((d_model, d_ff + 1), np.float32),
                            },
                            {"kf": np.ones((d_model, 2), np.float32), "rf": np.ones((d_ff, 2), np.float32)},
                        ]
                    ),
                ),
            ),
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


def fuzz_client(n: int, seed: int, model: str, progress: bool = True) -> dict:
    from fededit_core.client.worker import ClientSpec, EditWorker

    flower_identity()
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
    return tally(results)
