"""MEMIT's key statistics C0 = E[k k^T] of the inputs of each edited projection, over public text.

Uncentred second moment over every non-pad token, accumulated in float64, streamed in batches,
cached on disk by (model fingerprint, layer, corpus, sample count, sequence length). The same inputs
give the same matrix bit for bit on one machine: fixed corpus, fixed batch order, no sampling.

Corpus sources:
- ``self`` (default, offline): text sampled from the model itself with a fixed seed;
- a path to a plain text file (e.g. WikiText);
- ``hf:<dataset>[:<config>]``: a Hugging Face dataset's ``text`` column (needs a network).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from fededit_core.io import atomic_file, atomic_write
from fededit_core.memit.nullspace import null_space_basis
from fededit_core.model.families import family_for
from fededit_core.model.fingerprint import model_fingerprint
from fededit_core.model.hooks import capture_inputs, run_until
from fededit_core.model.kv_cache import cache_kwargs, returned_cache
from fededit_core.model.tokens import pad_right
from fededit_core.paths import cache_dir

log = logging.getLogger(__name__)

START_WORDS = ("The", "In", "A", "It", "This", "He", "She", "When", "On", "After", "There", "We")


def _sample_chunks(model, tok, n_samples: int, seq_len: int, seed: int, batch_size: int) -> list[list[int]]:
    """``n_samples`` token sequences of ``seq_len`` sampled from the model (temperature 1)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    starts = [tok(w, add_special_tokens=False)["input_ids"][0] for w in START_WORDS]
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    chunks: list[list[int]] = []
    bar = tqdm(total=n_samples, desc="sampling covariance corpus", unit="seq", leave=False)
    while len(chunks) < n_samples:
        b = min(batch_size, n_samples - len(chunks))
        first = torch.tensor([starts[(len(chunks) + i) % len(starts)] for i in range(b)])[:, None]
        ids = first if bos is None else torch.cat([torch.full((b, 1), bos), first], dim=1)
        past = None
        step_input = ids
        with torch.no_grad():
            while ids.shape[1] < seq_len:
                out = model(input_ids=step_input.to(device), **cache_kwargs(model, past), use_cache=True)
                past = returned_cache(out)
                probs = torch.softmax(out.logits[:, -1].float().cpu(), dim=-1)
                if tok.eos_token_id is not None:
                    probs[:, tok.eos_token_id] = 0.0
                step_input = torch.multinomial(probs, 1, generator=generator)
                ids = torch.cat([ids, step_input], dim=1)
        chunks.extend(ids.tolist())
        bar.update(b)
    bar.close()
    return chunks


def _text_chunks(texts: list[str], tok, n_samples: int, seq_len: int) -> list[list[int]]:
    """Pack the tokenised texts end to end into ``n_samples`` chunks of ``seq_len`` tokens."""
    chunks: list[list[int]] = []
    buffer: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        buffer.extend(tok(text, add_special_tokens=False)["input_ids"])
        while len(buffer) >= seq_len and len(chunks) < n_samples:
            chunks.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
        if len(chunks) >= n_samples:
            break
    if len(chunks) < n_samples and buffer:
        chunks.append(buffer)
    if not chunks:
        raise ValueError("the covariance corpus holds no text")
    return chunks


def _hf_texts(name: str) -> list[str]:
    from datasets import load_dataset  # optional dependency, needs a network

    dataset, _, config = name.partition(":")
    data = load_dataset(dataset, config or None, split="train")
    return list(data["text"])


# Token ids of self-sampled corpora that ship with the package (the embedded model's default): every
# party of a federation then measures C0 on the same tokens whatever its hardware, and the first run
# skips the sampling.
SHIPPED_CORPORA = Path(__file__).parent / "data" / "corpus"


def corpus_chunks(
    model, tok, source: str, n_samples: int, seq_len: int, seed: int = 0, batch_size: int = 64, root: Path | None = None
) -> tuple[list[list[int]], str]:
    """Token chunks of the corpus and a short id of its content (for cache keys and checks)."""
    if source == "self":
        folder = (root / "corpus") if root else cache_dir("corpus")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"self-{model_fingerprint(model)}-s{seed}-n{n_samples}-l{seq_len}.json"
        path = folder / name
        if not path.is_file() and (SHIPPED_CORPORA / name).is_file():
            path = SHIPPED_CORPORA / name  # the embedded model's default corpus ships with the package
        if path.is_file():
            chunks = json.loads(path.read_text())
        else:
            chunks = _sample_chunks(model, tok, n_samples, seq_len, seed, batch_size)
            atomic_write(path, json.dumps(chunks))
    elif source.startswith("hf:"):
        chunks = _text_chunks(_hf_texts(source[3:]), tok, n_samples, seq_len)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"covariance corpus {source!r}: no such file (or use 'self' / 'hf:<name>')")
        chunks = _text_chunks(path.read_text(encoding="utf-8").splitlines(), tok, n_samples, seq_len)
    digest = hashlib.sha256(json.dumps(chunks).encode()).hexdigest()[:16]
    return chunks, digest


