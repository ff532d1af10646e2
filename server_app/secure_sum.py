"""Secure sums with Flower's SecAgg+ (CollabEdit's R K^T and K K^T): the server learns only the sum.

In Flower 1.41 SecAgg+ runs only through the legacy path (``../shared/notes/flower-1.41.md``):
``SecAggPlusWorkflow`` driven by a ``LegacyContext`` whose legacy strategy says what each client
computes (``configure_fit``) and receives the unmasked aggregate (``aggregate_fit``); on the client,
``secaggplus_mod`` wraps the default train handler (``client_app.app.secure_train``). We run one
workflow per sum. Each client's weight is 1 (``max_weight=1``), so the workflow yields the mean of
the clients' arrays, and the sum is the mean times the number of contributors. Values must lie in
[-SECURE_SUM_RANGE, SECURE_SUM_RANGE]: the strategy scales them first (``strategies.collabedit``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from strategies.session import SECURE_SUM_RANGE, FederationError, Instruction, SecureSum

log = logging.getLogger("fededit.server")

RECONSTRUCTION_THRESHOLD = 2 / 3  # shares needed to unmask, as a fraction of a client's neighbours


def record_bytes(content) -> int:
    """Bytes of a message's content: array data plus config values (as they travel, roughly)."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    return total


class CountingGrid:
    """A Grid that counts the bytes of every message to and from each node."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.sent: dict[int, int] = defaultdict(int)
        self.received: dict[int, int] = defaultdict(int)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            self.sent[m.metadata.dst_node_id] += record_bytes(m.content)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if not r.has_error():
                self.received[r.metadata.src_node_id] += record_bytes(r.content)
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


class _OneSum(LegacyStrategy):
    """The legacy strategy of one SecAgg+ round: each node gets its step; keeps the unmasked mean."""

    def __init__(self, grid: Grid, run_id: int, steps: dict[int, dict]):
        self.proxies = {node: GridClientProxy(node, grid, run_id) for node in steps}
        self.steps = steps
        self.mean: list[np.ndarray] | None = None
        self.contributors: list[int] = []
        self.failures: list[str] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [
            (self.proxies[node], FitIns(Parameters(tensors=[], tensor_type=""), {"json": json.dumps(step)}))
            for node, step in self.steps.items()
        ]

    def aggregate_fit(self, server_round, results, failures):
        self.contributors = [proxy.node_id for proxy, _ in results]
        self.failures = [str(f) for f in failures]
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)  # every result holds the aggregate
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class SecAggPlusSum:
    """``secure_sum`` for the Flower transport: one SecAgg+ round per call."""

    def __init__(self, grid: Grid, context: Context, nodes: dict[str, int], timeout: float | None):
        self.grid, self.context, self.nodes, self.timeout = grid, context, nodes, timeout
        self.names_by_node = {node: name for name, node in nodes.items()}
        self.rounds = 0

    def __call__(self, instructions: dict[str, Instruction], names: tuple[str, ...]) -> SecureSum:
        steps = {self.nodes[c]: {"op": ins.op, **ins.args, "names": list(names)} for c, ins in instructions.items()}
        self.rounds += 1
        counting = CountingGrid(self.grid)
        one = _OneSum(counting, self.context.run_id, steps)
        state = self.context.state
        state.config_records["config"] = ConfigRecord({"current_round": self.rounds})
        if "parameters" not in state.array_records:
            state.array_records["parameters"] = ArrayRecord()
        workflow = SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
            max_weight=1.0,
            clipping_range=SECURE_SUM_RANGE,
            timeout=self.timeout,
        )
        workflow(counting, LegacyContext(self.context, strategy=one))
        contributors = [self.names_by_node[n] for n in one.contributors]
        if one.mean is None or len(one.mean) != len(names):
            raise FederationError(
                f"SecAgg+ round {self.rounds} produced no sum (failures: {one.failures or 'none'}; "
                f"see the server log for the stage that halted)"
            )
        sums = {name: np.asarray(mean, dtype=np.float64) * len(contributors) for name, mean in zip(names, one.mean)}
        errors = {self.names_by_node[n]: "dropped during SecAgg+" for n in steps if n not in one.contributors}
        traffic = {self.names_by_node[n]: (counting.sent[n], counting.received[n]) for n in steps}
        return SecureSum(sums, contributors, errors, traffic)
