"""MEMIT end to end on tiny random models: the text-based editor, the z optimisation, MKVs, state.

The models come from ``tiny_model_with_words``: the byte tokenizer plus one token per target word
(so a target is one token, predicted at the subject's last token, which ends every prompt here), and
an LM head scaled up so that a random model can be confident at all. Under those conditions the
z optimisation reaches the stop probability within a few steps and MEMIT's closed form writes z,
so an edit must take the target NLL from chance level (~6 nats) to nearly 0.
"""

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from fededit_core.data.requests import EditRequest
from fededit_core.eval.metrics import target_nll
from fededit_core.fedleke.mkv import MKVError, MKVSet, apply_mkvs, compute_mkvs
from fededit_core.memit.covariance import CovarianceStore
from fededit_core.memit.editor import MemitEditor
from fededit_core.memit.hparams import MEMITHyperParams
from fededit_core.memit.keys import compute_keys, hidden_at_subject
from fededit_core.memit.target import optimise_z, optimise_z_reference
from fededit_core.memit.templates import ContextTemplates
from fededit_core.model.families import family_for
from tests.tiny import FAMILIES, tiny_model_with_words

TEMPLATES = ContextTemplates(groups=(("{}",), ("Hello. {}", "Yes. {}")))
WORDS = (" Rome", " English", " Berlin", " Tokyo", " Madrid")
REQUESTS = [
    EditRequest(case_id="0", subject="Paris", prompt="The capital is {}", target_new="Rome"),
    EditRequest(case_id="1", subject="Danielle Darrieux", prompt="She speaks like {}", target_new="English"),
    EditRequest(case_id="2", subject="Toyota", prompt="Cars by {}", target_new="Berlin"),
]
OTHER_REQUESTS = [  # a second client's facts
    EditRequest(case_id="3", subject="Apple", prompt="Phones by {}", target_new="Tokyo"),
    EditRequest(case_id="4", subject="Lionel Messi", prompt="Football with {}", target_new="Madrid"),
]
HEAD_SCALE = 10.0
HP = dict(layers=(1, 2), mom2_weight=10.0, v_lr=0.5, v_steps=40)
WORD_LIST = (
    "the of and to in is was for on that with as by at from his her city river king music year "
    "team game house night light stone water garden"
).split()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(
        "\n".join(" ".join(rng.choice(WORD_LIST) for _ in range(12)).capitalize() + "." for _ in range(80)),
        encoding="utf-8",
    )
    return str(path)


def make_model(family, seed=0, head_scale=HEAD_SCALE):
    return tiny_model_with_words(family, WORDS, seed=seed, head_scale=head_scale)


def make_editor(model, tok, corpus, **overrides):
    hp = MEMITHyperParams(**{**HP, **overrides})
    store = CovarianceStore(model, tok, source=corpus, n_samples=16, seq_len=32)
    return MemitEditor(model, tok, hp, templates=TEMPLATES, covariance=store)


def nll(model, tok, requests):
    return target_nll(model, tok, [r.text for r in requests], [r.target_new for r in requests])


def edited_names(model, layers):
    family = family_for(model)
    return {f"{family.edit_module_name(l)}.weight" for l in layers}


def snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


# --- the text-based editor ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_changes_only_the_edited_layers_and_writes_the_facts(family, corpus):
    model, tok = make_model(family)
    editor = make_editor(model, tok, corpus)
    before_state = snapshot(model)
    before = nll(model, tok, REQUESTS)
    assert (before > 3.0).all()  # chance level over ~264 tokens is 5.6 nats

    result = editor.edit(REQUESTS, progress=False)

    changed = edited_names(model, (1, 2))
    for name, tensor in model.state_dict().items():
        if name in changed:
            assert not torch.equal(tensor, before_state[name]), f"{name} was not edited"
        else:
            assert torch.equal(tensor, before_state[name]), f"{name} changed although not edited"
    assert sorted(result.deltas) == [1, 2]
    for layer, delta in result.deltas.items():
        assert tuple(delta.shape) == (64, 128)
        torch.testing.assert_close(editor.weight_shift(layer).float(), delta, rtol=1e-4, atol=1e-6)
    assert result.z.z.shape == (3, 64)

    after = nll(model, tok, REQUESTS)
    assert (after < 1.0).all(), f"NLL {before.tolist()} -> {after.tolist()}"
    assert (before - after > 2.5).all()
    # the closed form wrote z: h_L at the subject is (nearly) the optimised target vector
    h = hidden_at_subject(model, tok, REQUESTS, 2)
    gap = (h - result.z.z).norm(dim=1) / result.z.delta.norm(dim=1)
    assert (gap < 0.25).all(), gap


