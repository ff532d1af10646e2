"""PMET on tiny models: targets at L's FFN output from a joint attention + FFN optimisation, only
W_out written, residuals spread by sqrt(layers left), and the text-free MKV apply reproducing the
text edit (exactly with the corrections)."""

from __future__ import annotations

import math

import pytest
import torch

from fededit_core.fedleke.mkv import apply_mkvs, compute_mkvs
from fededit_core.memit.hparams import default_hparams
from fededit_core.memit.keys import ffn_output_at_subject
from fededit_core.memit.pmet import optimise_pmet_targets
from tests.test_memit_tiny import REQUESTS, corpus, edited_names, make_editor, make_model, snapshot

__all__ = ["corpus"]  # the tiny corpus fixture of test_memit_tiny


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))


PMET = dict(editor="pmet", v_lr=0.5, v_steps=40, kl_factor=0.0625, clamp_norm_factor=4.0, v_weight_decay=0.01)


def test_targets_start_at_the_ffn_output_and_move_the_attention_too(corpus):
    model, tok = make_model("llama")
    editor = make_editor(model, tok, corpus, **PMET)
    before = snapshot(model)
    result = optimise_pmet_targets(model, tok, REQUESTS, editor.hp, editor.templates, progress=False)
    torch.testing.assert_close(result.h, ffn_output_at_subject(model, tok, REQUESTS, 2), rtol=1e-4, atol=1e-5)
    assert (result.delta.norm(dim=1) > 1e-3).all()
    assert all(p > 0.1 for p in result.target_prob)  # the two deltas together lift the target from ~e^-6
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # hooks only, nothing kept


def test_an_edit_writes_only_w_out_towards_the_ffn_target(corpus):
    model, tok = make_model("llama")
    editor = make_editor(model, tok, corpus, **PMET)
    assert editor.at_ffn and editor.spread(0) == math.sqrt(2) and editor.moves_site(2) and not editor.moves_site(1)
    before_state = snapshot(model)
    z = editor.compute_z(REQUESTS, progress=False)
    keys, resid = editor.layer_inputs(REQUESTS, z.z, 0)
    torch.testing.assert_close(resid * math.sqrt(2), z.z - editor.read_site(REQUESTS))
    editor.edit(REQUESTS, z=z, progress=False)
    changed = edited_names(model, (1, 2))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before_state[name]) != (name in changed), name
    # the closed form wrote the FFN target (the attention target is not written: on these tiny models
    # it carries much of the effect, so the target NLL itself need not fall)
    gap = (editor.read_site(REQUESTS) - z.z).norm(dim=1) / z.delta.norm(dim=1)
    assert (gap < 0.25).all(), gap


def test_mkvs_reproduce_a_pmet_edit_exactly_with_their_corrections(corpus):
    model_a, tok = make_model("llama")
    model_b, _ = make_model("llama")
    text_editor = make_editor(model_a, tok, corpus, **PMET)
    mkv_editor = make_editor(model_b, tok, corpus, **PMET)
    text = text_editor.edit(REQUESTS, progress=False)
    mkvs = compute_mkvs(text_editor, REQUESTS, edit=text)
    torch.testing.assert_close(mkvs.delta, (text.z.z - text.z.h).float(), rtol=1e-4, atol=1e-5)  # FFN-space
    updates = apply_mkvs(mkv_editor, mkvs)
    for layer in (1, 2):
        scale = float(text.deltas[layer].abs().max())
        torch.testing.assert_close(updates[layer], text.deltas[layer], rtol=0, atol=1e-4 * scale)


def test_pmet_takes_its_published_settings_unless_overridden():
    hp = default_hparams("gptj", editor="pmet")
    assert (hp.v_lr, hp.v_steps, hp.kl_factor, hp.mom2_weight) == (0.2, 30, 1.0, 6000.0)
    assert default_hparams("gptj", editor="pmet", mom2_weight=100.0).mom2_weight == 100.0
    assert default_hparams("gptj").mom2_weight == 15000.0


def test_smollm2_takes_its_swept_pmet_settings_and_keeps_memits():
    from types import SimpleNamespace

    from fededit_core.memit.hparams import MODEL_EDITOR_DEFAULTS, SMOLLM2_135M

    config = SimpleNamespace(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536)
    swept = MODEL_EDITOR_DEFAULTS[(SMOLLM2_135M, "pmet")]
    pmet = default_hparams("llama", config, editor="pmet")
    assert (pmet.clamp_norm_factor, pmet.mom2_weight) == (swept["clamp_norm_factor"], swept["mom2_weight"])
    assert (pmet.v_lr, pmet.v_steps) == (0.2, 30)  # the rest of PMET's published z optimisation
    assert default_hparams("llama", config).mom2_weight == 5000.0  # MEMIT's SmolLM2 sweep
    assert default_hparams("llama", config, editor="pmet", mom2_weight=7.0).mom2_weight == 7.0


def test_a_batch_reaches_what_one_request_at_a_time_reaches(corpus):
    """Each request keeps its own deltas, loss and stopping step: batching changes nothing but speed
    (8 steps: Adam amplifies float rounding at the tiny model's learning rate, 1e-8 after 5 steps,
    1e-2 after 40)."""
    model, tok = make_model("llama")
    hp = make_editor(model, tok, corpus, **{**PMET, "v_steps": 8}).hp
    together = optimise_pmet_targets(model, tok, REQUESTS, hp, make_editor(model, tok, corpus).templates, False)
    alone = optimise_pmet_targets(
        model, tok, REQUESTS, hp.model_copy(update={"batch_size": 1}), make_editor(model, tok, corpus).templates, False
    )
    assert together.steps == alone.steps
    torch.testing.assert_close(together.z, alone.z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together.h, alone.h, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox"])
def test_replaying_the_blocks_below_l_gives_the_full_forwards_loss_terms(corpus, family):
    from fededit_core.memit.pmet import _PmetGroup

    model, tok = make_model(family)
    editor = make_editor(model, tok, corpus, **PMET)
    terms = {}
    for replay in (True, False):
        group = _PmetGroup(model, tok, REQUESTS, editor.hp, editor.templates)
        if not replay:  # the plain forward over the whole prompts
            rows = group.rows
            group.replay, group.ids, group.mask = False, rows.input_ids, rows.attention_mask
            group.at_subject, group.target = rows.lookup, (rows.target_row, rows.target_pos, rows.target_tok)
        gen = torch.Generator().manual_seed(0)  # the same deltas for both
        for delta in group.deltas.values():
            delta.data = torch.randn(delta.shape, generator=gen) * 0.05
        handles = [model.get_submodule(n).register_forward_hook(group._hook(k)) for k, n in group.sites.items()]
        try:
            terms[replay] = group._terms()
        finally:
            for h in handles:
                h.remove()
    for a, b in zip(terms[True], terms[False]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)
