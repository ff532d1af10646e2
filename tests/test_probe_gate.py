"""The probe gate (fedleke/probe.py) on a tiny random model: where it writes, what it measures, what it keeps."""

import pytest
import torch

from fededit_core.data.requests import EditRequest
from fededit_core.fedleke.probe import _next_token_logp, probe_divergence, probe_keep, probe_requests
from fededit_core.memit.keys import hidden_at_last_token, hidden_at_subject
from fededit_core.model.tokens import encode_with_subject
from tests.tiny import tiny_model_and_tokenizer

LAYER = 1
OWN = [
    EditRequest(case_id="0", subject="Paris", prompt="The capital of {} is", target_new="Rome"),
    EditRequest(case_id="1", subject="Danielle Darrieux", prompt="{} speaks", target_new="English"),
]


@pytest.fixture(scope="module")
def lm():
    return tiny_model_and_tokenizer("llama", pad_token=True)


def test_writing_the_prompts_own_hidden_state_changes_nothing(lm):
    """The write lands at the subject's last token: writing there what block L computes anyway gives
    the unmodified next-token distribution, and writing anything else changes it."""
    model, tok = lm
    h = hidden_at_subject(model, tok, OWN, LAYER)
    seqs, positions = zip(*(encode_with_subject(tok, r.prompt, r.subject) for r in OWN))
    with torch.no_grad():
        plain = [torch.log_softmax(model(torch.tensor([s])).logits[0, -1].float(), -1) for s in seqs]
    written = _next_token_logp(model, tok, list(seqs), list(positions), h, LAYER)
    torch.testing.assert_close(written, torch.stack(plain), atol=1e-5, rtol=1e-5)
    moved = _next_token_logp(model, tok, list(seqs), list(positions), h + 3 * torch.randn_like(h), LAYER)
    assert (moved - written).abs().max() > 1e-2


def test_the_divergence_is_zero_without_delta_and_grows_with_it(lm):
    model, tok = lm
    torch.manual_seed(0)
    h = torch.randn(3, model.config.hidden_size)
    direction = torch.randn(3, model.config.hidden_size)
    none = probe_divergence(model, tok, OWN, h, torch.zeros_like(h), LAYER)
    assert none.shape == (2, 3) and none.abs().max() < 1e-5
    small = probe_divergence(model, tok, OWN, h + 0.1 * direction, 0.1 * direction, LAYER)
    large = probe_divergence(model, tok, OWN, h + 2.0 * direction, 2.0 * direction, LAYER)
    assert (small >= 0).all() and (large > small).all()
    # one pair at a time or all together: the same numbers
    torch.testing.assert_close(
        probe_divergence(model, tok, OWN, h + direction, direction, LAYER, batch_size=2),
        probe_divergence(model, tok, OWN, h + direction, direction, LAYER, batch_size=64),
        atol=1e-5,
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="alike"):
        probe_divergence(model, tok, OWN, h, h[:2], LAYER)


def test_the_probe_keeps_what_moves_any_own_answer_and_one_prompt_per_template():
    s = torch.tensor([[0.1, 2.0, 0.1], [0.05, 0.1, 0.6]])
    assert probe_keep(s, tau=0.5).tolist() == [False, True, True]
    assert probe_keep(s, tau=5.0).tolist() == [False, False, False]
    assert probe_keep(torch.zeros(0, 3), tau=0.0).tolist() == [False, False, False]  # nothing of its own
    again = EditRequest(case_id="2", subject="Berlin", prompt="The capital of {} is", target_new="Oslo")
    assert [r.case_id for r in probe_requests([OWN[0], again, OWN[1]])] == ["0", "1"]


def test_block_outputs_are_read_at_each_prompts_last_token(lm):
    model, tok = lm
    got = hidden_at_last_token(model, tok, OWN, LAYER)  # prompts of different lengths, padded together
    for row, r in zip(got, OWN):
        with torch.no_grad():
            states = model(**tok(r.text, return_tensors="pt"), output_hidden_states=True).hidden_states
        torch.testing.assert_close(row, states[LAYER + 1][0, -1].float(), atol=1e-5, rtol=1e-5)
