"""Time slots: a client's requests in the order the federation edits them."""

from __future__ import annotations

import numpy as np

from fededit_core.data.requests import EditRequest


def split_into_slots(requests: list[EditRequest], n_slots: int) -> list[list[EditRequest]]:
    """Requests over ``n_slots`` time slots: by timestamp when every request has one, else file order;
    slot sizes differ by at most one."""
    if n_slots < 1:
        raise ValueError(f"n_slots must be >= 1, got {n_slots}")
    if requests and all(r.timestamp is not None for r in requests):
        requests = sorted(requests, key=lambda r: r.timestamp)
    bounds = np.linspace(0, len(requests), n_slots + 1).round().astype(int)
    return [list(requests[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
