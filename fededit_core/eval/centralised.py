"""The upper bound of a federated run: MEMIT of the union of every client's requests.

Only for simulation and benchmarks, where one party may read every client's data: the edit is
applied to the base model and evaluated on each client's requests separately. ``n_slots=1`` is one
batch edit of the union; ``n_slots=T`` edits, slot after slot, the union of every client's slot-t
requests (the schedule a federation with T time slots follows, so the same edits in the same order).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm.auto import tqdm

from fededit_core.data.requests import EditRequest
from fededit_core.data.slots import split_into_slots
from fededit_core.eval.metrics import evaluate
from fededit_core.memit.editor import MemitEditor


def centralised_metrics(
    editor: MemitEditor,
    parts: dict[str, list[EditRequest]],
    kind: str,
    fluency: bool = False,
    n_slots: int = 1,
    per_request: bool = False,
    after_slot: Callable[[int, MemitEditor], None] | None = None,
) -> tuple[dict[str, dict], dict]:
    """({client: metrics on its requests after the union edit}, timings); the editor ends at its base
    model. ``per_request``: each client's metrics keep ``per_request`` (in the order of its requests);
    ``after_slot(t, editor)`` is called after each slot's edit (a benchmark's forgetting curve)."""
    slots = {name: split_into_slots(reqs, n_slots) for name, reqs in parts.items()}
    editor.reset()
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    try:
        for t in tqdm(range(n_slots), desc="centralised time slots", unit="slot", disable=n_slots == 1):
            union = [r for name in parts for r in slots[name][t]]
            if union:
                for phase, s in editor.edit(union, progress=n_slots == 1).seconds.items():
                    seconds[phase] = seconds.get(phase, 0.0) + s
            if after_slot is not None:
                after_slot(t, editor)
        seconds["total"] = time.perf_counter() - started
        metrics = {}
        for name, reqs in parts.items():
            if reqs:
                m = evaluate(editor.model, editor.tok, reqs, kind, fluency=fluency)
                metrics[name] = m if per_request else {k: v for k, v in m.items() if k != "per_request"}
    finally:
        editor.reset()
    return metrics, seconds
