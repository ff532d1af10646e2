"""fededit's ServerApp: runs one federated edit with the strategy named in the run config.

The federated logic lives in ``strategies`` (plain records, no Flower); this module only turns its
steps into Flower messages, finds the clients, and writes ``<output-dir>/<run>/report.{json,md}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fededit_core.paths import generations_path
from server_app.secure_sum import SecAggPlusSum
from strategies.federation import run_federation
from strategies.replies import ReplyError, parse_error, parse_reply
from strategies.report import client_table, generations_table, summary_line, write_report
from strategies.session import FederationError, Instruction, Reply
from strategies.settings import RunSettings
from wire.messages import Limits, MessageError, message_type, pack, unpack

log = logging.getLogger("fededit.server")
app = ServerApp()


class FlowerTransport:
    """Sends each client its step as a Flower message and returns the replies by client name.
    With ``capture`` set, every payload (both ways) is also written there (privacy tests); with
    ``context`` set it also offers ``secure_sum`` (SecAgg+)."""

    def __init__(
        self,
        grid: Grid,
        nodes: dict[str, int],
        timeout: float | None,
        capture: Path | None = None,
        context: Context | None = None,
        limits: Limits | None = None,
    ):
        self.grid, self.nodes, self.timeout, self.capture = grid, nodes, timeout, capture
        self.limits = limits or Limits(**RunSettings().limits)
        self.names = {node: name for name, node in nodes.items()}
        self.count = 0
        if context is not None:  # secure aggregation (CollabEdit's sums) needs the run's context
            self.secure_sum = SecAggPlusSum(grid, context, nodes, timeout)

    def _capture(self, direction: str, name: str, body: dict, arrays: dict) -> None:
        if self.capture is None:
            return
        self.capture.mkdir(parents=True, exist_ok=True)
        self.count += 1
        stem = self.capture / f"{self.count:05d}-{direction}-{name}"
        stem.with_suffix(".json").write_text(json.dumps(body))
        stem.with_suffix(".bin").write_bytes(b"".join(a.tobytes() for a in arrays.values()))

    def __call__(self, instructions: dict[str, Instruction]) -> dict[str, Reply]:
        messages = []
        for name, ins in instructions.items():
            body = {"op": ins.op, **ins.args}
            self._capture("to", name, body, ins.arrays)
            content = pack(body, ins.arrays)
            messages.append(Message(content, dst_node_id=self.nodes[name], message_type=message_type(ins.op)))
        replies: dict[str, Reply] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            name = self.names.get(reply.metadata.src_node_id)
            if name is None or name not in instructions or name in replies:
                continue  # not asked, or a second reply: only the first answer of each node counts
            replies[name] = self._decode(name, reply)
        return replies

    def _decode(self, name: str, reply: Message) -> Reply:
        if reply.has_error():
            return Reply(name, error=f"Flower error {reply.error.code}: {str(reply.error.reason)[:500]}")
        try:
            body, arrays = unpack(reply.content, self.limits)
        except MessageError as err:
            return Reply(name, error=str(err), malformed=True)
        self._capture("from", name, body, arrays)
        return Reply(name, body, arrays)


def _registered_name(node) -> str | None:
    """The name the SuperLink operator registered the node's key under (``flwr supernode register
    --name``), or None (simulation, or a deployment without node authentication)."""
    return node.name if node.HasField("name") and node.name else None


def _declared_name(reply: Message) -> str:
    """The name a node gives itself in its ``whoami`` reply (``MessageError`` / ``ReplyError``)."""
    if reply.has_error():
        raise MessageError(f"Flower error {reply.error.code}")
    body, arrays = unpack(reply.content, Limits(max_message_bytes=0, max_json_bytes=4096))
    error = parse_error(body)
    if error is not None:
        raise MessageError(f"cannot take part: {error}")
    return parse_reply("whoami", body, arrays)["client"]


def discover(grid: Grid, min_clients: int, wait_s: float, timeout: float | None) -> dict[str, int]:
    """Client name -> node id, once at least ``min_clients`` nodes are connected (their workers healthy).

    A node's name is the one its key was registered under when the SuperLink authenticates nodes;
    a node that calls itself otherwise, or that has no registered name while others do, is left out.
    Without registration (simulation) nodes name themselves; two nodes with one name are both left out."""
    deadline = time.monotonic() + wait_s
    nodes = list(grid.get_nodes())
    while len(nodes) < min_clients and time.monotonic() < deadline:
        time.sleep(2.0)
        nodes = list(grid.get_nodes())
    if len(nodes) < min_clients:
        raise FederationError(
            f"{len(nodes)} node(s) connected within {wait_s:.0f} s; the run needs {min_clients}: start more nodes, "
            f'wait longer (--run-config "wait-clients-s=SECONDS") or need fewer ("min-clients={max(1, len(nodes))}")'
        )
    registered = {n.node_id: _registered_name(n) for n in nodes}
    authenticated = any(registered.values())
    messages = [Message(pack({"op": "whoami"}, {}), dst_node_id=n.node_id, message_type="query") for n in nodes]
    claims: dict[str, list[int]] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if node not in registered or any(node in v for v in claims.values()):
            continue
        try:
            name = _declared_name(reply)
        except (MessageError, ReplyError) as err:
            log.error("node %s cannot take part: %s", node, err)
            continue
        if authenticated and registered[node] != name:
            log.error(
                "node %s calls itself %r but its key is registered as %r: left out",
                node,
                name,
                registered[node],
            )
            continue
        claims.setdefault(name, []).append(node)
    names = {name: ids[0] for name, ids in claims.items() if len(ids) == 1}
    for name, ids in claims.items():
        if len(ids) > 1:
            log.error("nodes %s all call themselves %r: all are left out (give each a distinct name)", ids, name)
    if len(names) < min_clients:
        raise FederationError(
            f"only {len(names)} healthy client(s) {sorted(names)}; the run needs {min_clients} "
            f'(--run-config "min-clients=N" sets it)'
        )
    return names


def _centralised(settings: RunSettings, names: list[str]):
    """The centralised reference (simulation: the server may read the shared data file): MEMIT of the
    union in the run's time slots, slot t editing every client's slot-t requests together, so the
    same edits in the same order as the federation."""

    def run(hellos: dict[str, dict]) -> dict[str, dict]:
        from fededit_core.data.partition import load_partitions
        from fededit_core.eval.centralised import centralised_metrics
        from fededit_core.memit.editor import make_editor

        parts = load_partitions(
            settings.data, len(names), settings.partition, settings.seed, settings.max_requests, settings.zsre_target
        )
        parts = {name: parts[name] for name in names if name in parts}
        editor = make_editor(settings.model, settings.device, settings.dtype, **settings.memit_overrides())
        kind = next(iter(hellos.values()))["kind"]
        n = sum(len(r) for r in parts.values())
        log.info("centralised MEMIT of all %d requests in %d time slots", n, settings.num_slots)
        metrics, _ = centralised_metrics(editor, parts, kind, fluency=settings.fluency, n_slots=settings.num_slots)
        return metrics

    return run


@app.main()
def main(grid: Grid, context: Context) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("fededit").addHandler(handler)
        logging.getLogger("fededit").setLevel(logging.INFO)
    settings = RunSettings.from_run_config(context.run_config, context.run_id)
    names = discover(grid, settings.min_clients, settings.wait_clients_s, settings.timeout)
    log.info("clients: %s", ", ".join(f"{n} (node {i})" for n, i in sorted(names.items())))
    capture = Path(settings.capture_dir) if settings.capture_dir else None
    transport = FlowerTransport(grid, names, settings.timeout, capture, context, Limits(**settings.limits))
    centralised = _centralised(settings, sorted(names)) if settings.centralised else None
    report = run_federation(transport, list(names), settings, settings.run_config(), centralised=centralised)
    # simulation: the clients' generations are on this machine's disk (they never travel in a message)
    for client in report["clients"]:
        local = generations_path(settings.simulation_state_dir, settings.run, client["client"])
        if local.is_file():
            client["generations"] = json.loads(local.read_text())
    json_path, md_path = write_report(report, settings.out_dir)
    print("\n" + client_table(report) + "\n\n" + generations_table(report) + "\n\n" + summary_line(report))
    print(f"report: {json_path} and {md_path}", flush=True)
