"""One run's conversation with its clients, independent of the transport (Flower or direct calls).

A strategy sends ``Instruction``s (a step name, JSON arguments, numpy arrays) to clients through
``Session.exchange`` and gets ``Reply``s back. The session counts the bytes each way per client and
slot, checks every reply against its step's schema (``replies``), drops clients whose step failed
and rejects (tells, then drops) clients whose reply is malformed; the run goes on while at least
``min_clients`` remain.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .replies import ReplyError, parse_error, parse_reply

log = logging.getLogger("fededit.server")


class FederationError(RuntimeError):
    """The run cannot go on (mismatched clients, too few clients left)."""


@dataclass
class Instruction:
    op: str
    args: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Reply:
    client: str
    body: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    malformed: bool = False  # the message itself could not be decoded (the sender's fault)


# (instructions by client) -> replies by client; a transport failure is a Reply with ``error``
Transport = Callable[[dict[str, Instruction]], dict[str, Reply]]


SECURE_SUM_RANGE = 8.0  # a secure sum's inputs lie in [-8, 8] (SecAgg+'s clipping range; callers scale)


@dataclass
class SecureSum:
    """What a transport's ``secure_sum(instructions, names)`` returns: the sums by array name, the
    clients whose arrays are in them, the errors of the others, and (sent, received) bytes by client."""

    sums: dict[str, np.ndarray]
    contributors: list[str]
    errors: dict[str, str] = field(default_factory=dict)
    bytes: dict[str, tuple[int, int]] = field(default_factory=dict)


def payload_bytes(body: dict, arrays: dict[str, np.ndarray]) -> int:
    """Bytes of a message's content: its JSON arguments plus its arrays."""
    return len(json.dumps(body).encode()) + sum(int(np.asarray(a).nbytes) for a in arrays.values())


@dataclass
class ClientLedger:
    """What the server saw of one client: bytes per slot and step reports."""

    sent: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # server -> client, by slot
    received: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # client -> server
    failed: str | None = None

    def bytes_by_slot(self) -> list[dict]:
        slots = sorted(set(self.sent) | set(self.received))
        return [
            {"slot": s, "sent_to_server": self.received.get(s, 0), "received_from_server": self.sent.get(s, 0)}
            for s in slots
        ]


class Session:
    def __init__(self, transport: Transport, clients: list[str], min_clients: int = 1, max_slot_bytes: int = 1 << 30):
        self.transport, self.max_slot_bytes = transport, max_slot_bytes
        self.active = list(clients)
        self.min_clients = min_clients
        self.ledgers = {c: ClientLedger() for c in clients}
        self.slot = -1  # -1: handshake and evaluation
        self.seconds: dict[str, float] = defaultdict(float)  # server wall time per phase

    def exchange(self, instructions: dict[str, Instruction], phase: str = "other") -> dict[str, Reply]:
        """Send, receive, account; failed clients are dropped and left out of the result."""
        instructions = {c: i for c, i in instructions.items() if c in self.active}
        if not instructions:
            return {}
        started = time.perf_counter()
        for client, instruction in instructions.items():
            self.ledgers[client].sent[self.slot] += payload_bytes(
                {"op": instruction.op, **instruction.args}, instruction.arrays
            )
        replies = self.transport(instructions)
        ok: dict[str, Reply] = {}
        for client in instructions:
            op = instructions[client].op
            reply = replies.get(client) or Reply(client, error="no reply")
            self.ledgers[client].received[self.slot] += payload_bytes(reply.body, reply.arrays)
            try:
                if reply.malformed:
                    raise ReplyError(reply.error)
                if self.ledgers[client].received[self.slot] > self.max_slot_bytes:
                    raise ReplyError(f"more than the {self.max_slot_bytes >> 20} MB a client may send in one slot")
                error = reply.error or parse_error(reply.body)
                if error is None:
                    ok[client] = Reply(client, parse_reply(op, reply.body, reply.arrays), reply.arrays)
            except ReplyError as err:
                self.reject(client, f"client {client}: malformed reply to {op!r}: {err}")
                continue
            if error is not None:
                self.drop(client, f"step {op!r} failed: {error}")
        self.seconds[phase] += time.perf_counter() - started
        return ok

    def broadcast(
        self, op: str, args: dict | None = None, arrays: dict | None = None, phase: str = "other"
    ) -> dict[str, Reply]:
        """The same instruction to every active client."""
        return self.exchange({c: Instruction(op, dict(args or {}), dict(arrays or {})) for c in self.active}, phase)

    def secure_sum(
        self, instructions: dict[str, Instruction], names: tuple[str, ...], phase: str = "other"
    ) -> dict[str, np.ndarray]:
        """Elementwise sums of the arrays ``names`` that the clients return for ``instructions``,
        through secure aggregation: the server learns only the sums. The transport must offer
        ``secure_sum`` (the Flower transport does, with SecAgg+); a client left out of the sum is dropped."""
        method = getattr(self.transport, "secure_sum", None)
        if method is None:
            raise FederationError(
                f"secure aggregation needs a transport that offers it (Flower's SecAgg+); "
                f"{type(self.transport).__name__} does not"
            )
        instructions = {c: i for c, i in instructions.items() if c in self.active}
        if len(instructions) < 2:
            raise FederationError(f"secure aggregation needs at least 2 clients, {len(instructions)} left")
        started = time.perf_counter()
        result = method(instructions, names)
        for client, (sent, received) in result.bytes.items():
            self.ledgers[client].sent[self.slot] += sent
            self.ledgers[client].received[self.slot] += received
        for client in sorted(set(instructions) - set(result.contributors)):
            self.drop(client, f"left out of the secure sum: {result.errors.get(client, 'no masked reply')}")
        self.seconds[phase] += time.perf_counter() - started
        return result.sums

    def drop(self, client: str, reason: str) -> None:
        log.error("client %s leaves the run: %s", client, reason)
        if client in self.active:
            self.active.remove(client)
        self.ledgers[client].failed = reason
        if len(self.active) < self.min_clients:
            raise FederationError(
                f"only {len(self.active)} client(s) left ({self.active}), fewer than the "
                f"minimum of {self.min_clients}; last failure: {client}: {reason}"
            )

    def reject(self, client: str, error: str) -> None:
        """A bad upload or reply: log it, tell the client (whatever it answers), go on without it."""
        log.error("rejected: %s", error)
        try:
            self.transport({client: Instruction("rejected", {"error": error[:2000]})})
        except Exception as err:  # the notice is a courtesy: a failing transport must not stop the run
            log.error("could not tell %s of its rejection: %s", client, type(err).__name__)
        self.drop(client, f"upload rejected: {error}")