def test_edit_with_a_strong_prior_moves_less(corpus):
    """mom2_weight is lambda: a much larger one keeps the update smaller and the edit weaker."""
    model, tok = make_model("llama")
    weak = make_editor(model, tok, corpus, mom2_weight=10.0)
    z = weak.compute_z(REQUESTS, progress=False)
    small = weak.edit(REQUESTS, z=z, progress=False)
    nll_weak_prior = nll(model, tok, REQUESTS)
    weak.reset()
    strong = make_editor(model, tok, corpus, mom2_weight=1e5)
    large = strong.edit(REQUESTS, z=z, progress=False)
    nll_strong_prior = nll(model, tok, REQUESTS)
    for layer in (1, 2):
        assert large.deltas[layer].norm() < small.deltas[layer].norm()
    assert nll_strong_prior.mean() > nll_weak_prior.mean() + 1.0


def test_reset_and_swapping_two_clients(corpus):
    model, tok = make_model("gpt2")  # Conv1D: the (d, d_ff) views must be copied back transposed
    editor = make_editor(model, tok, corpus)
    base_state = snapshot(model)
    base = editor.edited_layers()
    base_nll_a, base_nll_b = nll(model, tok, REQUESTS), nll(model, tok, OTHER_REQUESTS)

    editor.edit(REQUESTS, progress=False)
    client_a = editor.edited_layers()
    nll_a = nll(model, tok, REQUESTS)
    assert (nll_a < 1.0).all()
    editor.reset()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, base_state[name]), name
    assert torch.equal(nll(model, tok, REQUESTS), base_nll_a)

    editor.edit(OTHER_REQUESTS, progress=False)
    client_b = editor.edited_layers()
    assert (nll(model, tok, OTHER_REQUESTS) < 1.0).all()

    editor.load_layers(client_a)  # client A's edits in, B's out
    for layer in (1, 2):
        assert torch.equal(family_for(model).weight_matrix(model, layer), client_a[layer])
        assert not torch.equal(client_a[layer], client_b[layer])
    assert torch.equal(nll(model, tok, REQUESTS), nll_a)
    assert (nll(model, tok, OTHER_REQUESTS) > base_nll_b.min() - 1.0).all()  # B's facts are gone
    editor.load_layers(client_b)
    assert (nll(model, tok, OTHER_REQUESTS) < 1.0).all()
    # edited_layers is a copy: editing the model does not change what was handed out
    editor.reset()
    assert not torch.equal(client_b[1], base[1])
    assert torch.equal(editor.edited_layers()[1], base[1])
    with pytest.raises(ValueError, match="shape"):
        editor.load_layers({1: client_a[1].T})


