"""A participant's time slots, isolation on a shared model, z reuse, the re-edit gate, checkpoints."""

from __future__ import annotations

import pytest
import torch

from fededit_core.client.instructions import StepError
from fededit_core.client.participant import Participant
from fededit_core.data.requests import EditRequest
from fededit_core.data.slots import split_into_slots
from fededit_core.fedleke.probe import probe_divergence
from fededit_core.memit.covariance import CovarianceStore
from fededit_core.memit.editor import MemitEditor
from fededit_core.memit.hparams import MEMITHyperParams
from fededit_core.memit.templates import ContextTemplates
from tests.tiny import tiny_model_and_tokenizer

SECRET = b"federation-secret-0123456789"
TEMPLATES = ContextTemplates(groups=(("{}",), ("Hello. {}",)))


def req(case, subject, target, ts=None):
    return EditRequest(case_id=case, subject=subject, prompt="{} lives in", target_new=target, timestamp=ts)


@pytest.fixture
def shared(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A small corpus of plain words for the statistics.\n" * 30)
    model, tok = tiny_model_and_tokenizer("llama", seed=1)
    hp = MEMITHyperParams(
        layers=(1, 2), mom2_weight=10.0, v_steps=3, cov_source=str(corpus), cov_samples=8, cov_seq_len=16
    )
    store = CovarianceStore(model, tok, hp.cov_source, hp.cov_samples, hp.cov_seq_len)
    return MemitEditor(model, tok, hp, templates=TEMPLATES, covariance=store)


def test_slots_split_evenly_in_file_order_or_by_timestamp():
    requests = [req(str(i), f"S{i}", "X") for i in range(5)]
    assert [[r.case_id for r in s] for s in split_into_slots(requests, 3)] == [["0", "1"], ["2"], ["3", "4"]]
    timed = [req("a", "A", "X", ts=3.0), req("b", "B", "X", ts=1.0), req("c", "C", "X", ts=2.0)]
    assert [[r.case_id for r in s] for s in split_into_slots(timed, 3)] == [["b"], ["c"], ["a"]]
    assert [len(s) for s in split_into_slots(requests[:1], 3)] == [0, 1, 0]  # fewer requests than slots
    with pytest.raises(ValueError):
        split_into_slots(requests, 0)


def test_participants_on_one_model_never_see_each_others_edits(shared):
    a = Participant("a", shared, [req("1", "Anna", "Rome")], n_slots=1)
    b = Participant("b", shared, [req("2", "Boris", "Oslo")], n_slots=1)
    a.edit_slot(0)
    b.edit_slot(0)
    for layer in shared.hp.layers:
        assert not torch.equal(a.layers[layer], b.layers[layer])
    a.activate()
    assert all(torch.equal(shared.edited_layers()[l], a.layers[l]) for l in shared.hp.layers)
    # b's edit started from the base model, not from a's
    b_alone = Participant("b2", shared, [req("2", "Boris", "Oslo")], n_slots=1)
    b_alone.edit_slot(0, reused={})
    for layer in shared.hp.layers:
        torch.testing.assert_close(b_alone.layers[layer], b.layers[layer])


def test_mkvs_carry_no_text_and_slots_go_in_order(shared):
    a = Participant("a", shared, [req("1", "Anna", "Rome"), req("2", "Boris", "Oslo")], n_slots=2)
    with pytest.raises(StepError, match="next slot"):
        a.edit_slot(1)
    mkvs, report = a.edit_slot(0)
    assert mkvs.ids == ["a/0/0"] and report.edited == report.optimised == 1
    assert all("Anna" not in i and "Rome" not in i for i in mkvs.ids)


def test_a_stored_z_is_reused_instead_of_optimised(shared):
    a = Participant("a", shared, [req("1", "Anna", "Rome")], n_slots=1, secret=SECRET)
    # reuse_min_prob 0: the tiny model's few optimisation steps end far below SmolLM2's probabilities
    b = Participant(
        "b", shared, [req("9", "anna", "ROME"), req("2", "Boris", "Oslo")], n_slots=1, secret=SECRET, reuse_min_prob=0.0
    )
    mkvs, _ = a.edit_slot(0)
    tag = a.tags_of(0)[0]
    assert b.tags_of(0)[0] == tag  # same fact after normalisation
    b_mkvs, report = b.edit_slot(0, reused={tag: mkvs.z[0]})
    assert report.reused == 1 and report.optimised == 1
    torch.testing.assert_close(b_mkvs.z[0], mkvs.z[0])
    assert b.refused_reuse == []


def test_a_served_z_that_does_not_give_the_target_is_refused_and_optimised_again(shared):
    a = Participant("a", shared, [req("1", "Anna", "Rome")], n_slots=1, secret=SECRET)
    mkvs, _ = a.edit_slot(0)
    tag = a.tags_of(0)[0]
    planted = mkvs.z[0] - 3 * mkvs.delta[0]  # pushes the fact away from its new object
    shared.load_layers(shared.base_weights)
    honest, bad = shared.target_prob([req("9", "anna", "ROME")] * 2, torch.stack([mkvs.z[0], planted])).tolist()
    assert bad < honest  # the tiny model's scale: a threshold between the two
    b = Participant(
        "b", shared, [req("9", "anna", "ROME")], n_slots=1, secret=SECRET, reuse_min_prob=(honest + bad) / 2
    )
    b_mkvs, report = b.edit_slot(0, reused={tag: planted})
    assert (report.reused, report.optimised) == (0, 1) and b.refused_reuse == [tag]
    assert not torch.allclose(b_mkvs.z[0], planted)


def test_reedit_applies_only_what_passes_the_gate(shared):
    a = Participant("a", shared, [req("1", "Anna", "Rome")], n_slots=1)
    b = Participant("b", shared, [req("2", "Boris", "Oslo")], n_slots=1)
    a.edit_slot(0)
    b_mkvs, _ = b.edit_slot(0)
    before = {l: w.clone() for l, w in a.layers.items()}
    report = a.reedit([b_mkvs], alpha=1.0)  # cos > 1 never holds: nothing kept
    assert (report.received_sets, report.kept_sets, report.applied) == (1, 0, 0)
    assert all(torch.equal(before[l], a.layers[l]) for l in before)
    assert a.refused_ids == ["b/0/0"]
    report = a.reedit([b_mkvs], alpha=-1.0)  # sent again: a set decided on is not reconsidered
    assert (report.received_sets, report.kept_sets) == (1, 0) and a.reedited_ids == []
    d = Participant("d", shared, [req("4", "Dora", "Kyiv")], n_slots=1)
    d.edit_slot(0)
    before = {l: w.clone() for l, w in d.layers.items()}
    report = d.reedit([b_mkvs], alpha=-1.0)  # everything is similar enough
    assert (report.kept_sets, report.applied) == (1, 1) and d.reedited_ids == ["b/0/0"]
    assert any(not torch.equal(before[l], d.layers[l]) for l in before)
    c = Participant("c", shared, [req("3", "Cleo", "Lima")], n_slots=1)
    c.edit_slot(0)
    assert c.reedit([b_mkvs], alpha=1.0, gate="none").applied == 1  # "w/o Z": keeps every set


def test_the_authors_gate_applies_single_mkvs_against_this_slots_own(shared):
    a = Participant("a", shared, [req("1", "Anna", "Rome"), req("5", "Ezra", "Bern")], n_slots=2)
    b = Participant("b", shared, [req("2", "Boris", "Oslo"), req("3", "Cleo", "Lima")], n_slots=1)
    a.edit_slot(0)
    b_mkvs, _ = b.edit_slot(0)
    own = a.own.delta
    cos = (
        torch.nn.functional.normalize(b_mkvs.delta.double(), dim=1)
        @ torch.nn.functional.normalize(own.double(), dim=1).T
    )
    alpha = float((cos[0, 0] + cos[1, 0]) / 2)  # between b's two vectors' similarity to a's one
    keep_first = bool(cos[0, 0] > alpha)
    report = a.reedit([b_mkvs], alpha=alpha, gate="paper")
    assert report.applied == 1 and report.kept_sets == 1
    assert a.reedited_ids == [b_mkvs.ids[0 if keep_first else 1]]
    assert a.refused_ids == [b_mkvs.ids[1 if keep_first else 0]]
    a.edit_slot(1)  # slot 1's own vector is a's second request: the rule compares with it alone
    assert a._own_rows_of_slot(1) == [1] and a._own_rows_of_slot(0) == [0]


def test_the_probe_gate_applies_the_mkvs_whose_effect_on_own_prompts_passes_tau(shared):
    """Each incoming MKV alone: kept when max over own prompts of KL(p(z) || p(h)) > tau, computed on
    the receiver's own model and prompts (one per template)."""
    a = Participant("a", shared, [req("1", "Anna", "Rome")], n_slots=1)
    b = Participant("b", shared, [req("2", "Boris", "Oslo"), req("3", "Cleo", "Lima")], n_slots=1)
    a.edit_slot(0)
    b_mkvs, _ = b.edit_slot(0)
    a.activate()
    s = probe_divergence(shared.model, shared.tok, a.edited_requests(), b_mkvs.z, b_mkvs.delta, shared.hp.z_layer)[0]
    assert s.shape == (2,) and s[0] != s[1]
    tau = float(s.mean())  # between the two: one passes
    first = bool(s[0] > tau)
    before = {l: w.clone() for l, w in a.layers.items()}
    report = a.reedit([b_mkvs], gate="probe", tau=tau)
    assert (report.kept_sets, report.applied) == (1, 1)
    assert a.reedited_ids == [b_mkvs.ids[0 if first else 1]] and a.refused_ids == [b_mkvs.ids[1 if first else 0]]
    assert any(not torch.equal(before[l], a.layers[l]) for l in before)
    c = Participant("c", shared, [req("4", "Dora", "Kyiv")], n_slots=1)
    c.edit_slot(0)
    assert c.reedit([b_mkvs], gate="probe", tau=1e6).applied == 0  # nothing moves an answer that much


def test_a_restarted_participant_resumes_from_its_checkpoint(shared, tmp_path):
    folder = tmp_path / "ckpt" / "a"
    requests = [req("1", "Anna", "Rome"), req("2", "Boris", "Oslo")]
    a = Participant("a", shared, requests, n_slots=2, checkpoint_dir=folder)
    a.edit_slot(0)
    restarted = Participant("a", shared, requests, n_slots=2, checkpoint_dir=folder)
    assert restarted.next_slot == 1 and restarted.own.ids == a.own.ids
    for layer in shared.hp.layers:
        assert torch.equal(restarted.layers[layer], a.layers[layer])
    torch.testing.assert_close(restarted.own.z, a.own.z)
    restarted.edit_slot(1)
    assert restarted.next_slot == 2 and len(restarted.own) == 2
    with pytest.raises(ValueError, match="belongs to"):
        Participant("b", shared, requests, n_slots=2, checkpoint_dir=folder)
