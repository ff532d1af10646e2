"""Server-side checks of every upload before it is stored or aggregated.

An upload is a dict of numpy arrays plus metadata. It is accepted only if it has exactly the
expected array names, shapes that fit the federation's model (d, d_ff, edited layers), a floating
dtype, finite values, a count within limits and the federation's model fingerprint. Anything else
raises ``UploadError`` naming the client and the problem; nothing is stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

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


def _check_array(client: str, name: str, array, shape: tuple) -> None:
    if not isinstance(array, np.ndarray):
        raise UploadError(f"client {client}: array {name!r} is not an array ({type(array).__name__})")
    if array.dtype.type not in FLOAT_DTYPES:
        raise UploadError(f"client {client}: array {name!r} has dtype {array.dtype}, expected a float type")
    if array.ndim != len(shape) or any(e is not None and e != s for e, s in zip(shape, array.shape)):
        expected = "(" + ", ".join("n" if e is None else str(e) for e in shape) + ")"
        raise UploadError(f"client {client}: array {name!r} has shape {tuple(array.shape)}, expected {expected}")
    if not np.isfinite(array).all():
        raise UploadError(f"client {client}: array {name!r} holds NaN or infinite values")


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


TAG = re.compile(r"^[0-9a-f]{64}$")  # an HMAC-SHA256 request tag (fededit_core.tags)


def validate_mkv_upload(
    client: str, fingerprint: str, ids: list[str], arrays: dict, spec: FederationSpec, tags: list[str] | None = None
) -> int:
    """An MKV upload: z and delta (n, d), keys (n, |R|, d_ff), layers (|R|,), and optionally one tag
    (64 hex digits, or "" for none) per id. Returns n."""
    check_fingerprint(client, fingerprint, spec)
    _check_names(client, arrays, {"z", "delta", "keys", "layers"})
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
    layers = arrays["layers"]
    if not isinstance(layers, np.ndarray) or tuple(int(x) for x in layers.ravel()) != spec.layers:
        raise UploadError(
            f"client {client}: MKVs are for layers {np.asarray(layers).ravel().tolist()}, "
            f"the federation edits {list(spec.layers)}"
        )
    _check_array(client, "z", arrays["z"], (n, spec.d_model))
    _check_array(client, "delta", arrays["delta"], (n, spec.d_model))
    _check_array(client, "keys", arrays["keys"], (n, len(spec.layers), spec.d_ff))
    return n


def validate_delta_upload(client: str, fingerprint: str, arrays: dict, spec: FederationSpec, layers=None) -> None:
    """An EditAvg upload: one weight update ``delta.<layer>`` (d, d_ff) per edited layer."""
    check_fingerprint(client, fingerprint, spec)
    layers = spec.layers if layers is None else layers
    _check_names(client, arrays, {f"delta.{l}" for l in layers})
    for layer in layers:
        _check_array(client, f"delta.{layer}", arrays[f"delta.{layer}"], (spec.d_model, spec.d_ff))


def validate_stats_upload(client: str, fingerprint: str, arrays: dict, spec: FederationSpec, layer: int) -> None:
    """A CollabEdit upload for one layer: R K^T (d, d_ff) and K K^T (d_ff, d_ff), symmetric."""
    check_fingerprint(client, fingerprint, spec)
    if layer not in spec.layers:
        raise UploadError(f"client {client}: layer {layer} is not edited by this federation {list(spec.layers)}")
    _check_names(client, arrays, {"rk", "kk"})
    _check_array(client, "rk", arrays["rk"], (spec.d_model, spec.d_ff))
    _check_array(client, "kk", arrays["kk"], (spec.d_ff, spec.d_ff))
    kk = arrays["kk"].astype(np.float64)
    if not np.allclose(kk, kk.T, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(kk).max()))):
        raise UploadError(f"client {client}: K K^T of layer {layer} is not symmetric")


def validate_sealed_stats(client: str, body: dict, spec: FederationSpec) -> float:
    """A CollabEdit reply under secure aggregation: no arrays (they travel masked, through SecAgg+),
    only the model fingerprint and the largest |value| of its statistics, which sets the scale."""
    check_fingerprint(client, str(body.get("fingerprint")), spec)
    value = body.get("max_abs")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise UploadError(f"client {client}: max_abs of its statistics must be a finite number >= 0, got {value!r}")
    return float(value)