# --- z optimisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_of_frozen_layers_is_exact(family):
    """With delta = 0 (one step, no update) the replayed forward is the normal forward."""
    model, tok = make_model(family)
    hp = MEMITHyperParams(layers=(1, 2), v_steps=1)
    result = optimise_z(model, tok, REQUESTS, hp, TEMPLATES, progress=False)
    h = hidden_at_subject(model, tok, REQUESTS, 2)
    torch.testing.assert_close(result.h, h, rtol=0, atol=1e-5)
    assert torch.equal(result.z, result.h)  # no step taken
    # the target probability it judged from the replay equals that of a normal forward
    for i, request in enumerate(REQUESTS):
        prompts = [t.replace("{}", request.text) for t in TEMPLATES.flat]
        per_template = target_nll(model, tok, prompts, [request.target_new] * len(prompts))
        assert result.target_prob[i] == pytest.approx(math.exp(-float(per_template.mean())), rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_z_matches_the_reference_loop(family):
    """A few steps, no early stop (the head is not scaled, so no target gets likely): the batched,
    replaying optimiser takes the same Adam steps on the same loss as the full-forward reference."""
    model, tok = make_model(family, head_scale=1.0)
    hp = MEMITHyperParams(layers=(1, 2), v_steps=6)
    fast = optimise_z(model, tok, REQUESTS, hp, TEMPLATES, progress=False)
    slow = optimise_z_reference(model, tok, REQUESTS, hp, TEMPLATES, progress=False)
    assert fast.steps == slow.steps == [5, 5, 5]
    assert fast.delta.norm(dim=1).min() > 0.1 * fast.h.norm(dim=1).max()  # the steps did move z
    torch.testing.assert_close(fast.h, slow.h, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.z, slow.z, rtol=0, atol=1e-4 * float(fast.z.abs().max()))
    assert fast.target_prob == pytest.approx(slow.target_prob, rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_and_reference_z_reach_similar_probability(family):
    model, tok = make_model(family)
    hp = MEMITHyperParams(layers=(1, 2), v_steps=40)
    fast = optimise_z(model, tok, REQUESTS, hp, TEMPLATES, progress=False)
    slow = optimise_z_reference(model, tok, REQUESTS, hp, TEMPLATES, progress=False)
    assert min(fast.target_prob) > 0.9 and min(slow.target_prob) > 0.9
    assert max(fast.steps) < 39  # stopped early, converged (the reference stops on the total loss,
    # KL and weight decay included, < 5e-2, which it need not reach)
    for p, q in zip(fast.target_prob, slow.target_prob):
        assert abs(p - q) < 0.1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_total_loss_stop_matches_the_reference_loop(family):
    """stop_on="total_loss": each request stops at the step the reference loop stops (loss < 5e-2),
    with the same z; without KL the targets get there in a few steps."""
    model, tok = make_model(family)
    hp = MEMITHyperParams(layers=(1, 2), v_steps=40, stop_on="total_loss", kl_factor=0.0, v_weight_decay=1e-4)
    fast = optimise_z(model, tok, REQUESTS, hp, TEMPLATES, progress=False)
    slow = optimise_z_reference(model, tok, REQUESTS, hp, TEMPLATES, progress=False)
    assert fast.steps == slow.steps and max(fast.steps) < 39
    torch.testing.assert_close(fast.z, slow.z, rtol=0, atol=1e-4 * float(fast.z.abs().max()))
    with_kl = optimise_z(model, tok, REQUESTS, hp.model_copy(update={"kl_factor": 1.0}), TEMPLATES, progress=False)
    by_prob = optimise_z(
        model,
        tok,
        REQUESTS,
        hp.model_copy(update={"kl_factor": 1.0, "stop_on": "target_prob"}),
        TEMPLATES,
        progress=False,
    )
    assert sum(with_kl.steps) > sum(by_prob.steps)  # the KL term keeps the total loss up after the target is likely


@pytest.mark.parametrize("kl_factor", [0.0, 0.0625])
def test_requests_do_not_interact_in_a_batch(kl_factor):
    model, tok = make_model("llama")
    hp = MEMITHyperParams(layers=(1, 2), v_steps=12, stop_prob=1.0, kl_factor=kl_factor, v_weight_decay=0.0)
    together = optimise_z(model, tok, REQUESTS, hp, TEMPLATES, progress=False)
    alone = optimise_z(model, tok, REQUESTS, hp.model_copy(update={"batch_size": 1}), TEMPLATES, progress=False)
    assert together.steps == alone.steps == [11, 11, 11]  # stop_prob 1.0: no early stop
    torch.testing.assert_close(together.z, alone.z, rtol=0, atol=1e-4 * float(alone.z.abs().max()))
    for i, request in enumerate(REQUESTS):  # and alone really is alone: one call per request
        single = optimise_z(model, tok, [request], hp, TEMPLATES, progress=False)
        torch.testing.assert_close(single.z[0], alone.z[i], rtol=0, atol=1e-5 * float(alone.z.abs().max()))


def test_early_stop_keeps_the_delta_it_was_judged_with():
    model, tok = make_model("llama")
    hp = MEMITHyperParams(layers=(1, 2), v_steps=40, stop_prob=0.9)
    result = optimise_z(model, tok, REQUESTS, hp, TEMPLATES, progress=False)
    assert all(s < 39 for s in result.steps)
    assert all(p > 0.9 for p in result.target_prob)
    # rerunning each request for exactly its own number of steps gives the same z
    for i, request in enumerate(REQUESTS):
        exact = hp.model_copy(update={"v_steps": result.steps[i] + 1, "stop_prob": 1.0})
        again = optimise_z(model, tok, [request], exact, TEMPLATES, progress=False)
        torch.testing.assert_close(again.z[0], result.z[i], rtol=0, atol=1e-4 * float(result.z.abs().max()))


# --- mediator knowledge vectors -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mkvs_on_one_layer_reproduce_the_text_edit(family, corpus):
    """One edited layer: the text-free residual z - h_L(base) is exact, so the MKV edit is MEMIT's."""
    model_a, tok = make_model(family)
    model_b, _ = make_model(family)  # a second party holding the same base model
    text_editor = make_editor(model_a, tok, corpus, layers=(2,))
    mkv_editor = make_editor(model_b, tok, corpus, layers=(2,))
    base_state = snapshot(model_a)

    z = text_editor.compute_z(REQUESTS, progress=False)
    mkvs = compute_mkvs(text_editor, REQUESTS, z=z)
    for name, tensor in model_a.state_dict().items():  # computing MKVs edits nothing
        assert torch.equal(tensor, base_state[name])
    assert mkvs.ids == ["0", "1", "2"] and mkvs.layers == (2,)
    assert tuple(mkvs.keys.shape) == (3, 1, 128)
    torch.testing.assert_close(mkvs.keys[:, 0], compute_keys(model_a, tok, REQUESTS, 2, TEMPLATES))

    updates = apply_mkvs(mkv_editor, mkvs)
    text = text_editor.edit(REQUESTS, z=z, progress=False)
    torch.testing.assert_close(updates[2], text.deltas[2], rtol=0, atol=1e-5 * float(text.deltas[2].abs().max()))
    w_text = family_for(model_a).weight_matrix(model_a, 2).detach()
    w_mkv = family_for(model_b).weight_matrix(model_b, 2).detach()
    assert float((w_text - w_mkv).norm() / text.deltas[2].norm()) < 1e-5
    assert (nll(model_b, tok, REQUESTS) < 1.0).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mkv_corrections_make_the_apply_exact_on_every_layer(family, corpus):
    """With the keys and corrections of the sender's edit, the receiver's residual at layer i is
    delta - sum_{j<i} Delta_j k_j - c_i = z - h_L(before layer i): MEMIT's own, so every layer's
    update equals the text edit's (first-order alone: only the first layer does)."""
    from dataclasses import replace

    model_a, tok = make_model(family)
    model_b, _ = make_model(family)
    text_editor = make_editor(model_a, tok, corpus)
    mkv_editor = make_editor(model_b, tok, corpus)
    text = text_editor.edit(REQUESTS, progress=False)
    mkvs = compute_mkvs(text_editor, REQUESTS, edit=text)
    assert mkvs.corrections is not None and tuple(mkvs.corrections.shape) == (3, 2, mkvs.z.shape[1])
    assert float(mkvs.corrections[:, 0].abs().max()) == 0.0  # nothing of this edit is written before layer 0
    assert float(mkvs.corrections[:, 1].norm()) > 1e-3 * float(mkvs.delta.norm())
    updates = apply_mkvs(mkv_editor, mkvs)
    for layer in (1, 2):
        scale = float(text.deltas[layer].abs().max())
        torch.testing.assert_close(updates[layer], text.deltas[layer], rtol=0, atol=1e-4 * scale)
    mkv_editor.reset()
    first_order = apply_mkvs(mkv_editor, replace(mkvs, corrections=None))
    assert float((first_order[2] - text.deltas[2]).norm()) > 1e-3 * float(text.deltas[2].norm())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mkvs_on_several_layers_are_close_to_the_text_edit(family, corpus):
    """Several layers: the first layer's update is still exact; the later ones use the first-order
    estimate of what the earlier layers wrote (and the base keys), so they differ from the text
    edit, but the MKV edit still writes the facts."""
    model_a, tok = make_model(family)
    model_b, _ = make_model(family)
    text_editor = make_editor(model_a, tok, corpus)
    mkv_editor = make_editor(model_b, tok, corpus)
    before = nll(model_b, tok, REQUESTS)
    z = text_editor.compute_z(REQUESTS, progress=False)
    mkvs = compute_mkvs(text_editor, REQUESTS, z=z)
    updates = apply_mkvs(mkv_editor, mkvs)
    text = text_editor.edit(REQUESTS, z=z, progress=False)
    scale = float(text.deltas[1].abs().max())
    torch.testing.assert_close(updates[1], text.deltas[1], rtol=0, atol=1e-5 * scale)

    per_layer = {
        l: float((text_editor.weight_shift(l) - mkv_editor.weight_shift(l)).norm() / text_editor.weight_shift(l).norm())
        for l in (1, 2)
    }
    total_text = torch.cat([text_editor.weight_shift(l).flatten() for l in (1, 2)])
    total_mkv = torch.cat([mkv_editor.weight_shift(l).flatten() for l in (1, 2)])
    rel = float((total_text - total_mkv).norm() / total_text.norm())
    print(
        f"\n{family}: MKV vs text edit, layers (1, 2): relative difference {rel:.3f} "
        f"(per layer {', '.join(f'{l}: {v:.3f}' for l, v in per_layer.items())})"
    )
    assert 0 < rel < 1.5

    after = nll(model_b, tok, REQUESTS)
    assert after.mean() < before.mean() - 2.0, f"NLL {before.tolist()} -> {after.tolist()}"
    gap = (hidden_at_subject(model_b, tok, REQUESTS, 2) - z.z).norm(dim=1) / z.delta.norm(dim=1)
    assert gap.mean() < 0.95, gap  # on average h_L moved towards z (base: 1.0)
    if family == "llama":
        assert (before - after > 1.0).all(), f"NLL {before.tolist()} -> {after.tolist()}"
        assert (gap < 0.8).all(), gap
    # On the tiny GPT-2 one of the three facts is not written (its NLL rises by ~1 nat): after the
    # layer-1 update the layer-2 keys of the edited model differ from the base keys by more than
    # their own norm, and the MKV update of layer 2 is solved at the base keys. Reported, not hidden.


def test_mkvs_in_sequence_account_for_earlier_edits(corpus):
    """Applying client A's then client B's MKVs keeps A's facts and adds B's."""
    model_a, tok = make_model("llama")
    model_b, _ = make_model("llama")
    source = make_editor(model_a, tok, corpus)
    target = make_editor(model_b, tok, corpus)
    mkvs_a = compute_mkvs(source, REQUESTS, z=source.compute_z(REQUESTS, progress=False))
    mkvs_b = compute_mkvs(source, OTHER_REQUESTS, z=source.compute_z(OTHER_REQUESTS, progress=False))
    apply_mkvs(target, mkvs_a)
    apply_mkvs(target, mkvs_b)
    assert (nll(model_b, tok, REQUESTS) < 1.0).all()
    assert (nll(model_b, tok, OTHER_REQUESTS) < 1.0).all()


def _mkvs(n=3, layers=(1, 2), d=64, d_ff=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return MKVSet(
        [f"r{i}" for i in range(n)],
        layers,
        torch.randn(n, d, generator=gen),
        torch.randn(n, d, generator=gen),
        torch.randn(n, len(layers), d_ff, generator=gen),
    )


def test_mkv_arrays_round_trip():
    mkvs = _mkvs()
    arrays = mkvs.to_arrays()
    assert set(arrays) == {"z", "delta", "keys", "corrections", "layers"}
    assert arrays["z"].dtype == np.float32 and arrays["keys"].shape == (3, 2, 128)
    assert arrays["corrections"].shape == (3, 2, 64) and not arrays["corrections"].any()  # none: zeros
    back = MKVSet.from_arrays(mkvs.ids, arrays)
    assert back.ids == mkvs.ids and back.layers == (1, 2)
    for name in ("z", "delta", "keys"):
        assert torch.equal(getattr(back, name), getattr(mkvs, name))
    corrected = dataclasses.replace(mkvs, corrections=torch.randn(3, 2, 64))
    assert torch.equal(MKVSet.from_arrays(mkvs.ids, corrected.to_arrays()).corrections, corrected.corrections)
    with pytest.raises(MKVError, match="with and without corrections"):
        MKVSet.concat([mkvs, corrected])
    # float64 payloads are accepted (and stored as float32)
    wide = {k: (v.astype(np.float64) if k != "layers" else v) for k, v in arrays.items()}
    assert torch.equal(MKVSet.from_arrays(mkvs.ids, wide).keys, mkvs.keys)
    # select and concat keep rows together
    both = MKVSet.concat([mkvs.select([2]), mkvs.select([0, 1])])
    assert both.ids == ["r2", "r0", "r1"]
    assert torch.equal(both.keys[0], mkvs.keys[2]) and torch.equal(both.z[1:], mkvs.z[:2])


def test_mkv_payloads_are_validated():
    good = _mkvs().to_arrays()
    ids = ["r0", "r1", "r2"]

    def payload(**changes):
        return {**good, **changes}

    with pytest.raises(MKVError, match="lacks"):
        MKVSet.from_arrays(ids, {k: v for k, v in good.items() if k != "keys"})
    with pytest.raises(MKVError, match="z must be"):
        MKVSet.from_arrays(ids, payload(z=good["z"][:2]))  # fewer rows than ids
    with pytest.raises(MKVError, match="delta must have"):
        MKVSet.from_arrays(ids, payload(delta=good["delta"][:, :10]))
    with pytest.raises(MKVError, match="keys must be"):
        MKVSet.from_arrays(ids, payload(keys=good["keys"][:, :1]))  # one layer of keys for two layers
    with pytest.raises(MKVError, match="keys must be"):
        MKVSet.from_arrays(ids, payload(layers=np.asarray([1, 2, 3])))
    with pytest.raises(MKVError, match="floating"):
        MKVSet.from_arrays(ids, payload(z=good["z"].astype(np.int64)))
    with pytest.raises(MKVError, match="corrections must be"):
        MKVSet.from_arrays(ids, payload(corrections=good["corrections"][:, :, :10]))
    for name in ("z", "delta", "keys", "corrections"):
        bad = good[name].copy()
        bad.flat[7] = np.nan
        with pytest.raises(MKVError, match="NaN"):
            MKVSet.from_arrays(ids, payload(**{name: bad}))
    bad = good["z"].copy()
    bad[0, 0] = np.inf
    with pytest.raises(MKVError, match="infinite"):
        MKVSet.from_arrays(ids, payload(z=bad))
    with pytest.raises(MKVError, match="different layers"):
        MKVSet.concat([_mkvs(), _mkvs(layers=(2, 3))])

    mkvs = MKVSet.from_arrays(ids, good)
    mkvs.validate(d_model=64, d_ff=128, layers=(1, 2))
    with pytest.raises(MKVError, match="d_model"):
        mkvs.validate(d_model=32)
    with pytest.raises(MKVError, match="d_ff"):
        mkvs.validate(d_ff=256)
    with pytest.raises(MKVError, match="layers"):
        mkvs.validate(layers=(2, 3))


def test_apply_mkvs_refuses_mismatched_layers_and_sizes(corpus):
    model, tok = make_model("llama")
    editor = make_editor(model, tok, corpus)
    before = snapshot(model)
    with pytest.raises(MKVError, match="layers"):
        apply_mkvs(editor, _mkvs(layers=(2, 3)))
    with pytest.raises(MKVError, match="d_model"):
        apply_mkvs(editor, _mkvs(d=32))
    with pytest.raises(MKVError, match="d_ff"):
        apply_mkvs(editor, _mkvs(d_ff=64))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


# --- bad input ------------------------------------------------------------------------------------


def test_bad_requests_are_refused():
    with pytest.raises(ValidationError, match="exactly one"):
        EditRequest(case_id="x", subject="Paris", prompt="Paris is the capital of", target_new="Rome")
    with pytest.raises(ValidationError, match="exactly one"):
        EditRequest(case_id="x", subject="Paris", prompt="{} and {}", target_new="Rome")
    for target in ("", "   "):
        with pytest.raises(ValidationError, match="target_new is empty"):
            EditRequest(case_id="x", subject="Paris", prompt="{} is in", target_new=target)
    with pytest.raises(ValidationError, match="subject is empty"):
        EditRequest(case_id="x", subject=" ", prompt="{} is in", target_new="Rome")


def test_layers_beyond_the_model_are_refused(corpus):
    model, tok = make_model("llama")
    hp = MEMITHyperParams(layers=(2, 4), mom2_weight=10.0)
    with pytest.raises(ValueError, match=r"layers \[2, 4\].*4 layers"):
        MemitEditor(
            model,
            tok,
            hp,
            templates=TEMPLATES,
            covariance=CovarianceStore(model, tok, source=corpus, n_samples=4, seq_len=16),
        )
    with pytest.raises(ValidationError):
        MEMITHyperParams(layers=(2, 1))
    with pytest.raises(ValidationError):
        MEMITHyperParams(layers=())
    editor = make_editor(model, tok, corpus)
    with pytest.raises(ValueError, match="no edit requests"):
        editor.edit([], progress=False)


# --- saving an edited model -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_edited_model_reloads_with_the_edit(family, corpus, tmp_path):
    model, tok = make_model(family)
    base_state = snapshot(model)
    editor = make_editor(model, tok, corpus)
    editor.edit(REQUESTS, progress=False)
    edited_nll = nll(model, tok, REQUESTS)
    model.save_pretrained(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()
    changed = edited_names(model, (1, 2))
    state = model.state_dict()
    reloaded_state = reloaded.state_dict()
    assert set(reloaded_state) == set(state)
    for name, tensor in reloaded_state.items():
        assert torch.equal(tensor, state[name]), name
        if name in changed:
            assert not torch.equal(tensor, base_state[name])
        else:
            assert torch.equal(tensor, base_state[name]), name
    torch.testing.assert_close(nll(reloaded, tok, REQUESTS), edited_nll, rtol=1e-5, atol=1e-5)


def test_a_tokenizer_without_pad_token_works(corpus):
    """GPT-2's tokenizer has no pad token: padding is masked, so any pad id gives the same edit."""
    model, tok = make_model("gpt2")
    _, tok_no_pad = tiny_model_with_words("gpt2", WORDS, head_scale=HEAD_SCALE, pad_token=False)
    assert tok_no_pad.pad_token_id is None
    hp = MEMITHyperParams(**HP)
    with_pad = optimise_z(model, tok, REQUESTS, hp, TEMPLATES, progress=False)
    without = optimise_z(model, tok_no_pad, REQUESTS, hp, TEMPLATES, progress=False)
    torch.testing.assert_close(without.z, with_pad.z, rtol=0, atol=1e-5)
    editor = make_editor(model, tok_no_pad, corpus)
    editor.edit(REQUESTS, z=without, progress=False)
    assert (nll(model, tok, REQUESTS) < 1.0).all()
