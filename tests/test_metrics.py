import math

import pytest
import torch
from torch import nn

from fededit_core.data.requests import EditRequest
from fededit_core.eval.metrics import (
    counterfact_metrics,
    encode_pairs,
    evaluate,
    fluency,
    generate_greedy,
    harmonic_mean,
    ngram_entropy,
    target_nll,
    token_accuracy,
    zsre_metrics,
)
from tests.tiny import FAMILIES, tiny_model_and_tokenizer, tiny_tokenizer

PROMPTS = [
    "The capital of France is",
    "Hi",
    "A much longer prompt that needs a lot of padding when it shares a batch with short ones, namely",
    "Danielle Darrieux's mother tongue is",
    "x",
]
TARGETS = ["Paris", "there", "Rome", "French", "a longer target string"]


def reference_nll_and_acc(model, tok, prompt, target):
    """One example, no batching and no padding: mean NLL and top-1 accuracy on the target tokens."""
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(" " + target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + t_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    nll, hits = 0.0, 0
    for k, token in enumerate(t_ids):
        row = logits[len(p_ids) - 1 + k]
        nll -= torch.log_softmax(row, -1)[token].item()
        hits += int(row.argmax().item() == token)
    return nll / len(t_ids), hits / len(t_ids)


class NextIdOracle(nn.Module):
    """A fake causal LM that predicts token id ``i + 1`` after token ``i`` (logit ``scale``, others 0)."""

    def __init__(self, vocab_size: int, scale: float = 5.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.scale = scale
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        nxt = (input_ids + 1) % self.vocab_size
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits.scatter_(-1, nxt[..., None], self.scale)
        return type("Out", (), {"logits": logits})()


# --------------------------------------------------------------------------- tokenisation


def test_encode_pairs_with_and_without_bos():
    for add_bos in (True, False):
        tok = tiny_tokenizer(add_bos=add_bos)
        ((p_ids, t_ids),) = encode_pairs(tok, ["The capital is"], ["Paris"])
        assert (p_ids[0] == tok.bos_token_id) == add_bos
        assert tok.bos_token_id not in t_ids
        assert tok.decode(t_ids) == " Paris"
        assert tok.decode(p_ids, skip_special_tokens=True) == "The capital is"
    with pytest.raises(ValueError):
        encode_pairs(tok, ["a", "b"], ["c"])


# --------------------------------------------------------------------------- target_nll / token_accuracy


@pytest.mark.parametrize("family", FAMILIES)
def test_target_nll_matches_unbatched_reference(family):
    model, tok = tiny_model_and_tokenizer(family)
    expected = torch.tensor([reference_nll_and_acc(model, tok, p, t)[0] for p, t in zip(PROMPTS, TARGETS)])
    for batch_size in (1, 2, 32):
        got = target_nll(model, tok, PROMPTS, TARGETS, batch_size=batch_size)
        assert got.shape == (len(PROMPTS),)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_target_nll_pad_token_choice_does_not_matter():
    model, tok_no_pad = tiny_model_and_tokenizer("llama")
    _, tok_pad = tiny_model_and_tokenizer("llama", pad_token=True)
    assert tok_no_pad.pad_token is None and tok_pad.pad_token is not None
    a = target_nll(model, tok_no_pad, PROMPTS, TARGETS, batch_size=5)
    b = target_nll(model, tok_pad, PROMPTS, TARGETS, batch_size=5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_target_nll_restores_training_mode():
    model, tok = tiny_model_and_tokenizer("gpt2")
    model.train()
    target_nll(model, tok, PROMPTS[:2], TARGETS[:2])
    assert model.training


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_token_accuracy_matches_unbatched_reference(family):
    model, tok = tiny_model_and_tokenizer(family)
    expected = torch.tensor(
        [reference_nll_and_acc(model, tok, p, t)[1] for p, t in zip(PROMPTS, TARGETS)], dtype=torch.float64
    )
    got = token_accuracy(model, tok, PROMPTS, TARGETS, batch_size=2)
    torch.testing.assert_close(got, expected)


def test_token_accuracy_and_nll_on_constructed_model():
    tok = tiny_tokenizer(add_bos=True)
    b, c, d = tok.convert_tokens_to_ids(["b", "c", "d"])
    assert (c, d) == (b + 1, b + 2)
    oracle = NextIdOracle(len(tok))
    # " bcd" -> [Ġ, b, c, d]: after "a" the oracle says "b" (wrong, target Ġ), after Ġ it says Ġ+1
    # (wrong), after b -> c and after c -> d (right): 2 of 4.  " b" -> [Ġ, b]: 0 of 2.
    prompts = ["xya", "xya", "abc"]
    targets = ["bcd", "b", "defg"]
    acc = token_accuracy(oracle, tok, prompts, targets, batch_size=2)
    assert acc.tolist() == [2 / 4, 0.0, 3 / 5]

    # each right token costs log(e^5 + V - 1) - 5, each wrong one log(e^5 + V - 1)
    z = math.log(math.exp(5.0) + len(tok) - 1)
    expected = torch.tensor([(4 * z - 2 * 5) / 4, z, (5 * z - 3 * 5) / 5])
    torch.testing.assert_close(target_nll(oracle, tok, prompts, targets, batch_size=2), expected)


# --------------------------------------------------------------------------- fluency


def test_ngram_entropy_exact_value():
    # "a b a b": bigrams (a,b) x2, (b,a) x1 -> H2 = h(1/3); trigrams (a,b,a), (b,a,b) -> H3 = 1
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # punctuation is a token: "x, y." -> x , y . : 3 distinct bigrams, 2 distinct trigrams
    assert ngram_entropy("x, y.") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("word") == 0.0
    assert ngram_entropy("two words") == 0.0  # one bigram, no trigram


def test_ngram_entropy_repetition_is_lower():
    repeated = " ".join(["the cat sat"] * 10)
    varied = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches"
    assert ngram_entropy(repeated) < ngram_entropy(varied)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_greedy_batched_equals_single(family):
    model, tok = tiny_model_and_tokenizer(family)
    prompts = ["The capital of France is", "Hi", "Danielle Darrieux's mother tongue is"]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_greedy(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(text.startswith(p) for text, p in zip(batched, prompts))


def test_fluency_value():
    model, tok = tiny_model_and_tokenizer("llama")
    value = fluency(model, tok, ["The capital of France is", "Hi"], max_new_tokens=5)
    assert isinstance(value, float) and value >= 0.0


# --------------------------------------------------------------------------- aggregate metrics


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([0.9, 0.0, 1.0]) == 0.0
    assert harmonic_mean([0.25]) == 0.25
    assert math.isnan(harmonic_mean([]))


def _request(case_id="0", target_new="Paris", target_true="Rome", **kwargs) -> EditRequest:
    defaults = dict(
        subject="Toko Yasuda",
        prompt="{} plays the",
        paraphrase_prompts=("Toko Yasuda is incredible at the", "Toko Yasuda, the"),
        neighborhood_prompts=("John Lennon plays the", "Jimi Hendrix plays the"),
    )
    defaults.update(kwargs)
    return EditRequest(case_id=case_id, target_new=target_new, target_true=target_true, **defaults)


def test_counterfact_metrics_values_and_flip():
    model, tok = tiny_model_and_tokenizer("llama")
    requests = [
        _request("0", "piano", "guitar"),
        _request("1", "violin", "drums", subject="Ann", prompt="{} plays the", paraphrase_prompts=()),
        _request("2", "harp", None, neighborhood_target="bass"),
    ]
    result = counterfact_metrics(model, tok, requests, batch_size=4)
    assert set(result) == {"n", "es", "ps", "ns", "score", "per_request"}
    assert result["n"] == 3
    for key in ("es", "ps", "ns", "score"):
        assert isinstance(result[key], float) and 0.0 <= result[key] <= 1.0
    per = {p["case_id"]: p for p in result["per_request"]}
    assert per["1"]["ps"] is None  # no paraphrases
    assert per["2"]["es"] is None and per["2"]["ps"] is None  # no target_true
    assert per["2"]["ns"] is not None  # neighbourhood target given explicitly

    # ES of request 0 is decided by the two NLLs; swapping the targets flips it
    req = requests[0]
    nll_new, nll_true = target_nll(model, tok, [req.text, req.text], [req.target_new, req.target_true])
    assert nll_new != nll_true
    assert per["0"]["es"] == float(nll_new < nll_true)
    swapped = req.model_copy(update={"target_new": req.target_true, "target_true": req.target_new})
    flipped = counterfact_metrics(model, tok, [swapped])
    assert flipped["per_request"][0]["es"] == 1.0 - per["0"]["es"]
    assert flipped["per_request"][0]["ps"] == pytest.approx(1.0 - per["0"]["ps"])

    # NS counts neighbourhood prompts where the true answer beats target_new
    nll_nb_true = target_nll(model, tok, list(req.neighborhood_prompts), ["guitar"] * 2)
    nll_nb_new = target_nll(model, tok, list(req.neighborhood_prompts), ["piano"] * 2)
    assert per["0"]["ns"] == pytest.approx(float((nll_nb_true < nll_nb_new).float().mean()))

    # aggregates are means over the requests where each rate is defined
    assert result["es"] == pytest.approx((per["0"]["es"] + per["1"]["es"]) / 2)
    assert result["ps"] == pytest.approx(per["0"]["ps"])
    assert result["ns"] == pytest.approx(sum(p["ns"] for p in per.values()) / 3)
    assert result["score"] == pytest.approx(harmonic_mean([result["es"], result["ps"], result["ns"]]))


def test_counterfact_metrics_on_constructed_model():
    tok = tiny_tokenizer(add_bos=False)
    oracle = NextIdOracle(len(tok))
    # after "...a" the oracle continues b, c, d, ...: " bcd" gets 2 of 4 tokens right, " xq" 0 of 3
    req = EditRequest(
        case_id="c",
        subject="S",
        prompt="{} a",
        target_new="bcd",
        target_true="xq",
        paraphrase_prompts=("S is a",),
        neighborhood_prompts=("T a", "U b"),
        neighborhood_target="bc",
    )
    result = counterfact_metrics(oracle, tok, [req])
    # with z = log(e^5 + V - 1): ES/PS: nll(new) = (4z - 10) / 4 < nll(true) = z. NS: after "T a" and
    # "U b" alike, " bc" gets 1 of 3 right, so nll(true) = z - 5/3 is not below nll(new) = z - 5/2
    assert (result["es"], result["ps"], result["ns"]) == (1.0, 1.0, 0.0)
    assert result["score"] == 0.0


def test_zsre_metrics_on_constructed_model_and_dispatch():
    tok = tiny_tokenizer(add_bos=True)
    oracle = NextIdOracle(len(tok))
    req = EditRequest(
        case_id="z",
        subject="S",
        prompt="{} a",
        target_new="bcd",
        paraphrase_prompts=("S is a", "S is x"),
        neighborhood_prompts=("Q c",),
        neighborhood_target="de",
    )
    bare = EditRequest(case_id="y", subject="S", prompt="{} a", target_new="bcd")
    result = zsre_metrics(oracle, tok, [req, bare])
    # " bcd" after "a" or "x": 2 of 4; " de" after "c": [Ġ, d, e] -> only e is right: 1 of 3
    assert result["per_request"][0] == {"case_id": "z", "ea": 0.5, "pa": 0.5, "na": 1 / 3}
    assert result["per_request"][1] == {"case_id": "y", "ea": 0.5, "pa": None, "na": None}
    assert (result["n"], result["ea"], result["pa"]) == (2, 0.5, 0.5)
    assert result["na"] == pytest.approx(1 / 3)
    assert result["score"] == pytest.approx(harmonic_mean([0.5, 0.5, 1 / 3]))

    assert evaluate(oracle, tok, [req], "zsre")["ea"] == 0.5
    assert evaluate(oracle, tok, [req], "counterfact")["n"] == 1
    assert "es" in evaluate(oracle, tok, [req], "requests")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        evaluate(oracle, tok, [req], "squad")


def test_evaluate_with_fluency():
    model, tok = tiny_model_and_tokenizer("gpt2")
    reqs = [_request("0", "piano", "guitar", generation_prompts=("Toko Yasuda is",)), _request("1", "harp", "bass")]
    result = evaluate(model, tok, reqs, "counterfact", fluency=True, max_new_tokens=4)
    assert result["fluency"] >= 0.0 and len(result["per_request"]) == 2
    zs = evaluate(model, tok, reqs, "zsre", fluency=True, max_new_tokens=4)
    assert zs["fluency"] >= 0.0 and 0.0 <= zs["ea"] <= 1.0
