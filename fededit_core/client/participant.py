"""One organisation's side of a federated edit: its private requests, time slots and edited layers.

The federation's client (an edit worker) drives a ``Participant`` slot by slot:

1. ``edit_slot(slot, reused)``: MEMIT of this slot's requests on the participant's current model
   (z taken from ``reused`` where another client already computed it and it passes
   ``target_prob >= reuse_min_prob`` on this model), then the slot's MKVs.
2. ``reedit(received, alpha)``: FedEdit's re-edit: keep each sender's MKV set that passes Eq. 8
   against the participant's own z so far, and apply the kept ones without text.

Several participants may share one model object (simulation): each keeps its own edited layers and
``activate()`` swaps them in. After every step the state can be checkpointed to a folder, so a
restarted client resumes where it stopped, and every step is idempotent: asked again (a server
that restarted inside a slot), a step already done returns its earlier result and applies nothing
twice (the checkpoint records the sets decided on and the merges applied). Request text never
leaves the organisation: the owner's worker reads ``slots`` for its own evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fededit_core.client.instructions import StepError
from fededit_core.data.requests import EditRequest
from fededit_core.data.slots import split_into_slots
from fededit_core.eval.metrics import target_nll
from fededit_core.fedleke.bounds import out_of_bounds
from fededit_core.fedleke.mkv import WIRE_ARRAYS, MKVSet, apply_mkvs, compute_mkvs
from fededit_core.fedleke.probe import DEFAULT_PROBE_TAU, probe_divergence, probe_keep, probe_requests
from fededit_core.fedleke.reedit import (
    DEFAULT_ALPHA,
    DEFAULT_GATE,
    DEFAULT_REUSE_MIN_PROB,
    DEFAULT_ROLLBACK_MARGIN,
    DEFAULT_VECTOR,
    GATES,
    VECTORS,
    kept_rows,
)
from fededit_core.fedleke.tags import fact_tag, request_tag
from fededit_core.io import atomic_folder, last_good, recover_folder
from fededit_core.memit.dynamic_covariance import DEFAULT_BETA0, DEFAULT_BETA1, dynamic_prior, psd_factor
from fededit_core.memit.editor import MemitEditor
from fededit_core.memit.target import ZResult
from fededit_core.memit.update import layer_statistics, thin_factors, update_factors


@dataclass
class SlotReport:
    slot: int
    edited: int = 0
    optimised: int = 0
    reused: int = 0
    received_sets: int = 0
    kept_sets: int = 0
    refused_sets: int = 0  # out of bounds (fedleke/bounds.py) or rolled back
    applied: int = 0
    seconds: dict = field(default_factory=dict)


log = logging.getLogger("fededit.client")


def sender_of(mkvs: MKVSet) -> str:
    """The client that uploaded a received set (its ids are ``<sender>/<slot>/<i>``)."""
    return mkvs.ids[0].rsplit("/", 2)[0] if mkvs.ids else ""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (another client's, truncated, failing its checksums)."""


