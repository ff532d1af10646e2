"""Sealed MKVs open only for the federation's key and only in the context they were sealed for."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fededit_core.fedleke.mkv import MKVSet
from fededit_core.fedleke.sealing import KeyRing, SealContext, SealError, key_proof, sealed_length

D, D_FF, LAYERS = 8, 12, (1, 2)
SECRET, OTHER = b"s" * 32, b"o" * 32


def mkvs(n: int = 3, sender: str = "a", slot: int = 0) -> MKVSet:
    g = torch.Generator().manual_seed(n)
    z, delta = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    keys = torch.randn(n, len(LAYERS), D_FF, generator=g)
    return MKVSet([f"{sender}/{slot}/{i}" for i in range(n)], LAYERS, z, delta, keys)


def context(s: MKVSet, sender: str = "a", slot: int = 0) -> SealContext:
    return SealContext("run", sender, slot, tuple(s.ids), LAYERS, "fp", D, D_FF)


def test_a_sealed_set_opens_to_itself_and_its_length_is_known_from_the_count():
    s = mkvs()
    blob = KeyRing([SECRET]).seal(s, context(s))
    assert len(blob) == sealed_length(3, D, D_FF, len(LAYERS))
    opened = KeyRing([SECRET]).open(blob, context(s))
    assert opened.ids == s.ids and torch.equal(opened.z, s.z) and torch.equal(opened.keys, s.keys)
    assert torch.equal(opened.delta, s.delta)
    assert s.z.numpy().tobytes() not in blob  # the plaintext is not in the blob


def test_every_blob_has_its_own_nonce():
    s = mkvs()
    ring = KeyRing([SECRET])
    assert ring.seal(s, context(s)) != ring.seal(s, context(s))


def test_a_tampered_byte_anywhere_is_refused():
    s = mkvs()
    blob = KeyRing([SECRET]).seal(s, context(s))
    for position in (4, 12, 20, 30, len(blob) - 1):  # key id, nonce, ciphertext, tag
        bad = bytearray(blob)
        bad[position] ^= 1
        with pytest.raises(SealError):
            KeyRing([SECRET]).open(bytes(bad), context(s))


@pytest.mark.parametrize(
    "change",
    [{"run": "other"}, {"sender": "b"}, {"slot": 1}, {"fingerprint": "fp2"}, {"ids": ("a/0/1", "a/0/0", "a/0/2")}],
)
def test_a_blob_relabelled_or_replayed_in_another_context_does_not_open(change):
    s = mkvs()
    blob = KeyRing([SECRET]).seal(s, context(s))
    with pytest.raises(SealError, match="does not open"):
        KeyRing([SECRET]).open(blob, dataclasses.replace(context(s), **change))


def test_a_blob_of_another_length_is_refused_before_decryption():
    s = mkvs()
    blob = KeyRing([SECRET]).seal(s, context(s))
    with pytest.raises(SealError, match="MKVs is [0-9]+ bytes, this one"):
        KeyRing([SECRET]).open(blob[:-1], context(s))


def test_another_secret_cannot_open_and_a_rotated_ring_still_opens_old_blobs():
    s = mkvs()
    old = KeyRing([SECRET]).seal(s, context(s))
    with pytest.raises(SealError, match="does not hold"):
        KeyRing([OTHER]).open(old, context(s))
    rotated = KeyRing([OTHER, SECRET])  # the new secret first, the retired one kept for old blobs
    assert torch.equal(rotated.open(old, context(s)).z, s.z)
    new = rotated.seal(s, context(s))
    with pytest.raises(SealError, match="does not hold"):
        KeyRing([SECRET]).open(new, context(s))


def test_key_proofs_match_exactly_for_one_secret():
    assert key_proof(SECRET, "run", "n1") == key_proof(SECRET, "run", "n1")
    assert key_proof(SECRET, "run", "n1") != key_proof(OTHER, "run", "n1")
    assert key_proof(SECRET, "run", "n1") != key_proof(SECRET, "run", "n2")
