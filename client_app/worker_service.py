"""The edit worker over gRPC (``fededit-worker``): a long-lived process per organisation that holds the model.

Two unary methods of the service ``fededit.EditWorker`` on a Unix socket (``unix:/path``) or a
loopback port (``127.0.0.1:PORT``): ``Health`` (is it up, what it holds) and ``Handle`` (one step,
see ``fededit_core.client.worker``). Messages are raw bytes: a length-prefixed JSON header followed by the
arrays' buffers (dtype and shape in the header; no pickle), so any size passes and nothing in a
message can run code. Steps run one at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import struct
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from fededit_core.client.worker import ClientSpec, EditWorker
from strategies.settings import MAX_MESSAGE_MB

log = logging.getLogger("fededit.worker")

SERVICE = "fededit.EditWorker"
HEADROOM_MB = 16  # the worker message's header and the step's reply around the run's largest message


def grpc_options(max_message_mb: int = MAX_MESSAGE_MB) -> list[tuple[str, int]]:
    """gRPC caps of the ClientApp-worker channel: the run's message cap plus headroom (< 2 GiB)."""
    size = min((max_message_mb + HEADROOM_MB) << 20, 2**31 - 1)
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


HEADER = struct.Struct("<Q")
ALLOWED_DTYPES = {"float16", "float32", "float64", "int32", "int64", "bool", "uint8"}  # uint8: sealed MKV sets


