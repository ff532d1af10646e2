"""What an honest-but-curious server can read back from what it holds, with the public base model.

The server knows the base model, the project's public context templates, the edited layers R and
lambda (from the hello) and C0 (public text); it does not know the prompts. Its candidates are a
pool of subjects and a set of objects. At the first edited layer l0 = R[0] a request's key is
k = mean over templates of the input of W_out at the subject's last token (``compute_keys``); the
server computes the candidates' keys itself with the bare subject as the prompt.

- **Keys** (FedEdit's MKVs): the nearest candidate key (cosine) to an uploaded key names the subject.
- **A subspace** (CollabEdit's K K^T, its SecAgg+ sum, EditAvg's Delta): an upload of m edits
  spans a space of dimension m. For K K^T = sum k k^T it is the top-m eigenvectors; for
  Delta = R K^T (lambda C0 + K K^T)^-1 the row space equals span(C0^-1 K) (Woodbury), so the
  server scores C0^-1 k of each candidate against Delta's top-m right singular vectors. A candidate
  scores |U^T u| / |u|. The subspace names a set, not an order: a victim counts as found within
  top-k when fewer than k candidates outside the upload's own subjects score above it.
- **Objects from z** (Eq. 16's z = h_L + delta): the model run on the recovered subject alone with
  z written at its last token at layer L; each candidate object is scored by its mean token
  log-probability after the subject with z minus without (the rise z causes), best first.
  From a subspace the server first estimates the residuals of its m recovered subjects K^:
  R^ = (R K^T) K^ (K^T K^)^-1 (CollabEdit; with EditAvg R K^T = Delta (lambda C0 + K^ K^T)), and
  z^ = h_L + |R| r^ (the residual at l0 is (z - h_L) / |R|).
"""

from __future__ import annotations

import numpy as np
import torch

from fededit_core.data.requests import EditRequest
from fededit_core.memit.editor import MemitEditor
from fededit_core.memit.keys import compute_keys, hidden_at_subject
from fededit_core.model.families import family_for
from fededit_core.model.tokens import encode_with_subject, pad_right


