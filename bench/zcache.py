"""z optimised once on the base model, kept on disk by a key of its inputs (benchmarks).

MEMIT's target z = h_L + δ (Meng et al. 2023, Eq. 16) is optimised on the model being edited. A
benchmark that runs many strategies on the same requests can instead optimise each request's z
once on the *base* model and let every method reuse it: the update of a later edit then uses the
residual z − h_L(current model), as in the text-free residual estimate. The key of a request's z
is sha256(model fingerprint, the hyperparameters that shape z, the context templates, the request),
so a changed input never meets a stale z. One ``.pt`` file per request, written whole then renamed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fededit_core.data.loaders import request_to_record
from fededit_core.data.requests import EditRequest
from fededit_core.io import atomic_file
from fededit_core.memit.target import ZResult
from fededit_core.model.fingerprint import model_fingerprint

# hyperparameters that do not change z (the layer update and C0 only); ``editor`` changes it only
# for PMET, whose targets are its own (``_editor_prefix``)
NOT_Z_FIELDS = (
    "mom2_weight",
    "cov_source",
    "cov_samples",
    "cov_seq_len",
    "batch_size",
    "editor",
    "nullspace_threshold",
    "alphaedit_l2",
)


class BaseZCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._prefix: dict[int, str] = {}  # id(editor) -> hash of the request-independent inputs
        self.optimised = 0
        self.hits = 0

    def _editor_prefix(self, editor) -> str:
        if id(editor) not in self._prefix:
            with editor.at_base():
                fingerprint = model_fingerprint(editor.model)
            hp = {k: v for k, v in editor.hp.model_dump().items() if k not in NOT_Z_FIELDS}
            if editor.at_ffn:
                hp["targets"] = editor.hp.editor
            self._prefix[id(editor)] = json.dumps([fingerprint, hp, editor.templates.digest()], default=str)
        return self._prefix[id(editor)]

    def key(self, editor, request: EditRequest) -> str:
        text = self._editor_prefix(editor) + json.dumps(request_to_record(request), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def z_for(self, editor, requests: list[EditRequest], progress: bool = False) -> ZResult:
        """z (from the cache, or optimised on the base model and stored) and, on the current model, where
        z lives (h_L, or PMET's FFN output)."""
        started = time.perf_counter()
        keys = [self.key(editor, r) for r in requests]
        z = torch.zeros(len(requests), editor.d_model)
        missing = []
        for i, key in enumerate(keys):
            path = self._path(key)
            if path.is_file():
                z[i] = torch.load(path, weights_only=True)
            else:
                missing.append(i)
        self.hits += len(requests) - len(missing)
        if missing:
            with editor.at_base():
                fresh = editor.optimise_targets([requests[i] for i in missing], progress=progress)
            for row, i in enumerate(missing):
                z[i] = fresh.z[row].float().cpu()
                with atomic_file(self._path(keys[i])) as tmp:
                    torch.save(z[i].clone(), tmp)
            self.optimised += len(missing)
        h = editor.read_site(requests).float().cpu()
        return ZResult(z.to(h.dtype), h, seconds=time.perf_counter() - started)

    def prefill(self, editor, requests: list[EditRequest], chunk: int = 64) -> None:
        """Optimise every missing z in chunks (a progress bar; an interruption keeps what is done)."""
        todo = [r for r in requests if not self._path(self.key(editor, r)).is_file()]
        bar = tqdm(total=len(requests), initial=len(requests) - len(todo), desc="z on the base model", unit="req")
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            self.z_for(editor, part)
            bar.update(len(part))
        bar.close()
