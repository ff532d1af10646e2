"""One organisation's side of a federated edit: its private requests, time slots and edited layers.

The federation's client (an edit worker) drives a ``Participant`` slot by slot:

1. ``edit_slot(slot, reused)``: MEMIT of this slot's requests on the participant's current model
   (z taken from ``reused`` where another client already computed it), then the slot's MKVs.
2. ``reedit(received, alpha)``: FedEdit's re-edit: keep each sender's MKV set that passes Eq. 8
   against the participant's own z so far, and apply the kept ones without text.

Several participants may share one model object (simulation): each keeps its own edited layers and
``activate()`` swaps them in. After every step the state can be checkpointed to a folder, so a
restarted client resumes where it stopped. Request text never leaves this object except through
``requests_of``, which the owner uses for its own evaluation.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .gating import reedit_decision
from .memit import MemitEditor, hidden_at_subject
from .mkv import MKVSet, apply_mkvs, compute_mkvs
from .requests import EditRequest
from .tags import request_tag
from .zopt import ZResult


def split_into_slots(requests: list[EditRequest], n_slots: int) -> list[list[EditRequest]]:
    """Requests over ``n_slots`` time slots: by timestamp when every request has one, else file order;
    slot sizes differ by at most one."""
    if n_slots < 1:
        raise ValueError(f"n_slots must be >= 1, got {n_slots}")
    if requests and all(r.timestamp is not None for r in requests):
        requests = sorted(requests, key=lambda r: r.timestamp)
    bounds = np.linspace(0, len(requests), n_slots + 1).round().astype(int)
    return [list(requests[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class SlotReport:
    slot: int
    edited: int = 0
    optimised: int = 0
    reused: int = 0
    received_sets: int = 0
    kept_sets: int = 0
    applied: int = 0
    seconds: dict = field(default_factory=dict)


class Participant:
    def __init__(self, name: str, editor: MemitEditor, requests: list[EditRequest], n_slots: int,
                 secret: bytes | None = None, checkpoint_dir: str | Path | None = None):
        self.name, self.editor = name, editor
        self.slots = split_into_slots(requests, n_slots)
        self.secret = secret
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.layers = {l: w.clone() for l, w in editor.base_weights.items()}  # starts at the base model
        self.own: MKVSet | None = None
        self.next_slot = 0
        self.reports: list[SlotReport] = []
        self.reedited_ids: list[str] = []
        if self.checkpoint_dir:
            old = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".old")
            if not (self.checkpoint_dir / "state.json").is_file() and (old / "state.json").is_file():
                os.replace(old, self.checkpoint_dir)  # a crash between the two renames of checkpoint()
            if (self.checkpoint_dir / "state.json").is_file():
                self._restore()

    # --- model state ----------------------------------------------------------------------------
    def activate(self) -> None:
        """Put this participant's edited layers into the (possibly shared) model."""
        self.editor.load_layers(self.layers)

    def _capture(self) -> None:
        self.layers = self.editor.edited_layers()

    def requests_of(self, slot: int) -> list[EditRequest]:
        return self.slots[slot]

    def tags_of(self, slot: int) -> list[str | None]:
        if self.secret is None:
            return [None] * len(self.slots[slot])
        return [request_tag(r, self.secret) for r in self.slots[slot]]

    def own_z(self) -> torch.Tensor:
        return self.own.z if self.own is not None else torch.zeros(0, self.editor.d_model)

    # --- the two steps of a time slot -----------------------------------------------------------
    def edit_slot(self, slot: int, reused: dict[str, torch.Tensor] | None = None) -> tuple[MKVSet, SlotReport]:
        """Edit this slot's requests; ``reused`` maps a request tag to a stored z (skips its optimisation)."""
        if slot != self.next_slot:
            raise ValueError(f"{self.name}: slot {slot} asked for, but the next slot to edit is {self.next_slot}")
        requests = self.slots[slot]
        report = SlotReport(slot=slot, edited=len(requests))
        self.activate()
        if requests:
            started = time.perf_counter()
            tags = self.tags_of(slot)
            reused = reused or {}
            todo = [i for i, tag in enumerate(tags) if tag is None or tag not in reused]
            z = torch.zeros(len(requests), self.editor.d_model)
            h = torch.zeros_like(z)
            if todo:
                fresh = self.editor.compute_z([requests[i] for i in todo], progress=False)
                z[todo], h[todo] = fresh.z, fresh.h
            taken = sorted(set(range(len(requests))) - set(todo))
            for i in taken:
                z[i] = torch.as_tensor(reused[tags[i]], dtype=torch.float32)
            if taken:  # h_L of a reused request, read here since no optimisation measured it
                h[taken] = hidden_at_subject(self.editor.model, self.editor.tok, [requests[i] for i in taken],
                                             self.editor.hp.z_layer)
            report.optimised, report.reused = len(todo), len(taken)
            report.seconds["z"] = time.perf_counter() - started
            started = time.perf_counter()
            result = self.editor.edit(requests, z=ZResult(z, h), progress=False)
            report.seconds["edit"] = time.perf_counter() - started
            started = time.perf_counter()
            ids = [f"{self.name}/{slot}/{i}" for i in range(len(requests))]  # opaque: no text
            mkvs = compute_mkvs(self.editor, requests, ids=ids, edit=result)
            report.seconds["mkv"] = time.perf_counter() - started
            self.own = mkvs if self.own is None else MKVSet.concat([self.own, mkvs])
        else:
            mkvs = MKVSet([], tuple(self.editor.hp.layers), torch.zeros(0, self.editor.d_model),
                          torch.zeros(0, self.editor.d_model),
                          torch.zeros(0, len(self.editor.hp.layers), self.editor.d_ff))
        self._capture()
        self.next_slot = slot + 1
        self.reports.append(report)
        self.checkpoint()
        return mkvs, report

    def reedit(self, received: list[MKVSet], alpha: float, gate: bool = True) -> SlotReport:
        """FedEdit's re-edit: apply every received set that passes Eq. 8 (all of them with ``gate=False``)."""
        report = self.reports[-1] if self.reports else SlotReport(slot=self.next_slot - 1)
        started = time.perf_counter()
        own = self.own_z()
        kept = [s for s in received if len(s) and (not gate or reedit_decision(own, s.z, alpha)[0])]
        report.received_sets += len(received)
        report.kept_sets += len(kept)
        if kept:
            self.activate()
            merged = MKVSet.concat(kept)
            apply_mkvs(self.editor, merged)
            self._capture()
            report.applied += len(merged)
            self.reedited_ids.extend(merged.ids)
        report.seconds["reedit"] = report.seconds.get("reedit", 0.0) + time.perf_counter() - started
        self.checkpoint()
        return report

    # --- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Edited layers, own MKVs and slot position to disk, replacing the previous checkpoint whole."""
        if self.checkpoint_dir is None:
            return
        staging = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file({f"layer.{l}": w.contiguous().cpu() for l, w in self.layers.items()}, str(staging / "layers.safetensors"))
        if self.own is not None:
            np.savez(staging / "own_mkvs.npz", ids=np.asarray(self.own.ids), **self.own.to_arrays())
        state = {"name": self.name, "next_slot": self.next_slot, "reports": [asdict(r) for r in self.reports],
                 "reedited_ids": self.reedited_ids}
        (staging / "state.json").write_text(json.dumps(state))
        old = self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint_dir.exists():
            os.replace(self.checkpoint_dir, old)
        os.replace(staging, self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def _restore(self) -> None:
        state = json.loads((self.checkpoint_dir / "state.json").read_text())
        if state["name"] != self.name:
            raise ValueError(f"checkpoint in {self.checkpoint_dir} belongs to {state['name']!r}, not {self.name!r}")
        layers = load_file(str(self.checkpoint_dir / "layers.safetensors"))
        self.layers = {int(k.split(".")[1]): v for k, v in layers.items()}
        own = self.checkpoint_dir / "own_mkvs.npz"
        if own.is_file():
            data = np.load(own)
            self.own = MKVSet.from_arrays([str(i) for i in data["ids"]], {k: data[k] for k in ("z", "delta", "keys", "layers")})
        self.next_slot = state["next_slot"]
        self.reports = [SlotReport(**r) for r in state["reports"]]
        self.reedited_ids = state["reedited_ids"]
