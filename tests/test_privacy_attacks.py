"""The privacy benchmark's attacks (bench/privacy/attacks.py) on the tiny model: each recovers what
its formula says it does from the artefact it attacks, and nothing from random bytes."""

from __future__ import annotations

import numpy as np
import pytest

from bench.privacy.attacks import Attacker, basis_of_delta, basis_of_kk, top_k
from fededit_core.data.requests import EditRequest
from fededit_core.memit.editor import make_editor
from fededit_core.memit.keys import compute_keys
from tests.federation_kit import SUBJECTS, isolated_tiny_world

POOL = SUBJECTS + ["Notre Dame", "Big Bridge", "Old Gate", "King Tower", "River Museum", "New City", "Queen Palace"]
VICTIMS = [0, 3, 9]


@pytest.fixture(scope="module")
def attacker(tmp_path_factory):
    with isolated_tiny_world(tmp_path_factory, "privacy") as world:
        editor = make_editor(world["model"], **world["hparams"])
        yield Attacker(editor, POOL, ["Rome", "Paris", "Berlin", "London"])


def victim_keys(attacker: Attacker) -> np.ndarray:
    """The victims' keys as their clients computed them: with a relation prompt around the subject."""
    requests = [EditRequest(case_id=str(i), subject=POOL[i], prompt="{} is in", target_new="Rome") for i in VICTIMS]
    editor = attacker.editor
    return compute_keys(editor.model, editor.tok, requests, attacker.layer, editor.templates).double().numpy()


def test_uploaded_keys_name_their_subjects_and_random_bytes_do_not(attacker):
    cos = attacker.nearest(victim_keys(attacker))
    assert [attacker.rank_of(cos[j], i) for j, i in enumerate(VICTIMS)] == [1, 1, 1]
    noise = np.frombuffer(np.random.default_rng(0).bytes(8 * attacker.keys.shape[1]), dtype="<f4")
    cos = attacker.nearest(noise.reshape(2, -1).astype(np.float64))
    assert np.isfinite(cos).all() and np.abs(cos).max() < 0.5


def test_the_span_of_k_kt_and_the_row_space_of_delta_name_the_edited_subjects(attacker):
    keys = victim_keys(attacker).T  # (d_ff, m)
    m, d = keys.shape[1], attacker.editor.d_model
    kk = keys @ keys.T
    resid = np.random.default_rng(1).standard_normal((d, m))
    delta = resid @ keys.T @ np.linalg.inv(attacker.mom2 * attacker.c0 + kk)
    for scores in (
        attacker.subspace_scores(basis_of_kk(kk, m)),
        attacker.subspace_scores(basis_of_delta(delta, m), True),
    ):
        ranks = [attacker.rank_of(scores, i, set(VICTIMS) - {i}) for i in VICTIMS]
        assert ranks == [1, 1, 1]
        assert set(np.argsort(scores)[::-1][:m]) == set(VICTIMS)
    # the residuals, from R K^T and the recovered subjects' keys (the attacker's own, close to K)
    found = list(VICTIMS)
    estimate = attacker.residuals(resid @ keys.T, found)
    cosine = np.sum(estimate * resid.T, axis=1) / np.linalg.norm(estimate, axis=1) / np.linalg.norm(resid.T, axis=1)
    assert (cosine > 0.9).all()
    from_delta = attacker.residuals(attacker.editavg_rk(delta, found), found)
    cosine = np.sum(from_delta * resid.T, axis=1) / np.linalg.norm(from_delta, axis=1) / np.linalg.norm(resid.T, axis=1)
    assert (cosine > 0.9).all()


def test_a_z_written_at_the_subject_raises_its_object(attacker):
    """z = h + a step along the unembedding of " Paris": the object score ranks Paris first."""
    editor = attacker.editor
    h = attacker.hidden([POOL[0]])[0]
    paris = editor.tok(" Paris", add_special_tokens=False).input_ids[0]
    direction = editor.model.get_output_embeddings().weight[paris].detach().double().numpy()
    z = h + 20 * direction / np.linalg.norm(direction) * np.linalg.norm(h)
    scores = attacker.object_scores(POOL[0], z)
    assert attacker.objects[int(np.argmax(scores))] == "Paris"
    assert attacker.rank_of(scores, attacker.objects.index("Paris")) == 1
    assert top_k([1, 2, 6], 5) == pytest.approx(2 / 3) and top_k([], 1) == 0.0
