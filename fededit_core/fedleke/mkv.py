"""Mediator knowledge vectors (FedLEKE, Zhao et al. 2025): what a client shares instead of its facts.

For each edit request: z (the target hidden state at layer L), delta = z - h_L(base) on the shared
base model, and the template-averaged key k_l at every edited layer l (as the sender's MEMIT edit
used it, see ``compute_mkvs``). No text.

Applying MKVs needs no request text and no gradient descent. MEMIT's residual at layer i is
z - h_L(current model); without the text, h_L(current) is estimated to first order as
h_L(base) + sum_l (W_l - W_l(base)) k_l, the change that the model's edits (its own earlier ones and
those made so far by this apply) write into the residual stream at the request's keys. So

    resid_i = (delta - sum_l (W_l - W_l(base)) k_l) / (number of layers left)
    Delta_i = resid_i K_i^T (lambda C0 + K_i K_i^T)^-1.

This ignores how a change at layer l < L is transformed by the blocks between l and L (attention
mixing, norms, the MLPs), which is small for the consecutive early layers MEMIT edits; the test
suite and ``bench.memit_speed`` measure it against the text-based path.

The editor's own loop (``MemitEditor``) decides the site and the spread: for PMET z is L's FFN output
target, delta = z - FFN_L(base), only L's own weight shift moves that site to first order
(``moves_site``), and the residual is divided by the square root of the layers left (``spread``).
AlphaEdit shares MEMIT's MKVs; its update is solved by the editor (``apply_statistics``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fededit_core.data.requests import EditRequest
from fededit_core.memit.editor import EditResult, MemitEditor
from fededit_core.memit.keys import compute_keys
from fededit_core.memit.target import ZResult
from fededit_core.memit.update import layer_statistics


class MKVError(ValueError):
    pass


OPTIONAL_FIELDS = ("corrections", "plain_keys")
WIRE_ARRAYS = ("z", "delta", "keys", "corrections")  # what a set carries between parties (plus "layers")


@dataclass
class MKVSet:
    """MKVs of n requests: ids (opaque), z and delta (n, d), keys (n, |R|, d_ff) for ``layers``, and
    optionally the corrections (n, |R|, d) and the keys at the plain prompt (n, |R|, d_ff)."""

    ids: list[str]
    layers: tuple[int, ...]
    z: torch.Tensor
    delta: torch.Tensor
    keys: torch.Tensor
    corrections: torch.Tensor | None = None
    plain_keys: torch.Tensor | None = None

    def __post_init__(self):
        self.validate()

    def __len__(self) -> int:
        return len(self.ids)

    def validate(
        self, d_model: int | None = None, d_ff: int | None = None, layers: tuple[int, ...] | None = None
    ) -> None:
        """Shapes agree with each other (and with the model, when given); values are finite."""
        n = len(self.ids)
        if self.z.ndim != 2 or self.z.shape[0] != n:
            raise MKVError(f"z must be (n={n}, d), got {tuple(self.z.shape)}")
        if tuple(self.delta.shape) != tuple(self.z.shape):
            raise MKVError(f"delta must have z's shape {tuple(self.z.shape)}, got {tuple(self.delta.shape)}")
        if self.keys.ndim != 3 or self.keys.shape[:2] != (n, len(self.layers)):
            raise MKVError(f"keys must be (n={n}, layers={len(self.layers)}, d_ff), got {tuple(self.keys.shape)}")
        if d_model is not None and self.z.shape[1] != d_model:
            raise MKVError(f"z vectors have d={self.z.shape[1]}, the model has d_model={d_model}")
        if d_ff is not None and self.keys.shape[2] != d_ff:
            raise MKVError(f"keys have d_ff={self.keys.shape[2]}, the model has d_ff={d_ff}")
        if layers is not None and tuple(self.layers) != tuple(layers):
            raise MKVError(f"MKVs are for layers {list(self.layers)}, this editor edits {list(layers)}")
        if self.corrections is not None and tuple(self.corrections.shape) != (n, len(self.layers), self.z.shape[1]):
            raise MKVError(
                f"corrections must be (n={n}, layers={len(self.layers)}, d), got {tuple(self.corrections.shape)}"
            )
        if self.plain_keys is not None and tuple(self.plain_keys.shape) != tuple(self.keys.shape):
            raise MKVError(f"plain keys must have the keys' shape {tuple(self.keys.shape)}")
        for name in ("z", "delta", "keys", *OPTIONAL_FIELDS):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                raise MKVError(f"{name} holds NaN or infinite values")

    def select(self, index) -> "MKVSet":
        index = torch.as_tensor(index, dtype=torch.long)
        optional = {k: getattr(self, k)[index] for k in OPTIONAL_FIELDS if getattr(self, k) is not None}
        return MKVSet(
            [self.ids[i] for i in index.tolist()],
            self.layers,
            self.z[index],
            self.delta[index],
            self.keys[index],
            **optional,
        )

    @staticmethod
    def concat(sets: list["MKVSet"]) -> "MKVSet":
        if not sets:
            raise MKVError("no MKV sets to concatenate")
        layers = sets[0].layers
        if any(s.layers != layers for s in sets):
            raise MKVError("MKV sets for different layers cannot be combined")
        optional = {}
        for name in OPTIONAL_FIELDS:
            have = [getattr(s, name) is not None for s in sets]
            if any(have) and not all(have):
                raise MKVError(f"MKV sets with and without {name} cannot be combined")
            if all(have):
                optional[name] = torch.cat([getattr(s, name) for s in sets])
        return MKVSet(
            [i for s in sets for i in s.ids],
            layers,
            torch.cat([s.z for s in sets]),
            torch.cat([s.delta for s in sets]),
            torch.cat([s.keys for s in sets]),
            **optional,
        )

    def wire_corrections(self) -> torch.Tensor:
        """The corrections, zeros when the set has none (the first-order apply)."""
        if self.corrections is not None:
            return self.corrections
        return torch.zeros(len(self), len(self.layers), self.z.shape[1])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Stacked float32 arrays (the federation's payload, ``WIRE_ARRAYS``) plus the layer list."""
        return {
            "z": self.z.float().numpy(),
            "delta": self.delta.float().numpy(),
            "keys": self.keys.float().numpy(),
            "corrections": self.wire_corrections().float().numpy(),
            "layers": np.asarray(self.layers, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, ids: list[str], arrays: dict[str, np.ndarray]) -> "MKVSet":
        missing = {*WIRE_ARRAYS, "layers"} - set(arrays)
        if missing:
            raise MKVError(f"MKV payload lacks {sorted(missing)}")
        for name in WIRE_ARRAYS:
            if not np.issubdtype(arrays[name].dtype, np.floating):
                raise MKVError(f"{name} must be floating point, got {arrays[name].dtype}")
        return cls(
            list(ids),
            tuple(int(l) for l in arrays["layers"]),
            *(torch.from_numpy(np.array(arrays[k], dtype=np.float32)) for k in WIRE_ARRAYS),
        )


def compute_mkvs(
    editor: MemitEditor,
    requests: list[EditRequest],
    z: ZResult | None = None,
    ids: list[str] | None = None,
    edit: EditResult | None = None,
) -> MKVSet:
    """MKVs of ``requests``: z, delta = z - h_L(base), and the key at every edited layer.

    After a local text-based edit, pass its ``EditResult``: z and the keys are taken from it, the
    keys as MEMIT used them, each read on the model with the earlier layers of this very edit
    written. A receiver applies the layers in the same order, so these keys are what its model
    shows at the request's subject, and the text-free apply then reproduces the text-based edit
    closely (README, "Text-free MKV apply"). Without ``edit`` nothing is applied: z is optimised on
    the current model unless given, and the keys are read on the base model.
    """
    if edit is not None:
        z = edit.z
    z = z or editor.compute_z(requests)
    with editor.at_base():
        h_base = editor.read_site(requests)
        if edit is not None:
            keys = torch.stack([edit.keys[l] for l in editor.hp.layers], dim=1)
        else:
            keys = torch.stack(
                [compute_keys(editor.model, editor.tok, requests, l, editor.templates) for l in editor.hp.layers], dim=1
            )
    ids = ids or [str(r.case_id) for r in requests]
    optional = {}
    if edit is not None and edit.corrections:
        optional["corrections"] = torch.stack([edit.corrections[l] for l in editor.hp.layers], dim=1).float()
    if edit is not None and edit.plain_keys:
        optional["plain_keys"] = torch.stack([edit.plain_keys[l] for l in editor.hp.layers], dim=1).float()
    return MKVSet(ids, tuple(editor.hp.layers), z.z.float(), (z.z - h_base).float(), keys.float(), **optional)


def apply_mkvs(editor: MemitEditor, mkvs: MKVSet) -> dict[int, torch.Tensor]:
    """Edit ``editor.model`` with MKVs only (module docstring); returns the update of each layer."""
    mkvs.validate(editor.d_model, editor.d_ff, tuple(editor.hp.layers))
    if len(mkvs) == 0:
        return {}
    device = editor.device
    keys = mkvs.keys.to(device).double()
    at = (mkvs.plain_keys if mkvs.plain_keys is not None else mkvs.keys).to(device).double()  # where shifts are read
    delta = mkvs.delta.to(device).double()
    updates = {}
    for i, layer in enumerate(editor.hp.layers):
        written = sum(
            at[:, j] @ editor.weight_shift(l).to(device).T
            for j, l in enumerate(editor.hp.layers)
            if editor.moves_site(l)
        )
        if mkvs.corrections is not None:
            written = written + mkvs.corrections[:, i].to(device).double()
        resid = (delta - written) / editor.spread(i)
        update = editor.apply_statistics(layer, *layer_statistics(keys[:, i], resid))
        updates[layer] = update.float().cpu()
    return updates
