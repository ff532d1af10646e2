"""fededit's ClientApp: a thin client that forwards each step to this organisation's edit worker.

Deployment: the node config names the worker (``worker="unix:/path"`` or ``"127.0.0.1:PORT"``),
the private request file (``requests=...``), the client's ``name``, its ``device``, its checkpoint
folder (``state-dir``) and the federation secret (``secret-file``, enables reuse). Flower starts a
new ClientApp process per message, so nothing is loaded here.

Simulation: no worker in the node config, so the worker lives in this process (one per Ray actor,
shared by the virtual clients on it, which swap their own edited layers in); the client takes
partition ``partition-id`` of the run config's ``data``.
"""

from __future__ import annotations

import json
import logging
import os
import traceback

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from client_app.worker_service import RemoteWorker, WorkerStepFailed
from fededit_core.client.worker import ClientSpec, EditWorker
from fededit_core.data.clients import client_name
from fededit_core.fedleke.reedit import DEFAULT_REUSE_MIN_PROB, DEFAULT_ROLLBACK_MARGIN
from fededit_core.paths import cache_dir
from strategies.settings import RunSettings
from wire.messages import EDIT_ACTION, Limits, MessageError, pack, unpack

log = logging.getLogger("fededit.client")
app = ClientApp()
_IN_PROCESS: EditWorker | None = None


def _margin(value) -> float | None:
    """The re-edit rollback margin in nats; a negative one turns the check off (the paper's rule)."""
    value = float(value)
    return None if value < 0 else value


def _flag(value) -> bool:
    """A node-config switch: true / false (a bool, or its TOML-ish spelling)."""
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "1", "yes"):
        return True
    if str(value).strip().lower() in ("false", "0", "no", ""):
        return False
    raise ValueError(f"a node-config switch is true or false, got {value!r}")


def _run_fields(run: RunSettings) -> dict:
    """The ClientSpec fields that come from the run config."""
    return dict(
        run=run.run,
        model=run.model,
        dtype=run.dtype,
        device=run.device,
        hparams=run.memit_overrides(),
        num_slots=run.num_slots,
        seed=run.seed,
        max_requests=run.max_requests,
        zsre_target=run.zsre_target,
    )


def client_spec(context: Context) -> ClientSpec:
    """This client's local settings from the node config (deployment) or partition id (simulation)."""
    node, run = context.node_config, RunSettings.from_run_config(context.run_config, context.run_id)
    local = {key: str(node[key]) for key in ("dtype", "device") if key in node}
    if "requests" in node:  # deployment: this organisation's own file
        return ClientSpec(
            **{**_run_fields(run), **local},
            name=str(node.get("name", f"node-{context.node_id}")),
            requests=str(node["requests"]),
            partition="all",
            state_dir=str(node.get("state-dir", cache_dir("state"))),
            secret_file=str(node["secret-file"]) if node.get("secret-file") else None,
            retired_secret_files=[f for f in str(node.get("retired-secret-files", "")).split(",") if f.strip()],
            allow_plaintext_mkvs=_flag(node.get("allow-plaintext-mkvs", False)),
            reedit_gate=str(node.get("reedit-gate", "server")),
            rollback_margin=_margin(node.get("rollback-margin", DEFAULT_ROLLBACK_MARGIN)),
            reuse_min_prob=float(node.get("reuse-min-prob", DEFAULT_REUSE_MIN_PROB)),
        )
    secret = os.environ.get("FEDEDIT_FEDERATION_SECRET_FILE") or str(cache_dir() / "federation.secret")
    return simulation_spec(run, int(node["partition-id"]), int(node["num-partitions"]), secret, **local)


def simulation_spec(run: RunSettings, index: int, count: int, secret_file: str, **overrides) -> ClientSpec:
    """Simulated client ``index`` of ``count`` (partition ``index`` of the run config's ``data``);
    ``overrides``: ClientSpec fields set otherwise (the node's device, a benchmark's defences)."""
    fields = dict(
        _run_fields(run),
        name=client_name(index),
        requests=run.data,
        partition=run.partition,
        count=count,
        state_dir=str(run.simulation_state_dir),
        secret_file=secret_file,
        oracle=True,
        rollback_margin=_margin(run.rollback_margin),
        allow_plaintext_mkvs=not run.seal_mkvs,  # simulation: the run config is the organisation's own
    )
    return ClientSpec(**{**fields, **overrides})


# errors whose messages this project writes without request text: they may reach the server
SHAREABLE_ERRORS = ("WorkerError", "StepError", "MessageError", "WorkerUnavailable")


def shareable_error(err: Exception) -> str:
    """What the server learns of a failed step: the message of this project's own step errors, only
    the exception's kind for anything else (a data error may quote a private record)."""
    kind = err.kind if isinstance(err, WorkerStepFailed) else type(err).__name__
    if kind in SHAREABLE_ERRORS:
        return f"{kind}: {err}"
    return f"{kind} (details in this organisation's worker log)"


def _worker(context: Context):
    global _IN_PROCESS
    address = context.node_config.get("worker")
    if address:
        return RemoteWorker(str(address), max_message_mb=_max_message_mb(context))
    if _IN_PROCESS is None:
        _IN_PROCESS = EditWorker()
    return _IN_PROCESS


def _max_message_mb(context: Context) -> int:
    """How much this node reads from the server: its own ``max-message-mb``, else the run's."""
    run = RunSettings.from_run_config(context.run_config, context.run_id)
    return int(context.node_config.get("max-message-mb", run.max_message_mb))


def limits(context: Context) -> Limits:
    return Limits(max_message_bytes=_max_message_mb(context) << 20)


def _step(msg: Message, context: Context) -> Message:
    try:
        body, arrays = unpack(msg.content, limits(context))
        op = body.pop("op", None)
        if not isinstance(op, str):
            raise MessageError("the instruction names no step ('op')")
        spec = client_spec(context)
        worker = _worker(context)
        if op == "whoami":  # discovery and a health check, without loading anything
            if isinstance(worker, RemoteWorker):
                worker.health()
            reply, out = {"client": spec.name}, {}
        else:
            reply, out = worker.handle(op, spec, body, arrays)
    except Exception as err:  # reported to the server as this client's failure
        log.error("step failed: %s", traceback.format_exc())
        reply, out = {"error": shareable_error(err)}, {}
    return Message(pack(reply, out), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _step(msg, context)


@app.train(EDIT_ACTION)
def train(msg: Message, context: Context) -> Message:
    return _step(msg, context)


@app.train(mods=[secaggplus_mod])
def secure_train(msg: Message, context: Context) -> Message:
    """SecAgg+ rounds (CollabEdit's secure sums): ``secaggplus_mod`` runs the protocol's stages and
    calls this handler once per round for the arrays to mask; they go back in the legacy fit-result
    layout that the mod expects, with weight 1. An error here leaves this client out of the sum."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    body = json.loads(str(fitins.config["json"]))
    op, names = body.pop("op"), body.pop("names")
    _, arrays = _worker(context).handle(op, client_spec(context), body, {})
    missing = [n for n in names if n not in arrays]
    if missing:
        raise RuntimeError(f"step {op!r} returned no arrays {missing} for the secure sum")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([arrays[n] for n in names]), 1, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _step(msg, context)
