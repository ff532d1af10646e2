"""What both Flower apps agree on: how a step travels in a Flower Message (the run config they
both read is ``strategies.settings.RunSettings``).

A step is a ``RecordDict`` with a ``ConfigRecord`` "step" (one JSON string: the step name and its
arguments, or the reply body) and an ``ArrayRecord`` "arrays" (named numpy arrays, stacked).
Message types: ``query`` (handshake, tags), ``evaluate`` (metrics), ``train.steps`` (every edit step)
and plain ``train`` (SecAgg+ rounds, ``server_app.secure_sum``).
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

QUERY_STEPS = ("whoami", "hello", "tags", "rejected")
EDIT_ACTION = "steps"


def message_type(op: str) -> str:
    """``query``, ``evaluate``, or ``train.steps`` for every edit step: the plain ``train`` type is
    left to SecAgg+, whose messages the client's default train handler answers."""
    if op in QUERY_STEPS:
        return "query"
    return "evaluate" if op == "evaluate" else f"train.{EDIT_ACTION}"


def pack(body: dict, arrays: dict[str, np.ndarray]) -> RecordDict:
    record = ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})
    return RecordDict({"step": ConfigRecord({"json": json.dumps(body)}), "arrays": record})


def unpack(content: RecordDict) -> tuple[dict, dict[str, np.ndarray]]:
    if "step" not in content:
        raise ValueError("message has no 'step' record (not a fededit message)")
    body = json.loads(content["step"]["json"])
    arrays = {name: array.numpy() for name, array in content["arrays"].items()} if "arrays" in content else {}
    return body, arrays
