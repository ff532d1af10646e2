"""Sealed MKVs: a set encrypted by its sender for the other members, opaque to the server.

The members share a federation secret that the server never holds (``fedleke/tags.py`` keys its
request tags with it). From it:

    key    = HKDF-SHA256(secret, info = "fededit mkv seal v1"), 32 bytes (AES-256)
    key id = HMAC-SHA256(secret, "fededit key id")[:8]          (public: names the key, not it)
    blob   = MAGIC | key id | nonce | AES-256-GCM(key, nonce, payload, aad)
    payload = z (n, d) | delta (n, d) | keys (n, |R|, d_ff) | corrections (n, |R|, d),
              little-endian float32, row-major
    aad     = canonical JSON of (run, sender, slot, ids, layers, fingerprint, d, d_ff)

so ``len(blob) = HEADER + 4 n (2 d + |R| (d_ff + d)) + TAG`` and the server can check a blob's length
against the declared count and the federation's shapes, and nothing else. The associated data binds
the blob to its run, sender, slot and ids: a blob the server swaps, replays under other ids or
re-labels does not open. Nonces are 96 random bits per blob (``os.urandom``), within NIST SP
800-38D's limit of 2^32 blobs per key for random nonces, far beyond any federation. Rotation: a ``KeyRing`` seals with its newest
secret and opens with any of its secrets, found by the key id in the blob.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fededit_core.fedleke.mkv import MKVSet

MAGIC = b"FEs2"
KEY_ID_BYTES, NONCE_BYTES, TAG_BYTES = 8, 12, 16
HEADER = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES


class SealError(ValueError):
    """A blob that does not open: wrong key, tampered, or bound to another run, sender, slot or ids.
    Its message holds no MKV content."""


def key_id(secret: bytes) -> str:
    """The public name of a secret (16 hex digits)."""
    return hmac.new(secret, b"fededit key id", hashlib.sha256).digest()[:KEY_ID_BYTES].hex()


def key_proof(secret: bytes, run: str, nonce: str) -> str:
    """What a client answers to the server's handshake nonce: HMAC-SHA256(secret, run | nonce).
    Equal proofs mean equal secrets; the server learns nothing else of the secret."""
    return hmac.new(secret, f"fededit key proof\x1f{run}\x1f{nonce}".encode(), hashlib.sha256).hexdigest()


def _seal_key(secret: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fededit mkv seal v1").derive(secret)


def sealed_length(n: int, d_model: int, d_ff: int, n_layers: int) -> int:
    """Bytes of the blob of ``n`` MKVs."""
    return HEADER + 4 * n * (2 * d_model + n_layers * (d_ff + d_model)) + TAG_BYTES


def blob_problem(blob: bytes, n: int, d_model: int, d_ff: int, n_layers: int) -> str | None:
    """What is visibly wrong with a sealed set of ``n`` MKVs (its length, its magic), or None: all
    that a party without the secret (the server) can check."""
    expected = sealed_length(n, d_model, d_ff, n_layers)
    if len(blob) != expected:
        return f"a sealed set of {n} MKVs is {expected} bytes, this one {len(blob)}"
    if blob[: len(MAGIC)] != MAGIC:
        return "not a sealed MKV set (its first bytes are not the format's magic)"
    return None


def set_ids(sender: str, slot: int, n: int) -> tuple[str, ...]:
    """The ids of a sender's set of ``n`` MKVs in ``slot`` (the only ids the server stores for it)."""
    return tuple(f"{sender}/{slot}/{i}" for i in range(n))


@dataclass(frozen=True)
class SealContext:
    """What a blob is bound to (its associated data): all of it known to sender and receiver."""

    run: str
    sender: str
    slot: int
    ids: tuple[str, ...]
    layers: tuple[int, ...]
    fingerprint: str
    d_model: int
    d_ff: int

    def aad(self) -> bytes:
        fields = {**self.__dict__, "ids": list(self.ids), "layers": list(self.layers)}
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


class KeyRing:
    """The federation's secrets, newest first: seals with the newest, opens with any."""

    def __init__(self, secrets: list[bytes]):
        if not secrets or any(len(s) < 16 for s in secrets):
            raise ValueError("a key ring needs at least one federation secret of at least 16 bytes")
        self.secrets = list(secrets)
        self.keys = {key_id(s): _seal_key(s) for s in self.secrets}
        self.current = key_id(self.secrets[0])

    def seal(self, mkvs: MKVSet, context: SealContext) -> bytes:
        if tuple(mkvs.ids) != context.ids or tuple(mkvs.layers) != context.layers:
            raise ValueError("the seal context must name the set's own ids and layers")
        payload = b"".join(
            np.ascontiguousarray(t.detach().cpu().float().numpy(), dtype="<f4").tobytes()
            for t in (mkvs.z, mkvs.delta, mkvs.keys, mkvs.wire_corrections())
        )
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.keys[self.current]).encrypt(nonce, payload, context.aad())
        return MAGIC + bytes.fromhex(self.current) + nonce + sealed

    def open(self, blob: bytes, context: SealContext) -> MKVSet:
        """The set sealed in ``blob`` for ``context``, or SealError."""
        n, d, d_ff, layers = len(context.ids), context.d_model, context.d_ff, len(context.layers)
        problem = blob_problem(blob, n, d, d_ff, layers)
        if problem:
            raise SealError(problem)
        kid = blob[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES].hex()
        if kid not in self.keys:
            raise SealError(f"sealed under key {kid}, which this client does not hold")
        nonce = blob[len(MAGIC) + KEY_ID_BYTES : HEADER]
        try:
            payload = AESGCM(self.keys[kid]).decrypt(nonce, blob[HEADER:], context.aad())
        except InvalidTag:
            raise SealError("the sealed set does not open: tampered, or bound to another run, sender, slot or ids")
        values = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        z, delta, keys, corrections = np.split(values, [n * d, 2 * n * d, 2 * n * d + n * layers * d_ff])
        return MKVSet(
            list(context.ids),
            context.layers,
            torch.from_numpy(z.reshape(n, d).copy()),
            torch.from_numpy(delta.reshape(n, d).copy()),
            torch.from_numpy(keys.reshape(n, layers, d_ff).copy()),
            torch.from_numpy(corrections.reshape(n, layers, d).copy()),
        )