class WorkerStepFailed(RuntimeError):
    """A step that raised inside the edit worker: ``kind`` is the exception's class name there."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class WorkerUnavailable(RuntimeError):
    """The worker named in the node config does not answer."""


def encode(header: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """JSON header (with each array's dtype, shape and byte range) + the arrays' bytes."""
    entries, buffers, offset = [], [], 0
    for name, array in arrays.items():
        data = np.ascontiguousarray(array)
        entries.append(
            {"name": name, "dtype": data.dtype.name, "shape": list(data.shape), "offset": offset, "nbytes": data.nbytes}
        )
        buffers.append(data.tobytes())
        offset += data.nbytes
    text = json.dumps({**header, "arrays": entries}).encode()
    return HEADER.pack(len(text)) + text + b"".join(buffers)


def decode(payload: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    if len(payload) < HEADER.size:
        raise ValueError("worker message shorter than its header")
    (size,) = HEADER.unpack_from(payload)
    header = json.loads(payload[HEADER.size : HEADER.size + size])
    body = memoryview(payload)[HEADER.size + size :]
    arrays = {}
    for entry in header.pop("arrays", []):
        if entry["dtype"] not in ALLOWED_DTYPES:
            raise ValueError(f"array {entry['name']!r}: dtype {entry['dtype']!r} is not allowed")
        start, stop = entry["offset"], entry["offset"] + entry["nbytes"]
        if stop > len(body):
            raise ValueError(f"array {entry['name']!r} runs past the end of the message")
        arrays[entry["name"]] = np.frombuffer(body[start:stop], dtype=entry["dtype"]).reshape(entry["shape"]).copy()
    return header, arrays


class _Servicer:
    def __init__(self, worker: EditWorker):
        self.worker = worker

    def health(self, request: bytes, context) -> bytes:
        return encode({"status": "serving", "pid": os.getpid(), "models": len(self.worker._editors)}, {})

    def handle(self, request: bytes, context) -> bytes:
        try:
            header, arrays = decode(request)
            spec = ClientSpec.model_validate(header["spec"])
            started = time.perf_counter()
            body, out = self.worker.handle(header["op"], spec, header.get("args", {}), arrays)
            log.info(
                "%s: %s of slot %s in %.1f s",
                spec.name,
                header["op"],
                header.get("args", {}).get("slot", "-"),
                time.perf_counter() - started,
            )
            return encode({"ok": True, "body": body}, out)
        except Exception as err:  # the error goes back to the ClientApp, the worker keeps serving
            log.exception("step failed")
            return encode({"ok": False, "kind": type(err).__name__, "error": str(err)}, {})


def serve(address: str, worker: EditWorker | None = None, max_message_mb: int = MAX_MESSAGE_MB) -> grpc.Server:
    """Start serving on ``address``; returns the running server (``server.stop(None)`` ends it)."""
    if not (address.startswith("unix:") or address.split(":")[0] in ("127.0.0.1", "localhost", "[::1]")):
        raise ValueError(f"worker address {address!r}: use unix:/path or a loopback address (127.0.0.1:PORT)")
    if address.startswith("unix:"):
        path = Path(address[5:])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
    servicer = _Servicer(worker or EditWorker())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=grpc_options(max_message_mb))
    handlers = {
        "Health": grpc.unary_unary_rpc_method_handler(servicer.health),
        "Handle": grpc.unary_unary_rpc_method_handler(servicer.handle),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    old_umask = os.umask(0o077)  # the socket file: this user only
    try:
        if server.add_insecure_port(address) == 0 and not address.startswith("unix:"):
            raise OSError(f"cannot listen on {address}")
        server.start()
    finally:
        os.umask(old_umask)
    log.info("edit worker serving on %s (pid %d)", address, os.getpid())
    return server


def run_forever(address: str, preload: ClientSpec | None = None, max_message_mb: int = MAX_MESSAGE_MB) -> None:
    """Serve until SIGTERM / SIGINT; optionally load a model first."""
    worker = EditWorker()
    if preload is not None:
        worker.editor(preload)
    server = serve(address, worker, max_message_mb)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()


class RemoteWorker:
    """The ClientApp's handle on its worker."""

    def __init__(self, address: str, timeout: float | None = None, max_message_mb: int = MAX_MESSAGE_MB):
        self.address, self.timeout = address, timeout
        self.channel = grpc.insecure_channel(address, options=grpc_options(max_message_mb))
        self._health = self.channel.unary_unary(f"/{SERVICE}/Health")
        self._handle = self.channel.unary_unary(f"/{SERVICE}/Handle")

    def health(self, timeout: float = 5.0) -> dict:
        try:
            header, _ = decode(self._health(b"", timeout=timeout))
        except grpc.RpcError as err:
            raise WorkerUnavailable(
                f"edit worker at {self.address} is not answering ({err.code().name}); start it with "
                f"`fededit-worker --address {self.address}` (deploy/start_node.sh does)"
            ) from None
        return header

    def handle(self, op: str, spec: ClientSpec, args: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        self.health()
        payload = encode({"op": op, "spec": spec.model_dump(), "args": args}, arrays)
        try:
            header, out = decode(self._handle(payload, timeout=self.timeout))
        except grpc.RpcError as err:
            raise WorkerUnavailable(f"edit worker at {self.address} failed during {op!r}: {err.code().name}") from None
        if not header.get("ok"):
            raise WorkerStepFailed(str(header.get("kind", "Exception")), str(header.get("error", "")))
        return header["body"], out

    def close(self) -> None:
        self.channel.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fededit-worker",
        description="An edit worker beside a SuperNode: "
        "holds this organisation's model and answers its ClientApp's steps.",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--address", required=True, help="unix:/path/worker.sock or 127.0.0.1:PORT")
    parser.add_argument("--preload", help="load this model before serving (e.g. smollm2-135m)")
    parser.add_argument("--device", default="cpu", help="device of the preloaded model (cpu, cuda, cuda:1, auto)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument(
        "--max-message-mb",
        type=int,
        default=MAX_MESSAGE_MB,
        help="largest step taken from the ClientApp, as the run's max-message-mb (default %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``fededit-worker``: a long-lived edit worker (deployment)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("fededit").setLevel(logging.INFO)
    preload = None
    if args.preload:
        preload = ClientSpec(
            run="preload",
            name="preload",
            model=args.preload,
            device=args.device,
            dtype=args.dtype,
            requests="builtin",
            state_dir=".",
        )
    run_forever(args.address, preload, args.max_message_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
