"""Edit-quality metrics (CounterFact and zsRE), batched, for any Hugging Face causal LM.

Targets are scored as the continuation ``" " + target`` of a prompt. The prompt is tokenised as
the tokenizer does by default (with its BOS token, if it adds one) and the target separately with
``add_special_tokens=False``; the two id lists are concatenated, so a target has the same ids
after every prompt. Batches are right padded (pad id: the tokenizer's pad token, else its EOS).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from fededit_core.data.requests import EditRequest
from fededit_core.model.tokens import pad_left, pad_right

__all__ = [
    "counterfact_metrics",
    "encode_pairs",
    "evaluate",
    "fluency",
    "harmonic_mean",
    "ngram_entropy",
    "target_nll",
    "token_accuracy",
    "zsre_metrics",
]


# --------------------------------------------------------------------------- tokenisation


def _trailing_special_count(tok) -> int:
    """How many special tokens the tokenizer appends after a text (e.g. an EOS); usually 0."""
    with_special = tok("a")["input_ids"]
    without = tok("a", add_special_tokens=False)["input_ids"]
    if not without:
        return 0
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return len(with_special) - start - len(without)
    return 0


def _pad_id(tok) -> int:
    for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def encode_pairs(tok, prompts: Sequence[str], targets: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, target_ids)`` per pair: ``tok(prompt)`` (special tokens as the tokenizer adds
    them at the start) and ``tok(" " + target.strip(), add_special_tokens=False)``."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    trailing = _trailing_special_count(tok)
    prompt_ids = tok(list(prompts))["input_ids"]
    target_ids = tok([" " + t.strip() for t in targets], add_special_tokens=False)["input_ids"]
    pairs = []
    for prompt, target, p_ids, t_ids in zip(prompts, targets, prompt_ids, target_ids):
        p_ids = list(p_ids[: len(p_ids) - trailing] if trailing else p_ids)
        if not p_ids:
            raise ValueError(f"prompt {prompt!r} tokenises to nothing: the first target token has no context")
        if not t_ids:
            raise ValueError(f"target {target!r} tokenises to nothing")
        pairs.append((p_ids, list(t_ids)))
    return pairs


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _target_logprobs(model, tok, prompts, targets, batch_size: int):
    """Yield ``(index, logprobs (T_i, V) float32, target ids (T_i,))`` for every pair.

    Sequences are sorted by length so that batches carry little padding.
    """
    pairs = encode_pairs(tok, prompts, targets)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = _pad_id(tok)
    device = _device(model)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    with torch.no_grad(), _eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = pad_right([pairs[i][0] + pairs[i][1] for i in chunk], pad).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            for row, i in enumerate(chunk):
                n_prompt, n_target = len(pairs[i][0]), len(pairs[i][1])
                # the logits at position t predict token t + 1
                rows = logits[row, n_prompt - 1 : n_prompt - 1 + n_target].float()
                yield i, F.log_softmax(rows, dim=-1), torch.tensor(pairs[i][1], device=rows.device)


def target_nll(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Mean per-token negative log-likelihood of ``" " + target`` after ``prompt``.

    ``nll_i = -(1/T_i) * sum_t log p(y_t | prompt_i, y_<t)`` over the T_i target tokens; shape (N,), CPU float32.
    """
    out = torch.zeros(len(prompts), dtype=torch.float32)
    for i, logprobs, ids in _target_logprobs(model, tok, prompts, targets, batch_size):
        out[i] = -logprobs.gather(1, ids[:, None]).mean().cpu()
    return out


