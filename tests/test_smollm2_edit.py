"""Real editing on the embedded SmolLM2-135M: MEMIT and the text-free MKV path really change facts.

Uses Multi-CounterFact records from ../shared/data when present (ten neighbourhood prompts each),
else the project's built-in demo edits.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fededit_core.data.loaders import load_requests
from fededit_core.eval.metrics import counterfact_metrics, generate_greedy
from fededit_core.fedleke.mkv import apply_mkvs, compute_mkvs
from fededit_core.memit.editor import MemitEditor, hparams_for
from fededit_core.model.loading import configure_threads, load_model
from fededit_core.paths import shared_data_dir

pytestmark = pytest.mark.slow

N_EDITS = 6


def _requests():
    shared = shared_data_dir()
    path = shared / "counterfact" / "multi_counterfact-46.json" if shared else None
    if path is not None and path.is_file():
        return load_requests(path, n=N_EDITS)
    from fededit_core.data.builtin import DEMO_EDITS

    return load_requests(DEMO_EDITS, n=N_EDITS)


def _continuation(model, tok, prompt: str) -> str:
    text = generate_greedy(model, tok, [prompt], max_new_tokens=6)[0]
    return text[len(prompt) :] if text.startswith(prompt) else text


@pytest.fixture(scope="module")
def smollm2():
    configure_threads()
    model, tok = load_model("smollm2-135m")
    return model, tok


@pytest.fixture(scope="module")
def edited(smollm2):
    """Unedited metrics, then one MEMIT edit of the requests (the model is restored afterwards)."""
    model, tok = smollm2
    requests = _requests()
    editor = MemitEditor(model, tok, hparams_for(model))
    before = counterfact_metrics(model, tok, requests)
    before_text = [_continuation(model, tok, r.text) for r in requests]
    result = editor.edit(requests)
    after = counterfact_metrics(model, tok, requests)
    after_text = [_continuation(model, tok, r.text) for r in requests]
    edited_weights = editor.edited_layers()
    editor.reset()
    return dict(
        editor=editor,
        requests=requests,
        result=result,
        before=before,
        after=after,
        before_text=before_text,
        after_text=after_text,
        weights=edited_weights,
    )


def test_the_base_model_knows_facts(smollm2):
    model, tok = smollm2
    assert _continuation(model, tok, "The Eiffel Tower is located in the city of").strip().startswith("Paris")


def test_memit_makes_the_new_facts_win(edited):
    assert edited["before"]["es"] <= 0.5
    assert edited["after"]["es"] >= 0.9
    assert edited["after"]["ps"] > edited["before"]["ps"]


def test_memit_leaves_neighbours_alone(edited):
    assert abs(edited["after"]["ns"] - edited["before"]["ns"]) <= 0.1


def test_greedy_continuations_change_to_the_new_object(edited):
    changed = [
        r
        for r, b, a in zip(edited["requests"], edited["before_text"], edited["after_text"])
        if a.strip().startswith(r.target_new) and not b.strip().startswith(r.target_new)
    ]
    assert len(changed) >= len(edited["requests"]) // 2, list(zip(edited["before_text"], edited["after_text"]))


def test_only_the_edited_layers_change(smollm2, edited):
    model, _ = smollm2
    editor = edited["editor"]
    for layer, weight in edited["weights"].items():
        assert not torch.equal(weight, editor.base_weights[layer])
    assert set(edited["result"].deltas) == set(editor.hp.layers)


def _apply_to_fresh_copy(smollm2, editor, mkvs):
    model, tok = smollm2
    receiver_model = copy.deepcopy(model)
    receiver = MemitEditor(receiver_model, tok, editor.hp, templates=editor.templates, covariance=editor.covariance)
    apply_mkvs(receiver, mkvs)
    return receiver


def _similarity(edited, editor, receiver) -> dict[int, float]:
    """Cosine similarity of each layer's text-free update to the text-based one."""
    out = {}
    for layer in editor.hp.layers:
        text_based = edited["weights"][layer] - editor.base_weights[layer]
        text_free = receiver.weight_shift(layer).float()
        out[layer] = float(torch.nn.functional.cosine_similarity(text_based.flatten(), text_free.flatten(), dim=0))
    return out


def test_mkv_apply_edits_a_fresh_copy_without_text(smollm2, edited):
    """The receiving model sees only vectors (z, delta, keys), never the request text."""
    model, tok = smollm2
    editor = edited["editor"]
    mkvs = compute_mkvs(editor, edited["requests"], edit=edited["result"])
    assert all(torch.equal(w, editor.base_weights[l]) for l, w in editor.edited_layers().items())
    receiver = _apply_to_fresh_copy(smollm2, editor, mkvs)
    after = counterfact_metrics(receiver.model, tok, edited["requests"])
    assert after["es"] >= 0.9
    assert abs(after["ns"] - edited["before"]["ns"]) <= 0.1
    # with the keys MEMIT used, every layer's update follows the text-based one closely
    similarity = _similarity(edited, editor, receiver)
    assert similarity[editor.hp.layers[0]] > 0.999, similarity
    assert min(similarity.values()) > 0.85, similarity


def test_mkvs_with_base_keys_drift_at_later_layers(smollm2, edited):
    """MKVs computed without an edit carry base-model keys: exact at the first layer, then drifting."""
    editor = edited["editor"]
    receiver = _apply_to_fresh_copy(smollm2, editor, compute_mkvs(editor, edited["requests"], z=edited["result"].z))
    similarity = _similarity(edited, editor, receiver)
    first, second = editor.hp.layers[:2]
    assert similarity[first] > 0.999, similarity
    assert similarity[second] > 0.9, similarity
    assert min(similarity.values()) > 0.5, similarity


@pytest.mark.parametrize("name", ["alphaedit", "pmet"])
def test_the_other_editors_change_facts_on_smollm2(smollm2, edited, name):
    """AlphaEdit with its published settings edits as MEMIT does and writes only in C0's null space;
    PMET with SmolLM2's swept settings (README, "Editor sweep") edits as MEMIT does."""
    model, tok = smollm2
    requests, before = edited["requests"], edited["before"]
    editor = MemitEditor(model, tok, hparams_for(model, editor=name), templates=edited["editor"].templates)
    try:
        editor.edit(requests, progress=False)
        after = counterfact_metrics(model, tok, requests)
        if name == "alphaedit":
            assert after["es"] >= 0.9 and abs(after["ns"] - before["ns"]) <= 0.1, after
            layer = editor.hp.layers[0]
            basis = editor.covariance.null_space(layer, editor.hp.nullspace_threshold)
            shift = editor.weight_shift(layer)
            assert (shift - shift @ basis @ basis.T).norm() < 1e-3 * shift.norm()
        else:
            assert after["es"] >= 0.9 and after["ps"] > before["ps"] and abs(after["ns"] - before["ns"]) <= 0.1, after
    finally:
        editor.reset()
