"""Server-side checks of every upload before it is stored or aggregated.

An upload is a dict of numpy arrays plus metadata (its reply already fits the step's schema,
``replies``). It is accepted only if it has exactly the expected array names, shapes that fit the
federation's model (d, d_ff, edited layers), a floating dtype, values finite in float32 (what every
receiver computes in), the sender's own request ids and count for that slot, and the federation's
model fingerprint; K K^T must also be symmetric positive semi-definite. Anything else raises
``UploadError`` naming the client and the problem; nothing is stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fededit_core.fedleke.bounds import correction_bound_violations, shift_bound_violations, shift_limit
from fededit_core.fedleke.mkv import WIRE_ARRAYS
from fededit_core.fedleke.sealing import blob_problem
from fededit_core.fedleke.tags import TAG_PATTERN
from fededit_core.memit.update import positive_semidefinite

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


class UploadError(ValueError):
    pass


@dataclass(frozen=True)
class FederationSpec:
    """What every upload of a run must agree with."""

    fingerprint: str
    d_model: int
    d_ff: int
    layers: tuple[int, ...]
    max_items: int = 10_000
    slot_sizes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # requests per client and slot
    clamp_norm_factor: float | None = None  # MEMIT's clamp of the shared settings: bounds every delta

    def slot_size(self, client: str, slot: int) -> int | None:
        sizes = self.slot_sizes.get(client)
        return sizes[slot] if sizes is not None and 0 <= slot < len(sizes) else None


def _check_array(client: str, name: str, array, shape: tuple) -> None:
    if not isinstance(array, np.ndarray):
        raise UploadError(f"client {client}: array {name!r} is not an array ({type(array).__name__})")
    if array.dtype.type not in FLOAT_DTYPES:
        raise UploadError(f"client {client}: array {name!r} has dtype {array.dtype}, expected a float type")
    if array.ndim != len(shape) or any(e is not None and e != s for e, s in zip(shape, array.shape)):
        expected = "(" + ", ".join("n" if e is None else str(e) for e in shape) + ")"
        raise UploadError(f"client {client}: array {name!r} has shape {tuple(array.shape)}, expected {expected}")
    with np.errstate(over="ignore"):
        finite = np.isfinite(array.astype(np.float32, copy=False)).all()
    if not finite:
        raise UploadError(f"client {client}: array {name!r} holds NaN or values that are infinite in float32")


def _check_names(client: str, arrays: dict, expected: set[str]) -> None:
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise UploadError(
            f"client {client}: arrays {sorted(arrays)} do not match the expected "
            f"{sorted(expected)} (missing {missing}, unexpected {extra})"
        )


def check_fingerprint(client: str, fingerprint: str, spec: FederationSpec) -> None:
    if fingerprint != spec.fingerprint:
        raise UploadError(
            f"client {client}: model fingerprint {fingerprint!r} differs from the federation's "
            f"{spec.fingerprint!r} (not the same base model)"
        )


TAG = re.compile(TAG_PATTERN)  # an HMAC-SHA256 request tag (fededit_core.fedleke.tags)


def check_layers(client: str, layers, spec: FederationSpec) -> None:
    """A 1-D integer array equal to the federation's edited layers."""
    if (
        not isinstance(layers, np.ndarray)
        or layers.ndim != 1
        or layers.dtype.kind not in "iu"
        or tuple(int(x) for x in layers) != spec.layers
    ):
        shown = layers.tolist() if isinstance(layers, np.ndarray) and layers.size <= 64 else "another list"
        raise UploadError(f"client {client}: MKVs are for layers {shown}, the federation edits {list(spec.layers)}")