def token_accuracy(model, tok, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Teacher-forced top-1 accuracy on the target tokens.

    ``acc_i = (1/T_i) * sum_t [argmax_v p(v | prompt_i, y_<t) == y_t]``; shape (N,), CPU float64.
    """
    out = torch.zeros(len(prompts), dtype=torch.float64)
    for i, logprobs, ids in _target_logprobs(model, tok, prompts, targets, batch_size):
        out[i] = int((logprobs.argmax(dim=-1) == ids).sum()) / len(ids)
    return out


# --------------------------------------------------------------------------- aggregation helpers


def harmonic_mean(values: Iterable[float]) -> float:
    """``n / sum(1 / v)``; 0 if any value is 0 (or negative), NaN for no values."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan")
    if any(v <= 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _score(metrics: Sequence[float]) -> float:
    """Harmonic mean of the metrics that are defined (not NaN)."""
    return harmonic_mean([m for m in metrics if not math.isnan(m)])


def summarise(per_request: Sequence[dict], parts: Sequence[str]) -> dict:
    """``{"n", part: mean over the requests where it is defined, "score": harmonic mean of the defined}``."""
    means = {k: _mean([p[k] for p in per_request if p.get(k) is not None]) for k in parts}
    return {"n": len(per_request), **means, "score": _score(list(means.values()))}


class _Queue:
    """Collects (prompt, target) pairs and hands back their scores by slot."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.targets: list[str] = []

    def add(self, prompts: Sequence[str], target: str) -> slice:
        start = len(self.prompts)
        self.prompts.extend(prompts)
        self.targets.extend([target] * len(prompts))
        return slice(start, len(self.prompts))


# --------------------------------------------------------------------------- fluency


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str) -> float:
    """ROME's generation-entropy fluency score of one text.

    Words/punctuation are split by the regex ``\\w+|[^\\w\\s]``; for n in (2, 3),
    ``H_n = -sum_g f_g log2 f_g`` over the relative frequencies f_g of the text's n-grams (0 when it
    has none); the score is ``mean(2/3 * H_2, 4/3 * H_3)``.
    """
    tokens = _WORD.findall(text)
    weighted = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = -sum((c / total) * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return float(sum(weighted) / len(weighted))


GENERATION_BATCH = 64  # prompts per greedy-generation batch, chosen with bench.generation_speed (README)


def generate_greedy(
    model, tok, prompts: Sequence[str], max_new_tokens: int = 40, batch_size: int = GENERATION_BATCH
) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left padded); returns prompt + continuation text.

    Decoding one token is dominated by per-step overhead at small batches, so larger batches pay.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    pad = _pad_id(tok)
    device = _device(model)
    trailing = _trailing_special_count(tok)
    encoded = [ids[: len(ids) - trailing] if trailing else ids for ids in tok(list(prompts))["input_ids"]]
    texts: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    with torch.no_grad(), _eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = pad_left([encoded[i] for i in chunk], pad).to(device)
            width = batch.input_ids.shape[1]
            out = model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
            )
            for row, i in enumerate(chunk):
                new = tok.decode(out[row, width:].tolist(), skip_special_tokens=True)
                texts[i] = prompts[i] + new
    return texts


def fluency(model, tok, prompts: Sequence[str], max_new_tokens: int = 40, batch_size: int = GENERATION_BATCH) -> float:
    """Mean :func:`ngram_entropy` of the greedy generations (prompt + continuation) of ``prompts``."""
    texts = generate_greedy(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return _mean([ngram_entropy(t) for t in texts])


# --------------------------------------------------------------------------- CounterFact


def counterfact_metrics(
    model,
    tok,
    requests: Sequence[EditRequest],
    batch_size: int = 32,
    fluency: bool = False,
    max_new_tokens: int = 40,
) -> dict:
    """CounterFact success rates, with ``nll`` = :func:`target_nll`:

    * ES = mean_r [nll(new | edit prompt) < nll(true | edit prompt)]
    * PS = mean_r mean_{p in paraphrases} [nll(new | p) < nll(true | p)]
    * NS = mean_r mean_{p in neighbourhood} [nll(nt | p) < nll(new | p)], nt = ``request.locality_target``
    * Score = harmonic mean of ES, PS, NS (0 if any is 0).

    A request without ``target_true`` is skipped for ES and PS, one without paraphrases for PS, and
    one without neighbourhood prompts or a neighbourhood target (``neighborhood_target``, else
    ``target_true``) for NS: its per-request value is ``None``. A rate with no request is NaN and the
    Score is the harmonic mean of the rates that are defined.

    With ``fluency=True``, "fluency" is the mean :func:`ngram_entropy` of greedy generations
    (``max_new_tokens``) from each request's ``generation_prompts`` (its edit prompt when it has none),
    averaged per request, then over requests.

    Returns ``{"n", "es", "ps", "ns", "score", "per_request": [{"case_id", "es", "ps", "ns"}, ...]}``.
    """
    queue = _Queue()
    slots = []
    for r in requests:
        slot: dict[str, slice] = {}
        if r.target_true is not None:
            slot["es_new"] = queue.add([r.text], r.target_new)
            slot["es_true"] = queue.add([r.text], r.target_true)
            if r.paraphrase_prompts:
                slot["ps_new"] = queue.add(r.paraphrase_prompts, r.target_new)
                slot["ps_true"] = queue.add(r.paraphrase_prompts, r.target_true)
        if r.neighborhood_prompts and r.locality_target is not None:
            slot["ns_new"] = queue.add(r.neighborhood_prompts, r.target_new)
            slot["ns_true"] = queue.add(r.neighborhood_prompts, r.locality_target)
        slots.append(slot)

    nll = target_nll(model, tok, queue.prompts, queue.targets, batch_size=batch_size)

    def rate(good: str, bad: str, slot) -> float | None:
        if good not in slot:
            return None
        wins = nll[slot[good]] < nll[slot[bad]]
        return int(wins.sum()) / len(wins)

    per_request = []
    for r, slot in zip(requests, slots):
        per_request.append(
            {
                "case_id": r.case_id,
                "es": rate("es_new", "es_true", slot),
                "ps": rate("ps_new", "ps_true", slot),
                "ns": rate("ns_true", "ns_new", slot),
            }
        )
    result = summarise(per_request, ("es", "ps", "ns"))

    if fluency:
        result["fluency"] = _request_fluency(model, tok, requests, max_new_tokens)
    result["per_request"] = per_request
    return result


def _request_fluency(model, tok, requests: Sequence[EditRequest], max_new_tokens: int) -> float:
    prompts: list[str] = []
    owners: list[int] = []
    for k, r in enumerate(requests):
        gen = list(r.generation_prompts) or [r.text]
        prompts.extend(gen)
        owners.extend([k] * len(gen))
    texts = generate_greedy(model, tok, prompts, max_new_tokens=max_new_tokens)
    per: dict[int, list[float]] = {}
    for k, text in zip(owners, texts):
        per.setdefault(k, []).append(ngram_entropy(text))
    return _mean([_mean(v) for v in per.values()])


# --------------------------------------------------------------------------- zsRE


def zsre_metrics(model, tok, requests: Sequence[EditRequest], batch_size: int = 32) -> dict:
    """zsRE accuracies, with ``acc`` = :func:`token_accuracy` (teacher-forced top-1):

    * EA = mean_r acc(new | edit prompt)
    * PA = mean_r mean_{p in paraphrases} acc(new | p)
    * NA = mean_r mean_{p in neighbourhood} acc(nt | p), nt = ``request.locality_target``
    * Score = harmonic mean of EA, PA, NA (0 if any is 0).

    Requests without paraphrases (or without neighbourhood prompts or target) are skipped for PA (NA).
    Returns ``{"n", "ea", "pa", "na", "score", "per_request": [{"case_id", "ea", "pa", "na"}, ...]}``.
    """
    queue = _Queue()
    slots = []
    for r in requests:
        slot = {"ea": queue.add([r.text], r.target_new)}
        if r.paraphrase_prompts:
            slot["pa"] = queue.add(r.paraphrase_prompts, r.target_new)
        if r.neighborhood_prompts and r.locality_target is not None:
            slot["na"] = queue.add(r.neighborhood_prompts, r.locality_target)
        slots.append(slot)

    acc = token_accuracy(model, tok, queue.prompts, queue.targets, batch_size=batch_size)
    per_request = [
        {"case_id": r.case_id, **{k: (acc[slot[k]].mean().item() if k in slot else None) for k in ("ea", "pa", "na")}}
        for r, slot in zip(requests, slots)
    ]
    return {**summarise(per_request, ("ea", "pa", "na")), "per_request": per_request}


# --------------------------------------------------------------------------- dispatch


def evaluate(
    model,
    tok,
    requests: Sequence[EditRequest],
    kind: str,
    batch_size: int = 32,
    fluency: bool = False,
    max_new_tokens: int = 40,
) -> dict:
    """``counterfact_metrics`` for kind "counterfact" or "requests", ``zsre_metrics`` for "zsre".

    ``fluency=True`` adds "fluency" (see :func:`counterfact_metrics`) for either kind.
    """
    if kind in ("counterfact", "requests"):
        return counterfact_metrics(
            model, tok, requests, batch_size=batch_size, fluency=fluency, max_new_tokens=max_new_tokens
        )
    if kind == "zsre":
        result = zsre_metrics(model, tok, requests, batch_size=batch_size)
        if fluency:
            per_request = result.pop("per_request")
            result["fluency"] = _request_fluency(model, tok, requests, max_new_tokens)
            result["per_request"] = per_request
        return result
    raise ValueError(f"unknown dataset kind {kind!r}; expected 'counterfact', 'requests' or 'zsre'")
