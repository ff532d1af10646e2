"""One federated edit from start to end, on any transport: handshake, time slots, evaluation, report.

``run_federation`` is what the ServerApp runs (with Flower messages as the transport) and what the
fast tests run (with in-process workers); nothing here imports Flower.
"""

from __future__ import annotations

import logging
import secrets
from typing import Callable

from tqdm import tqdm

from .aggregate import MERGES
from .base import Strategy
from .collabedit import CollabEdit
from .editavg import EditAvg, EditAvgFactors, MergedUpdates
from .fededit import FedEdit
from .handshake import check_agreement
from .local import Local
from .report import build_report
from .session import FederationError, Session, Transport
from .settings import RunSettings
from .store import MKVStore, SlotProgress
from .validation import FederationSpec

log = logging.getLogger("fededit.server")


def make_strategy(settings: RunSettings, spec: FederationSpec, store: MKVStore | None = None) -> Strategy:
    if settings.strategy in ("fededit", "fededit-noreedit"):
        return FedEdit(
            spec,
            settings.run,
            store,
            settings.alpha,
            gate=settings.gate if settings.strategy == "fededit" else "none",
            reuse=settings.reuse,
            vector=settings.vector,
            seal=settings.seal_mkvs,
            tau=settings.probe_tau,
        )
    if settings.strategy == "collabedit":
        return CollabEdit(
            spec,
            settings.run,
            settings.collab_transport,
            secure=settings.secure_aggregation,
            store=store,
            betas=(settings.collab_beta0, settings.collab_beta1),
            dedup=settings.collab_dedup,
            conflict=settings.collab_conflict,
        )
    if settings.strategy in MERGES:
        return MergedUpdates(settings.strategy, spec, settings.run, store)
    return {"editavg": EditAvg, "editavg-factors": EditAvgFactors, "local": Local}[settings.strategy](
        spec, settings.run, store
    )


def resume_point(strategy: Strategy, progress: SlotProgress | None, starts: dict[str, int]) -> int:
    """The slot to run first: where the server's recorded progress stopped, checked against the slot
    each client will edit next (``starts``); FedEdit may go back to a client that is behind."""
    fededit = strategy.name.startswith("fededit")
    if progress is None:  # a new run, or a store from before progress was recorded
        if len(set(starts.values())) > 1 and not fededit:
            raise FederationError(
                f"cannot resume {strategy.name}: clients stopped at different slots {sorted(set(starts.values()))}"
            )
        return min(starts.values())
    if progress.strategy != strategy.name:
        raise FederationError(
            f"run {strategy.run!r} was started with strategy {progress.strategy!r}, not {strategy.name!r}: "
            "give this run another run-name"
        )
    for client, start in sorted(starts.items()):  # within a slot a client may be one step ahead
        if start > progress.slot + 1 or (start < progress.slot and not fededit):
            raise FederationError(
                f"client {client} will edit slot {start} next but the server's run stopped in slot "
                f"{progress.slot}: its checkpoint is not from this run (another state-dir or run-name?)"
            )
    return min(progress.slot, *starts.values())


# (hellos by client) -> {client: metrics of the centralised edit on that client's requests}
Centralised = Callable[[dict[str, dict]], dict[str, dict]]


def run_federation(
    transport: Transport,
    clients: list[str],
    settings: RunSettings,
    config: dict,
    centralised: Centralised | None = None,
    progress: bool = True,
    after_slot: Callable[[int], None] | None = None,
) -> dict:
    """Run every time slot and return the report (see ``strategies.report``); ``after_slot(slot)`` is
    called after each slot (simulation: a benchmark reads the clients' models there)."""
    session = Session(transport, sorted(clients), settings.min_clients, settings.max_slot_mb << 20)
    if len(session.active) < settings.min_clients:
        raise FederationError(
            f"{len(clients)} client(s) connected, the run needs at least {settings.min_clients} (min-clients)"
        )
    nonce = secrets.token_hex(16)  # the clients prove they hold one federation secret (handshake.py)
    hellos = {c: r.body for c, r in session.broadcast("hello", {"nonce": nonce}, phase="handshake").items()}
    spec, left_out = check_agreement(hellos, settings.num_slots)
    for client, reason in left_out.items():
        session.reject(client, f"client {client}: handshake refused: {reason}")
        del hellos[client]
    if (
        settings.strategy.startswith("fededit")
        and settings.seal_mkvs
        and next(iter(hellos.values())).get("key_proof") is None
    ):
        raise FederationError(
            "the run seals MKVs (seal-mkvs = true) but no client holds a federation secret (secret-file in "
            "each node config; deploy/README.md, 'One secret')"
        )
    kind = next(iter(hellos.values()))["kind"]
    log.info("%d clients agree on model %s, layers %s", len(hellos), spec.fingerprint, list(spec.layers))

    store = MKVStore(settings.mkv_store)
    try:
        strategy = make_strategy(settings, spec, store)
        recorded = store.progress(settings.run, spec.fingerprint)
        first = resume_point(strategy, recorded, {c: h["next_slot"] for c, h in hellos.items()})
        if recorded is not None:
            strategy.restore(recorded.state)
            for client, reason in recorded.state.get("left", {}).items():
                if client in session.active:  # it left before the restart: it stays out
                    session.drop(client, f"left the run before the server restarted: {reason}")
        if first or (recorded is not None and recorded.phase != "start"):
            phase = recorded.phase if recorded is not None else "start"
            log.info("resuming run %s at slot %d (phase %s)", settings.run, first, phase)
        for slot in tqdm(
            range(first, settings.num_slots),
            desc=f"{strategy.name} time slots",
            disable=not progress,
            initial=first,
            total=settings.num_slots,
        ):
            session.slot = slot
            inside = recorded if recorded is not None and recorded.slot == slot else None
            strategy.run_slot(slot, session, inside)
            if after_slot is not None:
                after_slot(slot)
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
                    "per_request": settings.per_request,
                },
                phase="evaluate",
            ).items()
        }
        central = centralised(hellos) if centralised else None
        summary = strategy.summary()
    finally:
        store.close()
    return build_report(
        settings.run, strategy.name, config, kind, evaluations, session.ledgers, session.seconds, central, summary
    )
