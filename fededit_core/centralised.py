"""The upper bound of a federated run: one MEMIT edit of the union of every client's requests.

Only for simulation and benchmarks, where one party may read every client's data: the edit is
applied to a fresh copy of the base model and evaluated on each client's requests separately.
"""

from __future__ import annotations

import time

from .memit import MemitEditor
from .metrics import evaluate
from .requests import EditRequest


def centralised_metrics(editor: MemitEditor, parts: dict[str, list[EditRequest]], kind: str,
                        fluency: bool = False) -> tuple[dict[str, dict], dict]:
    """({client: metrics on its requests after the union edit}, timings); the editor ends at its base model."""
    union = [r for reqs in parts.values() for r in reqs]
    editor.reset()
    started = time.perf_counter()
    try:
        result = editor.edit(union, progress=True)
        seconds = {**result.seconds, "total": time.perf_counter() - started}
        metrics = {}
        for name, reqs in parts.items():
            if reqs:
                m = evaluate(editor.model, editor.tok, reqs, kind, fluency=fluency)
                metrics[name] = {k: v for k, v in m.items() if k != "per_request"}
    finally:
        editor.reset()
    return metrics, seconds
