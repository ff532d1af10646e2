"""One federated edit from start to end, on any transport: handshake, time slots, evaluation, report.

``run_federation`` is what the ServerApp runs (with Flower messages as the transport) and what the
fast tests run (with in-process workers); nothing here imports Flower.
"""

from __future__ import annotations

import logging
from typing import Callable

from tqdm import tqdm

from .base import Strategy
from .collabedit import CollabEdit
from .editavg import EditAvg
from .fededit import FedEdit
from .handshake import check_agreement
from .local import Local
from .report import build_report
from .session import FederationError, Session, Transport
from .settings import RunSettings
from .store import MKVStore
from .validation import FederationSpec

log = logging.getLogger("fededit.server")


def make_strategy(settings: RunSettings, spec: FederationSpec, store: MKVStore | None) -> Strategy:
    if settings.strategy in ("fededit", "fededit-noreedit"):
        return FedEdit(
            spec,
            settings.run,
            store,
            settings.alpha,
            gate=settings.strategy == "fededit",
            reuse=settings.reuse,
            vector=settings.vector,
        )
    if settings.strategy == "collabedit":
        return CollabEdit(spec, settings.run, secure=settings.secure_aggregation)
    return {"editavg": EditAvg, "local": Local}[settings.strategy](spec, settings.run)


# (hellos by client) -> {client: metrics of the centralised edit on that client's requests}
Centralised = Callable[[dict[str, dict]], dict[str, dict]]


def run_federation(
    transport: Transport,
    clients: list[str],
    settings: RunSettings,
    config: dict,
    centralised: Centralised | None = None,
    progress: bool = True,
) -> dict:
    """Run every time slot and return the report (see ``strategies.report``)."""
    session = Session(transport, sorted(clients), settings.min_clients, settings.max_slot_mb << 20)
    if len(session.active) < settings.min_clients:
        raise FederationError(
            f"{len(clients)} client(s) connected, the run needs at least {settings.min_clients} (min-clients)"
        )
    hellos = {c: r.body for c, r in session.broadcast("hello", phase="handshake").items()}
    spec, left_out = check_agreement(hellos, settings.num_slots)
    for client, reason in left_out.items():
        session.reject(client, f"client {client}: handshake refused: {reason}")
        del hellos[client]
    kind = next(iter(hellos.values()))["kind"]
    log.info("%d clients agree on model %s, layers %s", len(hellos), spec.fingerprint, list(spec.layers))

    store = None
    if settings.strategy.startswith("fededit"):
        store = MKVStore(settings.mkv_store)
    strategy = make_strategy(settings, spec, store)
    starts = {h["next_slot"] for h in hellos.values()}
    if len(starts) > 1 and not settings.strategy.startswith("fededit"):
        raise FederationError(f"cannot resume {settings.strategy}: clients stopped at different slots {sorted(starts)}")
    first = min(starts)
    if first:
        log.info("resuming run %s at slot %d", settings.run, first)
    try:
        for slot in tqdm(
            range(first, settings.num_slots),
            desc=f"{strategy.name} time slots",
            disable=not progress,
            initial=first,
            total=settings.num_slots,
        ):
            session.slot = slot
            strategy.run_slot(slot, session)
        session.slot = -1
        evaluations = {
            c: r.body
            for c, r in session.broadcast(
                "evaluate",
                {
                    "others": strategy.absorbed,
                    "fluency": settings.fluency,
                    "baseline": settings.baseline,
                    "others_limit": settings.others_limit,
                },
                phase="evaluate",
            ).items()
        }
        central = centralised(hellos) if centralised else None
        summary = strategy.summary()
    finally:
        if store is not None:
            store.close()
    return build_report(
        settings.run, strategy.name, config, kind, evaluations, session.ledgers, session.seconds, central, summary
    )