def second_moments(
    model: nn.Module,
    layers: list[int],
    chunks: list[list[int]],
    pad_id: int,
    batch_size: int = 16,
    desc: str = "key statistics",
) -> tuple[dict[int, torch.Tensor], int]:
    """Sum over tokens of k k^T (float64) at each layer's edited projection, and the token count.

    The forward pass stops after the last requested layer's projection.
    """
    family = family_for(model)
    device = next(model.parameters()).device
    names = {layer: family.edit_module_name(layer) for layer in layers}
    last = names[max(layers)]
    sums: dict[int, torch.Tensor] = {}
    count = 0
    for start in tqdm(range(0, len(chunks), batch_size), desc=desc, unit="batch", leave=False):
        batch = pad_right(chunks[start : start + batch_size], pad_id).to(device)
        with capture_inputs(model, list(names.values()), stop_after=last) as seen:
            run_until(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        mask = batch.attention_mask.bool()
        count += int(mask.sum())
        for layer, name in names.items():
            keys = seen[name][mask].to(torch.float64)
            contribution = keys.T @ keys
            sums[layer] = contribution if layer not in sums else sums[layer] + contribution
    return {layer: s.cpu() for layer, s in sums.items()}, count


class CovarianceStore:
    """C0 per layer for one model and corpus, computed once and cached on disk."""

    def __init__(
        self,
        model,
        tok,
        source: str = "self",
        n_samples: int = 400,
        seq_len: int = 64,
        seed: int = 0,
        batch_size: int = 16,
        root: Path | None = None,
    ):
        """``root``: cache folder (default: the project cache), e.g. a fresh one to time a cold build."""
        self.model, self.tok = model, tok
        self.source, self.n_samples, self.seq_len, self.seed = source, n_samples, seq_len, seed
        self.batch_size = batch_size
        self.root = Path(root) if root else None
        self.fingerprint = model_fingerprint(model)
        self._chunks: list[list[int]] | None = None
        self.corpus_id: str | None = None
        self._memory: dict[int, torch.Tensor] = {}
        self._null: dict[tuple[int, float], torch.Tensor] = {}
        self._projection: dict[tuple[int, float], torch.Tensor] = {}

    def _path(self, layer: int) -> Path:
        key = self.source
        file = Path(self.source).expanduser()
        if self.source != "self" and not self.source.startswith("hf:") and file.is_file():
            stat = file.stat()  # a rewritten corpus file must not be served the old C0
            key = f"{self.source}|{stat.st_size}|{stat.st_mtime_ns}"
        source_tag = "self" if self.source == "self" else hashlib.sha256(key.encode()).hexdigest()[:10]
        name = f"{self.fingerprint}-L{layer}-{source_tag}-s{self.seed}-n{self.n_samples}-l{self.seq_len}.safetensors"
        folder = (self.root / "covariance") if self.root else cache_dir("covariance")
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def describe(self) -> dict:
        """What a federation compares to be sure every party builds the same C0: the corpus by
        content (a file's sha256), never by a local path, and the sampling settings."""
        source = self.source
        file = Path(self.source).expanduser()
        if source != "self" and not source.startswith("hf:") and file.is_file():
            source = "file:" + hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        return {
            "source": source,
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "model": self.fingerprint,
        }

    def corpus_digest(self) -> str:
        """A short hash of the corpus' token ids: equal only when every party measures C0 on the same
        tokens (a self-sampled corpus can differ between hardware; then ship it as a file)."""
        if self.corpus_id is None:
            self._chunks, self.corpus_id = corpus_chunks(
                self.model, self.tok, self.source, self.n_samples, self.seq_len, self.seed, root=self.root
            )
        return self.corpus_id

    def in_memory(self, layers: list[int]) -> bool:
        return all(layer in self._memory for layer in layers)

    def get(self, layer: int) -> torch.Tensor:
        return self.get_many([layer])[layer]

    def get_many(self, layers: list[int]) -> dict[int, torch.Tensor]:
        """C0 (float64, d_ff x d_ff) for each layer, computing the missing ones in one pass."""
        missing = [l for l in layers if l not in self._memory and not self._path(l).is_file()]
        if missing:
            if self._chunks is None:
                self._chunks, self.corpus_id = corpus_chunks(
                    self.model, self.tok, self.source, self.n_samples, self.seq_len, self.seed, root=self.root
                )
            sums, count = second_moments(
                self.model, missing, self._chunks, self.tok.pad_token_id, self.batch_size, desc=f"C0 layers {missing}"
            )
            for layer in missing:
                mom2 = sums[layer] / count
                with atomic_file(self._path(layer)) as tmp:
                    save_file({"mom2": mom2, "count": torch.tensor([count])}, str(tmp))
                self._memory[layer] = mom2
        for layer in layers:
            if layer not in self._memory:
                self._memory[layer] = load_file(str(self._path(layer)))["mom2"]
        return {layer: self._memory[layer] for layer in layers}

    def null_space(self, layer: int, threshold: float) -> torch.Tensor:
        """AlphaEdit's basis U0 (d_ff, r) of C0's eigenvectors below ``threshold`` (``nullspace``),
        computed once and cached beside C0 under C0's key and the threshold."""
        key = (layer, float(threshold))
        if key not in self._null:
            path = self._path(layer).with_suffix(f".null{threshold:g}.safetensors")
            if path.is_file():
                self._null[key] = load_file(str(path))["basis"]
            else:
                self._null[key] = null_space_basis(self.get(layer), threshold)
                with atomic_file(path) as tmp:
                    save_file({"basis": self._null[key]}, str(tmp))
        return self._null[key]

    def null_space_projection(self, layer: int, threshold: float) -> torch.Tensor:
        """P = U0 U0^T (d_ff, d_ff, float64) of ``null_space``, formed once per layer and threshold."""
        key = (layer, float(threshold))
        if key not in self._projection:
            basis = self.null_space(layer, threshold)
            self._projection[key] = basis @ basis.T
        return self._projection[key]