def check_count(client: str, n: int, spec: FederationSpec, slot: int | None) -> None:
    """At most the client's declared number of requests in ``slot`` (and the upload limit)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= spec.max_items:
        raise UploadError(f"client {client}: count {n!r} is not an integer in [0, {spec.max_items}]")
    declared = spec.slot_size(client, slot) if slot is not None else None
    if declared is not None and n > declared:
        raise UploadError(f"client {client}: {n} edits in slot {slot}, but it declared {declared} requests there")


def _check_ids(client: str, ids, tags, spec: FederationSpec, slot: int | None) -> int:
    """Distinct non-empty ids (with ``slot``: ``<client>/<slot>/<i>`` for i = 0..n-1, n at most its
    declared slot size) and one tag (64 hex digits, or "") per id. Returns n."""
    if not isinstance(ids, list):
        raise UploadError(f"client {client}: the upload has no list of ids")
    if tags is not None and (
        not isinstance(tags, list) or len(tags) != len(ids) or any(t and not TAG.match(str(t)) for t in tags)
    ):
        raise UploadError(f"client {client}: tags must be one 64-hex-digit string (or '') per id")
    n = len(ids)
    if n > spec.max_items:
        raise UploadError(f"client {client}: {n} MKVs exceed the limit of {spec.max_items} per upload")
    if len(set(ids)) != n or not all(isinstance(i, str) and i for i in ids):
        raise UploadError(f"client {client}: request ids must be distinct non-empty strings")
    if slot is not None:
        check_count(client, n, spec, slot)
        if ids != [f"{client}/{slot}/{i}" for i in range(n)]:
            raise UploadError(f"client {client}: the ids of slot {slot} must be {client}/{slot}/0, /1, ... in order")
    return n


def validate_mkv_upload(
    client: str,
    fingerprint: str,
    ids: list[str],
    arrays: dict,
    spec: FederationSpec,
    tags: list[str] | None = None,
    slot: int | None = None,
) -> int:
    """An MKV upload: z and delta (n, d), keys (n, |R|, d_ff), corrections (n, |R|, d), layers (|R|,),
    and optionally one tag per id (``_check_ids``); delta and the corrections within the federation's
    bounds. Returns n."""
    check_fingerprint(client, fingerprint, spec)
    _check_names(client, arrays, {*WIRE_ARRAYS, "layers"})
    n = _check_ids(client, ids, tags, spec, slot)
    check_layers(client, arrays["layers"], spec)
    _check_array(client, "z", arrays["z"], (n, spec.d_model))
    _check_array(client, "delta", arrays["delta"], (n, spec.d_model))
    _check_array(client, "keys", arrays["keys"], (n, len(spec.layers), spec.d_ff))
    _check_array(client, "corrections", arrays["corrections"], (n, len(spec.layers), spec.d_model))
    if spec.clamp_norm_factor is not None:
        z, delta = (torch.from_numpy(arrays[k].astype(np.float64)) for k in ("z", "delta"))
        bad = shift_bound_violations(z, delta, spec.clamp_norm_factor)
        if bad:
            raise UploadError(
                f"client {client}: {len(bad)} shift(s) delta beyond {shift_limit(spec.clamp_norm_factor):g} "
                "|z - delta| (fedleke/bounds.py)"
            )
        corrections = torch.from_numpy(arrays["corrections"].astype(np.float64))
        bad = correction_bound_violations(z, delta, corrections, spec.clamp_norm_factor)
        if bad:
            raise UploadError(
                f"client {client}: {len(bad)} correction(s) beyond {2 * shift_limit(spec.clamp_norm_factor):g} "
                "|z - delta| (fedleke/bounds.py)"
            )
    return n


def validate_sealed_upload(
    client: str, fingerprint: str, ids: list[str], arrays: dict, spec: FederationSpec, tags=None, slot: int = 0
) -> bytes:
    """A sealed MKV upload (``fedleke/sealing.py``): one byte array ``sealed`` whose length is that of
    n sealed MKVs of the federation's shapes and that starts with the format's magic, plus the ids
    and tags of ``_check_ids``. What the blob holds only the members can check. Returns the blob."""
    check_fingerprint(client, fingerprint, spec)
    _check_names(client, arrays, {"sealed"})
    n = _check_ids(client, ids, tags, spec, slot)
    blob = arrays["sealed"]
    if not isinstance(blob, np.ndarray) or blob.dtype != np.uint8 or blob.ndim != 1:
        raise UploadError(f"client {client}: a sealed set is one 1-D array of bytes")
    problem = blob_problem(blob.tobytes(), n, spec.d_model, spec.d_ff, len(spec.layers))
    if problem:
        raise UploadError(f"client {client}: {problem}")
    return blob.tobytes()


def validate_delta_upload(client: str, fingerprint: str, arrays: dict, spec: FederationSpec, layers=None) -> None:
    """An EditAvg upload: one weight update ``delta.<layer>`` (d, d_ff) per edited layer."""
    check_fingerprint(client, fingerprint, spec)
    layers = spec.layers if layers is None else layers
    _check_names(client, arrays, {f"delta.{l}" for l in layers})
    for layer in layers:
        _check_array(client, f"delta.{layer}", arrays[f"delta.{layer}"], (spec.d_model, spec.d_ff))


def validate_factor_upload(client: str, fingerprint: str, arrays: dict, spec: FederationSpec, n: int) -> None:
    """An ``editavg-factors`` upload: per edited layer A (d_ff, n) and R (d, n), n its edit count."""
    check_fingerprint(client, fingerprint, spec)
    _check_names(client, arrays, {f"factor_{x}.{l}" for l in spec.layers for x in "kr"})
    for layer in spec.layers:
        _check_array(client, f"factor_k.{layer}", arrays[f"factor_k.{layer}"], (spec.d_ff, n))
        _check_array(client, f"factor_r.{layer}", arrays[f"factor_r.{layer}"], (spec.d_model, n))


def validate_stats_upload(client: str, fingerprint: str, arrays: dict, spec: FederationSpec, layer: int) -> None:
    """A CollabEdit upload for one layer: R K^T (d, d_ff) and K K^T (d_ff, d_ff), symmetric."""
    check_fingerprint(client, fingerprint, spec)
    if layer not in spec.layers:
        raise UploadError(f"client {client}: layer {layer} is not edited by this federation {list(spec.layers)}")
    _check_names(client, arrays, {"rk", "kk"})
    _check_array(client, "rk", arrays["rk"], (spec.d_model, spec.d_ff))
    _check_array(client, "kk", arrays["kk"], (spec.d_ff, spec.d_ff))
    kk = arrays["kk"].astype(np.float64)
    scale = max(1.0, float(np.abs(kk).max(initial=0.0)))
    if not np.allclose(kk, kk.T, rtol=1e-4, atol=1e-6 * scale):
        raise UploadError(f"client {client}: K K^T of layer {layer} is not symmetric")
    if not positive_semidefinite(kk):
        raise UploadError(f"client {client}: K K^T of layer {layer} is not positive semi-definite")


def validate_thin_factor_upload(
    client: str, fingerprint: str, arrays: dict, spec: FederationSpec, layer: int, slot: int
) -> None:
    """A CollabEdit upload for one layer in thin factors: K V (d_ff, r) and R V (d, r), r at most the
    client's requests in the slot (the rank of its K) and at most d_ff."""
    check_fingerprint(client, fingerprint, spec)
    if layer not in spec.layers:
        raise UploadError(f"client {client}: layer {layer} is not edited by this federation {list(spec.layers)}")
    _check_names(client, arrays, {"kf", "rf"})
    _check_array(client, "kf", arrays["kf"], (spec.d_ff, None))
    _check_array(client, "rf", arrays["rf"], (spec.d_model, None))
    width, bound = arrays["kf"].shape[1], spec.slot_size(client, slot)
    bound = spec.d_ff if bound is None else min(bound, spec.d_ff)
    if arrays["rf"].shape[1] != width or width > bound:
        raise UploadError(
            f"client {client}: its factors of layer {layer} must have one width <= {bound}, "
            f"got {width} and {arrays['rf'].shape[1]}"
        )


def validate_sealed_stats(client: str, body: dict, spec: FederationSpec) -> float:
    """A CollabEdit reply under secure aggregation: no arrays (they travel masked, through SecAgg+),
    only the model fingerprint and the largest |value| of its statistics, which sets the scale."""
    check_fingerprint(client, str(body.get("fingerprint")), spec)
    value = body.get("max_abs")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise UploadError(f"client {client}: max_abs of its statistics must be a finite number >= 0, got {value!r}")
    return float(value)
