"""Server-side merges on plain arrays.

- EditAvg (FedAvg-style baseline): Delta_l = sum_c n_c Delta_l^c / sum_c n_c.
- CollabEdit's destructive baselines, as its authors' code runs them (LINs-lab/CollabEdit
  ``experiments/merging_singleRound.py``): Simple-Average, Task-Arithmetic, TIES-merging of the
  clients' MEMIT updates (``merge_updates``).
- CollabEdit (Zheng et al., ICLR 2025): per layer, sum_c R_c K_c^T and sum_c K_c K_c^T; every client
  then solves Delta = (sum R K^T)(lambda C0 + sum K K^T)^-1 with its identical C0, which equals one
  MEMIT edit of all clients' requests together. With thin factors (K_c V_c, R_c V_c) the sums are
  K K^T = K_all K_all^T and R K^T = R_all K_all^T of the factors side by side, sent back as their own
  thin factor (rank <= the slot's requests).
"""

from __future__ import annotations

import numpy as np

from fededit_core.memit.update import thin_factors


def edit_average(updates: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Weighted mean of per-layer updates, weights = each client's number of edits."""
    updates = [(n, arrays) for n, arrays in updates if n > 0]
    if not updates:
        raise ValueError("no client sent an update with edits")
    names = _common_layers(updates)
    total = sum(n for n, _ in updates)
    return {name: sum(n * arrays[name].astype(np.float64) for n, arrays in updates) / total for name in sorted(names)}


def factor_average(updates: list[tuple[int, dict[str, np.ndarray]]], layers) -> dict[str, np.ndarray]:
    """FedLEKE's MEMITAvg (zongkaiz/FLEKE memit/memit_main_avg.py lines 255-259 average, 46-49 apply):
    A_l and R_l averaged over the clients separately, Delta_l = mean(R_l) mean(A_l)^T, (d, d_ff).

    The authors' clients hold equal numbers of requests (``requests[i::8]``), so column i of every
    client's factors meet in the mean; here a client with fewer edits is padded with zero columns.
    Clients without edits in the slot are left out, as in ``edit_average``."""
    updates = [arrays for n, arrays in updates if n > 0]
    if not updates:
        raise ValueError("no client sent factors with edits")
    out = {}
    for layer in layers:
        width = max(a[f"factor_k.{layer}"].shape[1] for a in updates)
        means = {}
        for x in "kr":
            padded = [
                np.pad(
                    a[f"factor_{x}.{layer}"].astype(np.float64),
                    ((0, 0), (0, width - a[f"factor_{x}.{layer}"].shape[1])),
                )
                for a in updates
            ]
            means[x] = sum(padded) / len(padded)
        out[f"delta.{layer}"] = means["r"] @ means["k"].T
    return out


def sum_statistics(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Elementwise float64 sums of R K^T and K K^T over clients."""
    if not parts:
        raise ValueError("no statistics to sum")
    return {name: sum(p[name].astype(np.float64) for p in parts) for name in ("rk", "kk")}


def sum_factors(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The thin factor of sum_c R_c K_c^T and sum_c K_c K_c^T from the clients' factors ``kf``, ``rf``:
    K_all = [K_1 V_1, ..., K_C V_C] and R_all likewise, then ``thin_factors(K_all, R_all)``, so that no
    client's own columns are passed on, only a factor fixed by the sums."""
    if not parts:
        raise ValueError("no factors to sum")
    k = np.concatenate([p["kf"].astype(np.float64) for p in parts], axis=1)
    r = np.concatenate([p["rf"].astype(np.float64) for p in parts], axis=1)
    kf, rf = thin_factors(k, r)
    return {"kf": kf, "rf": rf}


MERGES = ("sa", "ta", "ties")  # CollabEdit's baselines over the clients' updates Delta^c
TA_SCALE = 1.0  # Task-Arithmetic's lambda: the plain sum (merging_singleRound.py lines 248-256)
TIES_KEEP = 0.2  # TIES keeps each client's top 20% |values| per weight (reset_thresh 20, line 303)
TIES_SCALE = 0.4  # and scales the merged vector by lambda = 0.4 (line 329)


def ties_merge(deltas: np.ndarray, keep: float = TIES_KEEP, scale: float = TIES_SCALE) -> np.ndarray:
    """TIES-merging (Yadav et al. 2023) of (C, ...) task vectors, as CollabEdit's
    ``experiments/util_TIES.py`` runs it: trim each vector to its values with |x| >= its
    (1 - keep)-quantile (``topk_values_mask``), elect each entry's sign as the sign of the trimmed sum
    (zero: the sign of the sum of the elected signs; ``resolve_sign`` "mass"), average the trimmed
    values that carry the elected sign (``disjoint_merge`` "mean"), times ``scale``."""
    flat = deltas.reshape(len(deltas), -1).astype(np.float64)
    d = flat.shape[1]
    k = max(1, d - int(d * keep))  # the k-th smallest |x| (1-based) is the threshold
    kth = np.partition(np.abs(flat), k - 1, axis=1)[:, k - 1 : k]
    trimmed = np.where(np.abs(flat) >= kth, flat, 0.0)
    sign = np.sign(trimmed.sum(axis=0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign > 0, trimmed > 0, trimmed < 0)
    picked = np.where(agree, trimmed, 0.0)
    merged = picked.sum(axis=0) / np.maximum((picked != 0).sum(axis=0), 1)
    return (scale * merged).reshape(deltas.shape[1:])


def merge_updates(method: str, updates: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """One merged update per layer from every client's Delta^c (edits or not, as each client's edited
    weights are merged): ``sa`` mean_c Delta^c (line 264 divides the sum by its 10 clients), ``ta``
    TA_SCALE sum_c Delta^c, ``ties`` ``ties_merge``."""
    if method not in MERGES:
        raise ValueError(f"unknown merge {method!r}; expected one of {list(MERGES)}")
    if not updates:
        raise ValueError("no client sent an update")
    names = _common_layers(updates)
    out = {}
    for name in sorted(names):
        stack = np.stack([arrays[name].astype(np.float64) for _, arrays in updates])
        if method == "sa":
            out[name] = stack.mean(axis=0)
        elif method == "ta":
            out[name] = TA_SCALE * stack.sum(axis=0)
        else:
            out[name] = ties_merge(stack)
    return out


def _common_layers(updates: list[tuple[int, dict[str, np.ndarray]]]) -> set[str]:
    names = set(updates[0][1])
    if any(set(arrays) != names for _, arrays in updates):
        raise ValueError("clients sent updates for different layers")
    return names