def _probe(subject: str, i: int = 0) -> EditRequest:
    return EditRequest(case_id=f"candidate-{i}", subject=subject, prompt="{}", target_new="-")


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.nan_to_num(np.asarray(rows, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


class Attacker:
    """The server's attacks, with the base model in ``editor`` (at its base weights)."""

    def __init__(self, editor: MemitEditor, subjects: list[str], objects: list[str], batch_size: int = 64):
        self.editor, self.subjects, self.objects, self.batch_size = editor, list(subjects), list(objects), batch_size
        self.layer = editor.hp.layers[0]
        with editor.at_base():
            probes = [_probe(s, i) for i, s in enumerate(self.subjects)]
            keys = [
                compute_keys(editor.model, editor.tok, probes[i : i + 256], self.layer, editor.templates)
                for i in range(0, len(probes), 256)
            ]
        self.keys = torch.cat(keys).double().numpy()  # (pool, d_ff)
        c0 = editor.c0()[self.layer].double().numpy()
        self.c0, self.mom2 = c0, float(editor.hp.mom2_weight)
        self.c0_inv_keys = np.linalg.solve(c0, self.keys.T).T  # C0^-1 k per candidate (EditAvg's space)

    # --- subjects -------------------------------------------------------------------------------
    def nearest(self, rows: np.ndarray) -> np.ndarray:
        """(n, pool) cosine of each uploaded key to each candidate key."""
        return _unit(rows) @ _unit(self.keys).T

    def subspace_scores(self, basis: np.ndarray, editavg: bool = False) -> np.ndarray:
        """(pool,) |U^T u| / |u| with U (d_ff, m) orthonormal; u = k, or C0^-1 k for EditAvg."""
        u = _unit(self.c0_inv_keys if editavg else self.keys)
        return np.linalg.norm(u @ basis, axis=1)

    @staticmethod
    def rank_of(scores: np.ndarray, truth: int, others: set[int] = frozenset()) -> int:
        """1 + the number of candidates (not in ``others``) scoring above ``truth``."""
        above = scores > scores[truth]
        if others:
            above[list(others)] = False
        return int(above.sum()) + 1 if np.isfinite(scores[truth]) else len(scores)

    # --- objects --------------------------------------------------------------------------------
    @torch.no_grad()
    def object_scores(self, subject: str, z: np.ndarray) -> np.ndarray:
        """(objects,) mean log-prob of each object after ``subject`` with z at layer L minus without."""
        editor = self.editor
        tok, model = editor.tok, editor.model
        ids, index = encode_with_subject(tok, "{}", subject)
        tails = [tok(" " + o, add_special_tokens=False).input_ids for o in self.objects]
        z = torch.as_tensor(np.nan_to_num(np.asarray(z, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0))
        block = model.get_submodule(f"{family_for(model).layers_path}.{editor.hp.z_layer}")
        scores = []
        with editor.at_base():
            for inject in (True, False):
                out = []
                for start in range(0, len(tails), self.batch_size):
                    chunk = tails[start : start + self.batch_size]
                    batch = pad_right([ids + t for t in chunk], tok.pad_token_id)

                    def write_z(module, args, output):
                        hidden = output[0] if isinstance(output, tuple) else output
                        hidden[:, index] = z.to(hidden.dtype)
                        return output

                    handle = block.register_forward_hook(write_z) if inject else None
                    try:
                        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                    finally:
                        if handle is not None:
                            handle.remove()
                    logp = torch.log_softmax(logits.double(), dim=-1)
                    for row, tail in enumerate(chunk):
                        positions = torch.arange(len(ids) - 1, len(ids) - 1 + len(tail))
                        out.append(float(logp[row, positions, torch.tensor(tail)].mean()))
                scores.append(np.asarray(out))
        rise = scores[0] - scores[1]
        return np.where(np.isfinite(rise), rise, -np.inf)

    def hidden(self, subjects: list[str]) -> np.ndarray:
        """h_L (n, d) of the bare subjects on the base model."""
        with self.editor.at_base():
            probes = [_probe(s, i) for i, s in enumerate(subjects)]
            return (
                hidden_at_subject(self.editor.model, self.editor.tok, probes, self.editor.hp.z_layer).double().numpy()
            )

    def residuals(self, rk: np.ndarray, found: list[int]) -> np.ndarray:
        """R^ (m, d): the residuals of the recovered candidates ``found`` from R K^T (least squares)."""
        keys = self.keys[found].T  # (d_ff, m)
        return (rk @ keys @ np.linalg.pinv(keys.T @ keys)).T

    def editavg_rk(self, delta: np.ndarray, found: list[int]) -> np.ndarray:
        """R K^T = Delta (lambda C0 + K K^T), with K the recovered candidates' keys."""
        keys = self.keys[found].T
        return delta @ (self.mom2 * self.c0 + keys @ keys.T)

    def z_estimates(self, resid: np.ndarray, found: list[int]) -> np.ndarray:
        """z^ = h_L(subject) + |R| r^ (the residual at the first of |R| layers)."""
        return self.hidden([self.subjects[i] for i in found]) + len(self.editor.hp.layers) * resid


def top_k(ranks: list[int], k: int) -> float:
    return float(np.mean([r <= k for r in ranks])) if ranks else 0.0


def basis_of_kk(kk: np.ndarray, m: int) -> np.ndarray:
    """The top-m eigenvectors (d_ff, m) of a symmetric K K^T."""
    values, vectors = np.linalg.eigh((kk + kk.T) / 2)
    return vectors[:, np.argsort(values)[::-1][:m]]


def basis_of_delta(delta: np.ndarray, m: int) -> np.ndarray:
    """The top-m right singular vectors (d_ff, m) of Delta (d, d_ff)."""
    _, _, vt = np.linalg.svd(delta, full_matrices=False)
    return vt[:m].T
