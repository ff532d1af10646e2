"""Which client holds which edit requests (simulation and benchmarks; a real client reads its own file).

Schemes:
- ``field``: each record's ``"client"`` field names its holder (the built-in federation set);
- ``iid``: a seeded shuffle dealt round-robin, so client sizes differ by at most one;
- ``contiguous``: the file cut into equal consecutive blocks (keeps timestamps/topics together);
- ``relation``: whole CounterFact relation groups per client, about 10% moved in from the others
  (FedLEKE's non-IID CounterFact setup; :func:`fededit_core.data.grouping.relation_partition`);
- ``cluster``: spectral clusters of the question embeddings, one per client (FedLEKE's zsRE setup;
  :func:`fededit_core.data.embeddings.cluster_partition`, MiniLM or a TF-IDF fallback).

Clients are named ``client-0`` .. ``client-{n-1}``; with ``field`` the names in the file must be
exactly those (so a simulation's partition-id maps to one of them).
"""

from __future__ import annotations

import logging
import random

from fededit_core.data.builtin import builtin_holders, resolve_data
from fededit_core.data.clients import client_name
from fededit_core.data.embeddings import cluster_partition
from fededit_core.data.grouping import relation_partition
from fededit_core.data.loaders import DEFAULT_ZSRE_TARGET, DataError, load_requests, record_clients
from fededit_core.data.requests import EditRequest

SCHEMES = ("field", "iid", "contiguous", "relation", "cluster")
log = logging.getLogger(__name__)


def partition_requests(
    requests: list[EditRequest],
    n_clients: int,
    scheme: str = "iid",
    seed: int = 0,
    holders: list[str | None] | None = None,
) -> dict[str, list[EditRequest]]:
    """``{client name: its requests}`` for ``n_clients`` clients (module docstring)."""
    if n_clients < 1:
        raise ValueError(f"need at least one client, got {n_clients}")
    names = [client_name(i) for i in range(n_clients)]
    parts: dict[str, list[EditRequest]] = {name: [] for name in names}
    if scheme == "field":
        if holders is None or len(holders) != len(requests) or any(h is None for h in holders):
            raise DataError("partition 'field' needs a 'client' field in every record")
        unknown = sorted(set(holders) - set(names))
        if unknown:
            raise DataError(
                f"records name clients {unknown}, but the federation has {n_clients}: {names}; run as many "
                f'clients as the records name (--federation-config "num-supernodes=N" in simulation), '
                f"or split the file evenly (--run-config \"partition='iid'\")"
            )
        for request, holder in zip(requests, holders):
            parts[holder].append(request)
    elif scheme == "iid":
        order = list(range(len(requests)))
        random.Random(seed).shuffle(order)
        for position, index in enumerate(order):
            parts[names[position % n_clients]].append(requests[index])
    elif scheme == "contiguous":
        for position, request in enumerate(requests):
            parts[names[position * n_clients // max(1, len(requests))]].append(request)
    elif scheme == "relation":
        parts = relation_partition(requests, n_clients, seed)
    elif scheme == "cluster":
        parts, info = cluster_partition(requests, n_clients, seed)
        log.info("cluster partition on %s embeddings: sizes %s", info["embedding"], info["sizes"])
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {list(SCHEMES)}")
    return parts


def load_partitions(
    data: str,
    n_clients: int,
    scheme: str,
    seed: int = 0,
    max_requests: int = 0,
    zsre_target: str = DEFAULT_ZSRE_TARGET,
) -> dict[str, list[EditRequest]]:
    """Read ``data`` (zsRE by ``zsre_target``) and partition it; ``max_requests`` > 0 keeps that many
    per client (first ones)."""
    path = resolve_data(data)
    requests = load_requests(path, zsre_target=zsre_target)
    holders = record_clients(path) if scheme == "field" else None
    if holders is not None and path == resolve_data("builtin"):
        holders = builtin_holders(holders, n_clients)
    parts = partition_requests(requests, n_clients, scheme, seed, holders)
    if max_requests > 0:
        parts = {name: reqs[:max_requests] for name, reqs in parts.items()}
    return parts
