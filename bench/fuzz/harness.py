"""What every part of the fuzz shares: the scripted federation, honest replies, the tally."""

from __future__ import annotations

import hashlib

import numpy as np
from flwr.supercore.task_identity import TaskIdentity

from fededit_core.fedleke.sealing import MAGIC, key_id, key_proof, sealed_length
from wire.messages import Limits

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
SECRET = b"the fuzz federation's secret"  # the scripted clients' shared secret (the server never sees it)
WRONG_VALUES = ("x", True, 1.5, -1, 10**18, [], {}, None, [[1]], {"a": {"b": 1}}, "\ud800", "a" * 3000)


def flower_identity() -> None:
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
            "key_id": key_id(SECRET),
            "key_proof": key_proof(SECRET, "fuzz", step["nonce"]),
        }, {}
    if op == "tags":
        body = {"tags": [_tag(client, step["slot"], i) for i in range(PER_SLOT)]}
        if step.get("facts"):  # CollabEdit's conflict policy: one fact per request, none shared
            body["facts"] = [_tag(f"{client}/fact", step["slot"], i) for i in range(PER_SLOT)]
        return body, {}
    if op == "edit":
        if not step.get("upload", True):
            return {"report": report}, {}
        n, slot = PER_SLOT, step["slot"]
        body = {
            "ids": [f"{client}/{slot}/{i}" for i in range(n)],
            "tags": [_tag(client, slot, i) for i in range(n)],
            "report": report,
            "fingerprint": FINGERPRINT,
        }
        if step.get("seal"):  # random bytes of a sealed set's length: the server cannot tell them apart
            size = sealed_length(n, D_MODEL, D_FF, len(LAYERS)) - len(MAGIC)
            return body, {"sealed": np.frombuffer(MAGIC + rng.bytes(size), dtype=np.uint8)}
        return body, {
            "z": rng.standard_normal((n, D_MODEL)).astype(np.float32),
            "delta": rng.standard_normal((n, D_MODEL)).astype(np.float32),
            "keys": rng.standard_normal((n, len(LAYERS), D_FF)).astype(np.float32),
            "corrections": rng.standard_normal((n, len(LAYERS), D_MODEL)).astype(np.float32),
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
        if step.get("transport") == "lowrank":
            return body, {
                "kf": rng.standard_normal((D_FF, PER_SLOT)).astype(np.float32),
                "rf": rng.standard_normal((D_MODEL, PER_SLOT)).astype(np.float32),
            }
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


def tally(results: list[tuple[str, str, str]]) -> dict:
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