class Participant:
    def __init__(
        self,
        name: str,
        editor: MemitEditor,
        requests: list[EditRequest],
        n_slots: int,
        secret: bytes | None = None,
        checkpoint_dir: str | Path | None = None,
        reuse_min_prob: float = DEFAULT_REUSE_MIN_PROB,
    ):
        self.name, self.editor = name, editor
        self.slots = split_into_slots(requests, n_slots)
        self.secret = secret
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.layers = {l: w.clone() for l, w in editor.base_weights.items()}  # starts at the base model
        self.own: MKVSet | None = None
        self.next_slot = 0
        self.reports: list[SlotReport] = []
        self.reedited_ids: list[str] = []  # ids of the received MKVs applied
        self.refused_ids: list[str] = []  # ids of the received MKVs decided against
        self.merged_slots: list[int] = []  # slots whose EditAvg / CollabEdit merge is applied
        self.reuse_min_prob = reuse_min_prob
        self.refused_reuse: list[str] = []  # tags whose served z failed verification (reported)
        self.suspects: dict[str, str] = {}  # sender -> why its set was refused (reported to the server)
        self.conflicted_ids: list[str] = []  # own requests CollabEdit's conflict policy left out
        self.pending: dict[str, torch.Tensor] = {}  # mid-slot state of EditAvg / CollabEdit
        self.key_memory: dict[int, torch.Tensor] = {}  # CollabEdit's dynamic covariance: F, F F^T = sum K K^T
        self.edited_keys: dict[int, torch.Tensor] = {}  # AlphaEdit: the editor's sum K K^T of keys written
        self.version = 0  # bumped by every checkpoint (a cached copy compares it to the disk's)
        if self.checkpoint_dir:
            recover_folder(self.checkpoint_dir, "state.json")  # a crash between checkpoint()'s renames
            self._restore_newest_good()

    # --- model state ----------------------------------------------------------------------------
    def activate(self) -> None:
        """Put this participant's edited layers (and AlphaEdit's memory of their keys) into the
        (possibly shared) editor."""
        self.editor.load_layers(self.layers)
        self.editor.key_memory = dict(self.edited_keys)

    def _capture(self) -> None:
        self.layers = self.editor.edited_layers()
        self.edited_keys = dict(self.editor.key_memory)  # replaced, never changed in place, by the editor

    def tags_of(self, slot: int, facts: bool = False) -> list[str | None]:
        """The keyed request tags of a slot's requests (``facts``: their fact tags, without the object)."""
        if self.secret is None:
            return [None] * len(self.slots[slot])
        tag = fact_tag if facts else request_tag
        return [tag(r, self.secret) for r in self.slots[slot]]

    def edited_requests(self) -> list[EditRequest]:
        """Every request of the slots edited so far."""
        return [r for slot in self.slots[: self.next_slot] for r in slot]

    def mkvs_of(self, slot: int) -> MKVSet:
        """The MKVs this participant uploaded for an already edited ``slot`` (for a repeated request)."""
        if slot >= self.next_slot:
            raise StepError(f"{self.name}: slot {slot} is not edited yet")
        if self.own is None:
            return self._empty_mkvs()
        prefix = f"{self.name}/{slot}/"
        return self.own.select([i for i, rid in enumerate(self.own.ids) if rid.startswith(prefix)])

    def _empty_mkvs(self) -> MKVSet:
        d, n_layers = self.editor.d_model, len(self.editor.hp.layers)
        return MKVSet(
            [],
            tuple(self.editor.hp.layers),
            torch.zeros(0, d),
            torch.zeros(0, d),
            torch.zeros(0, n_layers, self.editor.d_ff),
        )

    # --- the two steps of a time slot -----------------------------------------------------------
    def edit_slot(
        self, slot: int, reused: dict[str, torch.Tensor] | None = None, factors: bool = False
    ) -> tuple[MKVSet, SlotReport]:
        """Edit this slot's requests; ``reused`` maps a request tag to a stored z (skips its optimisation);
        ``factors``: also keep each layer's MEMIT factors in ``pending`` (``editavg-factors``)."""
        if slot != self.next_slot:
            raise StepError(f"{self.name}: slot {slot} asked for, but the next slot to edit is {self.next_slot}")
        requests = self.slots[slot]
        report = SlotReport(slot=slot, edited=len(requests))
        self.activate()
        if requests:
            started = time.perf_counter()
            tags = self.tags_of(slot)
            reused = reused or {}
            z = torch.zeros(len(requests), self.editor.d_model)
            h = torch.zeros_like(z)
            taken = [i for i, tag in enumerate(tags) if tag is not None and tag in reused]
            if taken:  # verified on this client's own model before use (a z may be poisoned)
                z[taken] = torch.stack([torch.as_tensor(reused[tags[i]], dtype=torch.float32) for i in taken])
                probs = self.editor.target_prob([requests[i] for i in taken], z[taken])
                refused = [i for i, p in zip(taken, probs.tolist()) if not p >= self.reuse_min_prob]
                self.refused_reuse.extend(tags[i] for i in refused)
                taken = [i for i in taken if i not in refused]
            todo = sorted(set(range(len(requests))) - set(taken))
            if todo:
                fresh = self.editor.compute_z([requests[i] for i in todo], progress=False)
                z[todo], h[todo] = fresh.z, fresh.h
            if taken:  # h_L of a reused request, read here since no optimisation measured it
                h[taken] = self.editor.read_site([requests[i] for i in taken])
            report.optimised, report.reused = len(todo), len(taken)
            report.seconds["z"] = time.perf_counter() - started
            started = time.perf_counter()
            result = self.editor.edit(requests, z=ZResult(z, h), progress=False)
            if factors:  # kept in ``pending``, so checkpointed with the edit
                c0 = self.editor.c0()
                for l in self.editor.hp.layers:
                    a, r = update_factors(result.keys[l], result.resids[l], c0[l].cpu(), self.editor.hp.mom2_weight)
                    self.pending[f"factor_k.{l}"], self.pending[f"factor_r.{l}"] = a.float(), r.float()
            report.seconds["edit"] = time.perf_counter() - started
            started = time.perf_counter()
            ids = [f"{self.name}/{slot}/{i}" for i in range(len(requests))]  # opaque: no text
            mkvs = compute_mkvs(self.editor, requests, ids=ids, edit=result)
            report.seconds["mkv"] = time.perf_counter() - started
            self.own = mkvs if self.own is None else MKVSet.concat([self.own, mkvs])
        else:
            mkvs = self._empty_mkvs()
            for l in self.editor.hp.layers if factors else ():
                self.pending[f"factor_k.{l}"] = torch.zeros(self.editor.d_ff, 0)
                self.pending[f"factor_r.{l}"] = torch.zeros(self.editor.d_model, 0)
        self._capture()
        self.next_slot = slot + 1
        self.reports.append(report)
        self.checkpoint()
        return mkvs, report

    def reedit(
        self,
        received: list[MKVSet],
        alpha: float = DEFAULT_ALPHA,
        gate: str = DEFAULT_GATE,
        vector: str = DEFAULT_VECTOR,
        margin: float | None = DEFAULT_ROLLBACK_MARGIN,
        check_bounds: bool = True,
        tau: float = DEFAULT_PROBE_TAU,
    ) -> SlotReport:
        """FedEdit's re-edit: apply the received MKVs that the rule ``gate`` keeps (fedleke/reedit.py:
        ``paper`` per vector against this slot's own, ``set`` per sender's set, ``probe`` per vector by
        its effect on this client's own prompts above ``tau`` nats (fedleke/probe.py), ``none`` all).

        ``vector``: what Eq. 8 compares, ``"z"`` (the paper) or ``"delta"`` (z - h_L(base), the edit's
        direction without the subject's own hidden state; see fedleke/reedit.py). Defences: a set out
        of ``fedleke/bounds.py``'s bounds is refused, and when the kept sets raise the target NLL of
        any of this client's own edits by more than ``margin`` nats (None: no check), they are
        rolled back and re-applied without the sets that do so alone (``check_bounds=False`` and
        ``margin=None``: no defence, for measuring them). Refused senders land in ``self.suspects``."""
        if vector not in VECTORS:
            raise ValueError(f"the re-edit condition compares one of {list(VECTORS)}, got {vector!r}")
        if gate not in GATES:
            raise ValueError(f"the re-edit condition is one of {list(GATES)}, got {gate!r}")
        report = self.reports[-1] if self.reports else SlotReport(slot=self.next_slot - 1)
        started = time.perf_counter()
        own = getattr(self.own, vector) if self.own is not None else torch.zeros(0, self.editor.d_model)
        done = set(self.reedited_ids) | set(self.refused_ids)  # a repeated message decides nothing twice
        received = [s for s in received if len(s) and not set(s.ids) <= done]
        report.received_sets += len(received)
        in_bounds = []
        for s in received:
            why = out_of_bounds(s, self.own, self.editor.hp.clamp_norm_factor) if check_bounds else None
            if why:
                self.suspects[sender_of(s)] = why
            else:
                in_bounds.append(s)
        own_slot = own[self._own_rows_of_slot(self.next_slot - 1)] if len(own) else own
        gated = []
        probes = probe_requests(self.edited_requests()) if gate == "probe" else []
        if probes:
            self.activate()
        for s in in_bounds:
            if gate == "probe":
                model, tok, layer = self.editor.model, self.editor.tok, self.editor.hp.z_layer
                keep = probe_keep(probe_divergence(model, tok, probes, s.z, s.delta, layer), tau)
            else:
                keep = kept_rows(gate, own, own_slot, getattr(s, vector), alpha)
            rows = keep.nonzero().flatten()
            if len(rows):
                gated.append(s if len(rows) == len(s) else s.select(rows))
        kept = self._apply_guarded(gated, margin) if gated else []
        report.kept_sets += len(kept)
        report.refused_sets += len(received) - len(in_bounds) + len(gated) - len(kept)
        kept_ids = {i for s in kept for i in s.ids}
        report.applied += len(kept_ids)
        self.reedited_ids.extend(i for s in kept for i in s.ids)
        self.refused_ids.extend(i for s in received for i in s.ids if i not in kept_ids)
        report.seconds["reedit"] = report.seconds.get("reedit", 0.0) + time.perf_counter() - started
        self.checkpoint()
        return report

    def _own_rows_of_slot(self, slot: int) -> list[int]:
        """Rows of ``self.own`` edited in ``slot`` (own ids are ``<name>/<slot>/<i>``)."""
        return [i for i, id_ in enumerate(self.own.ids) if id_.split("/")[1] == str(slot)]

    def own_nll(self, requests: list[EditRequest]) -> torch.Tensor:
        """Per request of ``requests``: the mean per-token NLL of target_new (on the active model)."""
        prompts, targets = [r.text for r in requests], [r.target_new for r in requests]
        return target_nll(self.editor.model, self.editor.tok, prompts, targets).double()

    def _apply_guarded(self, kept: list[MKVSet], margin: float | None) -> list[MKVSet]:
        """Apply ``kept`` together; when that raises the target NLL of any of this client's own edits
        by more than ``margin`` nats (its target probability falls by more than e^margin), roll back
        and re-apply without the sets that do so alone:  max_i NLL_i(after) - NLL_i(before) > margin."""
        own_requests = self.edited_requests()
        self.activate()  # self.layers stays the start until _capture: activate() rolls back to it
        before = self.own_nll(own_requests) if margin is not None and own_requests else None

        def rise() -> float:
            return float((self.own_nll(own_requests) - before).max())

        apply_mkvs(self.editor, MKVSet.concat(kept))
        if before is None or rise() <= margin:
            self._capture()
            return kept
        passing = []
        for s in kept:  # which sets do it: each alone, from the model before the re-edit
            self.activate()
            apply_mkvs(self.editor, s)
            alone = rise()
            if alone > margin:
                self.suspects[sender_of(s)] = f"its set raises the target NLL of an own edit by {alone:.2f} nats"
            else:
                passing.append(s)
        self.activate()
        if passing:
            apply_mkvs(self.editor, MKVSet.concat(passing))
        self._capture()
        return passing

    # --- EditAvg: send the slot's update, then take the federation's average ------------------
    def _pending_slot(self) -> int | None:
        return int(self.pending["slot"]) if "slot" in self.pending else None

    def editavg_update(self, slot: int) -> tuple[dict[int, torch.Tensor], SlotReport]:
        """Edit this slot on the current (global) model; returns Delta_l = W_l(after) - W_l(before)."""
        start, report = self._editavg_edit(slot)
        return {l: (self.layers[l].double() - start[l].double()).float() for l in start}, report

    def editavg_factors(self, slot: int) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], SlotReport]:
        """Edit this slot on the current (global) model; returns each layer's MEMIT factors (A (d_ff, n),
        R (d, n)) with Delta_l = R A^T (``memit.update.update_factors``), for ``editavg-factors``."""
        _, report = self._editavg_edit(slot, factors=True)
        return {l: (self.pending[f"factor_k.{l}"], self.pending[f"factor_r.{l}"]) for l in self.layers}, report

    def _editavg_edit(self, slot: int, factors: bool = False) -> tuple[dict[int, torch.Tensor], SlotReport]:
        """The slot's edit for EditAvg (once: asked again, the same one), its start kept in ``pending``."""
        if slot == self.next_slot - 1 and self._pending_slot() == slot:  # asked again: the same update
            return {l: self.pending[f"start.{l}"] for l in self.layers}, self.reports[-1]
        start = {l: w.clone() for l, w in self.layers.items()}
        self.pending = {"slot": torch.tensor(slot), **{f"start.{l}": w for l, w in start.items()}}
        _, report = self.edit_slot(slot, factors=factors)  # checkpoints, with the slot's start in ``pending``
        return start, report

    def editavg_apply(self, average: dict[int, torch.Tensor], slot: int) -> None:
        """W_l = W_l(slot start) + averaged Delta_l: every client ends the slot with the same model."""
        if slot in self.merged_slots and not self.pending:
            return  # asked again: applied already
        if self._pending_slot() != slot:
            raise StepError(f"{self.name}: no EditAvg update of slot {slot} is waiting for its average")
        self.layers = {
            l: (self.pending[f"start.{l}"].double() + average[l].double()).to(self.layers[l].dtype) for l in self.layers
        }
        self.pending = {}
        self.merged_slots.append(slot)
        self.activate()
        self.checkpoint()

    # --- CollabEdit: per layer, statistics out, summed statistics in ------------------------------
    def collab_statistics(
        self, slot: int, index: int, lowrank: bool, skip: tuple[int, ...] = (), conflicts: tuple[int, ...] = ()
    ) -> tuple[dict[str, np.ndarray], float | None]:
        """(statistics, mean |R|) of this slot's requests at the ``index``-th edited layer, read on the
        current (shared, partly edited) model, float64: R K^T (d, d_ff) and K K^T (d_ff, d_ff) as
        ``rk``, ``kk``, or with ``lowrank`` their thin factors K V (d_ff, r) and R V (d, r), r <= the
        requests, as ``kf``, ``rf`` (``thin_factors``). z is optimised at index 0, where ``skip`` (rows
        another client sends, or ``conflicts``: rows the run's conflict policy refused) leaves requests
        out for the whole slot."""
        if slot != self.next_slot:
            raise StepError(f"{self.name}: slot {slot} asked for, but the next slot to edit is {self.next_slot}")
        if any(row >= len(self.slots[slot]) for row in skip) or len(set(skip)) != len(skip):
            raise StepError(f"{self.name}: the rows to skip must be distinct rows of slot {slot}")
        if not set(conflicts) <= set(skip):
            raise StepError(f"{self.name}: rows refused as conflicts must be among the rows to skip")
        self.activate()
        if index == 0 and self._pending_slot() != slot:  # (asked again, the slot's z is kept)
            skipped = set(skip)
            used = torch.tensor([i for i in range(len(self.slots[slot])) if i not in skipped], dtype=torch.long)
            requests = [self.slots[slot][i] for i in used.tolist()]
            report = SlotReport(slot=slot, edited=len(self.slots[slot]), optimised=len(requests))
            started = time.perf_counter()
            z = self.editor.compute_z(requests, progress=False).z if requests else torch.zeros(0, self.editor.d_model)
            report.seconds["z"] = time.perf_counter() - started
            self.pending = {"z": z.float(), "slot": torch.tensor(slot), "applied": torch.tensor(0), "used": used}
            self.reports.append(report)
            refused = [f"{self.name}/{slot}/{row}" for row in conflicts]
            self.conflicted_ids += [i for i in refused if i not in self.conflicted_ids]
            if conflicts:
                log.warning(
                    "%s: %d request(s) of slot %d conflict with other clients' edits of the same facts and "
                    "were refused by the run's conflict policy: %s",
                    self.name,
                    len(conflicts),
                    slot,
                    ", ".join(refused),
                )
            self.checkpoint()
        requests = [self.slots[slot][i] for i in self.used_rows(slot)]
        if requests:
            keys, resid = self.editor.layer_inputs(requests, self.pending["z"].to(self.editor.device), index)
        else:
            keys = torch.zeros(0, self.editor.d_ff, dtype=torch.float64)
            resid = torch.zeros(0, self.editor.d_model, dtype=torch.float64)
        norm = float(resid.double().norm(dim=1).mean()) if requests else None
        if lowrank:
            kf, rf = thin_factors(keys.double().T.cpu().numpy(), resid.double().T.cpu().numpy())
            return {"kf": kf, "rf": rf}, norm
        rk, kk = layer_statistics(keys, resid)
        return {"rk": rk.cpu().numpy(), "kk": kk.cpu().numpy()}, norm

    def used_rows(self, slot: int) -> list[int]:
        """The rows of ``slot`` in this client's CollabEdit statistics (all but those skipped)."""
        if "used" in self.pending:
            return [int(i) for i in self.pending["used"].tolist()]
        return list(range(len(self.slots[slot])))

    def collab_apply(
        self,
        slot: int,
        index: int,
        rk: torch.Tensor,
        kk: torch.Tensor,
        beta0: float = DEFAULT_BETA0,
        beta1: float = DEFAULT_BETA1,
        key_factor: torch.Tensor | None = None,
    ) -> None:
        """W += (sum R K^T)(lambda C0 + sum K K^T)^-1 at the ``index``-th layer; the slot ends after the
        last. Layers are applied in order; one already applied (asked again) is not applied twice.
        With ``beta0``, ``beta1`` other than (1, 0), lambda C0 becomes the dynamic covariance
        lambda (beta0 C0 + beta1 sum_old K K^T) of the earlier slots' merged keys, and this slot's
        K K^T joins that memory when the slot ends (as ``key_factor`` F, F F^T = K K^T, when the sums
        came as thin factors; else factored here)."""
        last = len(self.editor.hp.layers) - 1
        if slot in self.merged_slots or (self._pending_slot() == slot and index < int(self.pending["applied"])):
            return
        if self._pending_slot() != slot or index != int(self.pending["applied"]):
            raise StepError(f"{self.name}: no CollabEdit step of slot {slot} at layer index {index} is open")
        started = time.perf_counter()
        self.activate()
        layer = self.editor.hp.layers[index]
        prior = None
        if (beta0, beta1) != (1.0, 0.0):
            memory = self.key_memory.get(layer)
            prior = dynamic_prior(self.editor.c0()[layer], memory, self.editor.hp.mom2_weight, beta0, beta1)
        self.editor.apply_statistics(layer, rk, kk, prior)
        if beta1:
            factor = key_factor if key_factor is not None else torch.from_numpy(psd_factor(kk.double().cpu().numpy()))
            self.pending[f"memory.{layer}"] = factor.double().cpu()
        self._capture()
        report = self.reports[-1]
        report.seconds["edit"] = report.seconds.get("edit", 0.0) + time.perf_counter() - started
        self.pending["applied"] = torch.tensor(index + 1)
        if index == last:
            for name, factor in self.pending.items():
                if name.startswith("memory."):
                    self._remember(int(name.split(".")[1]), factor)
            self.pending = {}
            self.next_slot = slot + 1
            self.merged_slots.append(slot)
        self.checkpoint()

    def _remember(self, layer: int, factor: torch.Tensor) -> None:
        """sum_old K K^T += F F^T, kept as a thin factor of at most d_ff columns."""
        old = self.key_memory.get(layer)
        memory = factor.double() if old is None else torch.cat([old, factor.double()], dim=1)
        if memory.shape[1] > memory.shape[0]:
            memory = torch.from_numpy(psd_factor((memory @ memory.T).numpy()))
        self.key_memory[layer] = memory

    # --- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Edited layers, own MKVs and slot position to disk, replacing the previous checkpoint whole."""
        if self.checkpoint_dir is None:
            return
        with atomic_folder(self.checkpoint_dir, keep_previous=True) as staging:
            self._write_checkpoint(staging)

    def _write_checkpoint(self, staging: Path) -> None:
        save_file(
            {f"layer.{l}": w.contiguous().cpu() for l, w in self.layers.items()}, str(staging / "layers.safetensors")
        )
        if self.own is not None:
            np.savez(staging / "own_mkvs.npz", ids=np.asarray(self.own.ids), **self.own.to_arrays())
        if self.pending:
            save_file({k: v.contiguous().cpu() for k, v in self.pending.items()}, str(staging / "pending.safetensors"))
        if self.key_memory:
            memory = {f"memory.{l}": f.contiguous().cpu() for l, f in self.key_memory.items()}
            save_file(memory, str(staging / "key_memory.safetensors"))
        if self.edited_keys:  # as thin factors F, F F^T = sum K K^T: rank <= the edits, not d_ff
            factors = {
                f"keys.{l}": torch.from_numpy(psd_factor(m.numpy())).contiguous() for l, m in self.edited_keys.items()
            }
            save_file(factors, str(staging / "edited_keys.safetensors"))
        self.version += 1
        state = {
            "name": self.name,
            "next_slot": self.next_slot,
            "reports": [asdict(r) for r in self.reports],
            "reedited_ids": self.reedited_ids,
            "refused_ids": self.refused_ids,
            "merged_slots": self.merged_slots,
            "refused_reuse": self.refused_reuse,
            "suspects": self.suspects,
            "conflicted_ids": self.conflicted_ids,
            "version": self.version,
            "files": {f.name: _sha256(f) for f in sorted(staging.iterdir())},
        }
        (staging / "state.json").write_text(json.dumps(state))

    def _restore_newest_good(self) -> None:
        """The checkpoint, or the one before it (``io.last_good``) when it is damaged; a damaged
        newest one is replaced by the good one, so that the next checkpoint keeps it as last good."""
        newest, previous = self.checkpoint_dir, last_good(self.checkpoint_dir)
        problems = []
        for folder in (newest, previous):
            if not (folder / "state.json").is_file():
                continue
            try:
                self._restore(folder)
            except (CheckpointError, ValueError, OSError) as err:
                problems.append(f"{folder.name}: {err}")
                log.error("%s: checkpoint %s is unusable (%s)", self.name, folder, err)
                continue
            if folder == previous:
                log.warning("%s: resumed from the last good checkpoint %s", self.name, folder)
                shutil.rmtree(newest, ignore_errors=True)
                shutil.copytree(previous, newest)
            return
        if problems:
            raise CheckpointError(f"{self.name}: no usable checkpoint in {newest} ({'; '.join(problems)})")

    def _restore(self, folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        if state["name"] != self.name:
            raise CheckpointError(f"checkpoint in {folder} belongs to {state['name']!r}, not {self.name!r}")
        for name, digest in state.get("files", {}).items():
            if not (folder / name).is_file() or _sha256(folder / name) != digest:
                raise CheckpointError(f"{name} is missing or does not match its checksum (truncated?)")
        layers = load_file(str(folder / "layers.safetensors"))
        self.layers = {int(k.split(".")[1]): v for k, v in layers.items()}
        own = folder / "own_mkvs.npz"
        if own.is_file():
            data = np.load(own)
            arrays = {k: data[k] for k in (*WIRE_ARRAYS, "layers") if k in data}
            if "corrections" not in arrays:  # a checkpoint from before corrections: the first-order apply
                n, layers, _ = arrays["keys"].shape
                arrays["corrections"] = np.zeros((n, layers, arrays["z"].shape[1]), np.float32)
            self.own = MKVSet.from_arrays([str(i) for i in data["ids"]], arrays)
        pending = folder / "pending.safetensors"
        self.pending = load_file(str(pending)) if pending.is_file() else {}
        memory = folder / "key_memory.safetensors"
        loaded = load_file(str(memory)) if memory.is_file() else {}
        self.key_memory = {int(k.split(".")[1]): v for k, v in loaded.items()}
        edited = folder / "edited_keys.safetensors"
        loaded = load_file(str(edited)) if edited.is_file() else {}
        self.edited_keys = {int(k.split(".")[1]): f @ f.T for k, f in loaded.items()}
        self.next_slot = state["next_slot"]
        self.version = state.get("version", 0)
        self.reports = [SlotReport(**r) for r in state["reports"]]
        self.reedited_ids = state["reedited_ids"]
        self.refused_ids = state.get("refused_ids", [])
        self.merged_slots = state.get("merged_slots", [])
        self.refused_reuse = state.get("refused_reuse", [])
        self.suspects = state.get("suspects", {})
        self.conflicted_ids = state.get("conflicted_ids", [])


def checkpoint_version(folder: str | Path) -> int | None:
    """The version of the checkpoint in ``folder`` (``None`` when there is none or it is unreadable)."""
    state = Path(folder) / "state.json"
    try:
        return int(json.loads(state.read_text()).get("version", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
