"""Server-side logic on plain arrays: the MKV store, upload validation, merges; Eq. 8 and tags."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fededit_core.data.requests import EditRequest
from fededit_core.fedleke.reedit import best_match_similarity, kept_rows, paper_keep, reedit_decision
from fededit_core.fedleke.tags import normalise, request_tag
from strategies.aggregate import (
    TA_SCALE,
    TIES_KEEP,
    TIES_SCALE,
    edit_average,
    factor_average,
    merge_updates,
    sum_statistics,
    ties_merge,
)
from strategies.store import MKVStore
from strategies.validation import (
    FederationSpec,
    UploadError,
    validate_delta_upload,
    validate_mkv_upload,
    validate_stats_upload,
)

SPEC = FederationSpec(fingerprint="f" * 32, d_model=8, d_ff=16, layers=(1, 2), max_items=10)


def mkv_arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "z": rng.standard_normal((n, 8)).astype(np.float32),
        "delta": rng.standard_normal((n, 8)).astype(np.float32),
        "keys": rng.standard_normal((n, 2, 16)).astype(np.float32),
        "corrections": 0.1 * rng.standard_normal((n, 2, 8)).astype(np.float32),
        "layers": np.array([1, 2]),
    }


def test_store_keeps_exactly_the_uploads_and_survives_a_restart(tmp_path):
    path = tmp_path / "mkv.sqlite"
    store = MKVStore(path)
    a, b = mkv_arrays(3, 1), mkv_arrays(2, 2)
    store.put("run", "c0", 0, SPEC.fingerprint, ["a", "b", "c"], ["t1", "t2", None], a)
    store.put("run", "c1", 0, SPEC.fingerprint, ["d", "e"], ["t3", "t1"], b)
    store.close()
    store = MKVStore(path)  # a restarted server sees everything
    assert store.count("run") == 5 and store.last_slot("run") == 0
    got = {u.client: u for u in store.uploads("run")}
    for name in a:
        np.testing.assert_array_equal(got["c0"].arrays[name], a[name])
        np.testing.assert_array_equal(got["c1"].arrays[name], b[name])
    assert got["c0"].ids == ["a", "b", "c"] and got["c0"].tags == ["t1", "t2", None]
    assert got["c0"].arrays["z"].dtype == np.float32


def test_reupload_of_a_slot_replaces_and_others_are_served(tmp_path):
    store = MKVStore(tmp_path / "mkv.sqlite")
    store.put("run", "c0", 0, SPEC.fingerprint, ["a"], [None], mkv_arrays(1, 1))
    store.put("run", "c0", 0, SPEC.fingerprint, ["a", "b"], [None, None], mkv_arrays(2, 2))
    store.put("run", "c1", 0, SPEC.fingerprint, ["x"], [None], mkv_arrays(1, 3))
    store.put("run", "c1", 1, SPEC.fingerprint, ["y"], [None], mkv_arrays(1, 4))
    store.put("other-run", "c1", 1, SPEC.fingerprint, ["y"], [None], mkv_arrays(1, 4))
    assert store.count("run") == 4
    served = store.uploads("run", exclude_client="c0", after_slot=None)
    assert [(u.client, u.slot) for u in served] == [("c1", 0), ("c1", 1)]
    assert [(u.client, u.slot) for u in store.uploads("run", exclude_client="c0", after_slot=0)] == [("c1", 1)]
    assert all(u.client != "c1" for u in store.uploads("run", exclude_client="c1", after_slot=None))


def test_tags_are_found_at_their_first_upload(tmp_path):
    store = MKVStore(tmp_path / "mkv.sqlite")
    first = store.put("run", "c0", 0, SPEC.fingerprint, ["a", "b"], ["t1", "t2"], mkv_arrays(2))
    store.put("run", "c1", 1, SPEC.fingerprint, ["c"], ["t1"], mkv_arrays(1))
    assert store.find_tags("run", ["t1", "t2", "t9"]) == {"t1": (first, 0), "t2": (first, 1)}
    assert store.find_tags("other", ["t1"]) == {}


def test_a_good_mkv_upload_passes():
    assert validate_mkv_upload("c0", SPEC.fingerprint, ["a", "b"], mkv_arrays(2), SPEC) == 2


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.pop("keys"), "missing"),
        (lambda a: a.update(extra=np.zeros(3)), "unexpected"),
        (lambda a: a.update(z=np.zeros((2, 9), np.float32)), "shape"),
        (lambda a: a.update(keys=np.zeros((2, 2, 15), np.float32)), "shape"),
        (lambda a: a.update(corrections=np.zeros((2, 1, 8), np.float32)), "shape"),
        (lambda a: a.update(z=np.full((2, 8), np.nan, np.float32)), "NaN"),
        (lambda a: a.update(delta=np.zeros((2, 8), np.int32)), "dtype"),
        (lambda a: a.update(layers=np.array([1, 3])), "layers"),
    ],
)
def test_bad_mkv_uploads_are_refused(mutate, message):
    arrays = mkv_arrays(2)
    mutate(arrays)
    with pytest.raises(UploadError, match=message) as err:
        validate_mkv_upload("c7", SPEC.fingerprint, ["a", "b"], arrays, SPEC)
    assert "client c7" in str(err.value)


def test_corrections_beyond_two_shift_bounds_are_refused():
    """(1'): |c_i^l| <= 2 c (c + 2) |z_i - delta_i|; an honest correction is far inside it."""
    spec = dataclasses.replace(SPEC, clamp_norm_factor=0.5)
    arrays = mkv_arrays(2)
    arrays["delta"] = 0.1 * arrays["z"]  # |delta| = |z| / 10: inside (1)
    validate_mkv_upload("c7", SPEC.fingerprint, ["a", "b"], arrays, spec)
    h = np.linalg.norm(arrays["z"] - arrays["delta"], axis=1)
    arrays["corrections"][1, 1] *= 2.6 * h[1] / np.linalg.norm(arrays["corrections"][1, 1])  # 2.6 |h| > 2.5 |h|
    with pytest.raises(UploadError, match="1 correction"):
        validate_mkv_upload("c7", SPEC.fingerprint, ["a", "b"], arrays, spec)


def test_mkv_upload_limits_ids_and_fingerprint():
    with pytest.raises(UploadError, match="fingerprint"):
        validate_mkv_upload("c0", "0" * 32, ["a", "b"], mkv_arrays(2), SPEC)
    with pytest.raises(UploadError, match="limit"):
        validate_mkv_upload("c0", SPEC.fingerprint, [str(i) for i in range(11)], mkv_arrays(11), SPEC)
    with pytest.raises(UploadError, match="distinct"):
        validate_mkv_upload("c0", SPEC.fingerprint, ["a", "a"], mkv_arrays(2), SPEC)


def test_delta_and_statistics_uploads_are_checked():
    good = {f"delta.{l}": np.zeros((8, 16), np.float32) for l in (1, 2)}
    validate_delta_upload("c0", SPEC.fingerprint, good, SPEC)
    with pytest.raises(UploadError, match="shape"):
        validate_delta_upload("c0", SPEC.fingerprint, {**good, "delta.2": np.zeros((16, 8), np.float32)}, SPEC)
    k = np.random.default_rng(0).standard_normal((5, 16))
    stats = {"rk": np.zeros((8, 16)), "kk": k.T @ k}
    validate_stats_upload("c0", SPEC.fingerprint, stats, SPEC, layer=1)
    with pytest.raises(UploadError, match="symmetric"):
        validate_stats_upload(
            "c0", SPEC.fingerprint, {**stats, "kk": stats["kk"] + np.triu(np.ones((16, 16)))}, SPEC, layer=1
        )
    with pytest.raises(UploadError, match="not edited"):
        validate_stats_upload("c0", SPEC.fingerprint, stats, SPEC, layer=5)


def test_edit_average_weights_by_edit_count():
    a, b = {"delta.1": np.ones((2, 2))}, {"delta.1": np.full((2, 2), 4.0)}
    np.testing.assert_allclose(edit_average([(1, a), (3, b)])["delta.1"], np.full((2, 2), 3.25))
    assert set(edit_average([(0, {"x": np.ones(1)}), (2, a)])) == {"delta.1"}
    with pytest.raises(ValueError, match="different layers"):
        edit_average([(1, a), (1, {"delta.2": np.ones((2, 2))})])


def test_statistics_sum_is_the_statistics_of_the_union():
    rng = np.random.default_rng(0)
    keys, resid = rng.standard_normal((7, 16)), rng.standard_normal((7, 8))
    parts = [{"rk": resid[s].T @ keys[s], "kk": keys[s].T @ keys[s]} for s in (slice(0, 3), slice(3, 7))]
    total = sum_statistics(parts)
    np.testing.assert_allclose(total["rk"], resid.T @ keys)
    np.testing.assert_allclose(total["kk"], keys.T @ keys)


def test_reedit_condition_on_constructed_vectors():
    own = torch.eye(4)[:4] * 3.0  # four orthogonal directions
    related = torch.stack([torch.eye(4)[0] + 0.01, torch.eye(4)[1] * 2])  # matches 2 of 4 own z
    unrelated = -torch.eye(4)[:2]
    keep, fraction = reedit_decision(own, related, alpha=0.9)
    assert keep and fraction == pytest.approx(0.5)
    keep, fraction = reedit_decision(own, unrelated, alpha=0.0)
    assert not keep and fraction == 0.0
    keep, _ = reedit_decision(own[:3], related, alpha=0.9)  # 2 of 3 own z match
    assert keep
    keep, fraction = reedit_decision(own, related[:1], alpha=0.9)  # 1 of 4
    assert not keep and fraction == pytest.approx(0.25)
    assert reedit_decision(own, torch.zeros(0, 4), 0.5) == (False, 0.0)
    sims = best_match_similarity(own, related)
    assert sims[0] > 0.99 and sims[2] == pytest.approx(0.01 / float(related[0].norm()), abs=1e-6)
    with pytest.raises(ValueError, match="one d"):
        best_match_similarity(own, torch.zeros(2, 5))


def relation_world():
    """Own {a, b, c, d} of one relation (pairwise cosine ~0.8), a sender's {b', c', e}: b', c' of that
    relation, e unrelated (orthogonal to it)."""
    common, e = torch.zeros(8), torch.zeros(8)
    common[0], e[7] = 2.0, 1.0
    own = torch.stack([common + torch.eye(8)[i] for i in (1, 2, 3, 4)])
    sender = torch.stack([common + torch.eye(8)[2] * 1.1, common + torch.eye(8)[3] * 0.9, e])
    return own, sender


def test_the_authors_rule_keeps_related_vectors_one_by_one_and_the_set_rule_keeps_the_whole_set():
    own, sender = relation_world()
    assert paper_keep(own, sender, alpha=0.5).tolist() == [True, True, False]
    assert kept_rows("paper", own, own, sender, 0.5).tolist() == [True, True, False]
    assert kept_rows("set", own, own, sender, 0.5).tolist() == [True, True, True]  # e comes along
    assert kept_rows("none", own, own, sender, 0.99).tolist() == [True, True, True]
    assert kept_rows("set", own, own, sender[2:], 0.5).tolist() == [False]


def test_the_authors_rule_counts_this_slots_own_vectors_against_half_of_them():
    own, sender = relation_world()
    b_only = torch.stack([own[1] * 3, -own[0], -own[0], -own[0]])  # 1 of 4 own similar to b'
    assert paper_keep(b_only, sender[:1], alpha=0.5).tolist() == [False]
    assert paper_keep(b_only[:2], sender[:1], alpha=0.5).tolist() == [True]  # 1 of 2: half is enough
    assert paper_keep(own[:0], sender, alpha=-1.0).tolist() == [False, False, False]  # no own this slot
    assert paper_keep(own, sender, alpha=0.95).tolist() == [False, False, False]
    with pytest.raises(ValueError, match="one d"):
        paper_keep(own, torch.zeros(1, 5), 0.5)
    with pytest.raises(ValueError, match="one of"):
        kept_rows("sets", own, own, sender, 0.5)


def test_request_tags_match_normalised_requests_only():
    secret = b"s" * 32
    a = EditRequest(case_id="1", subject="Eiffel Tower", prompt="The {} is in", target_new="Rome")
    b = EditRequest(case_id="2", subject="eiffel  tower", prompt="The {}  is in", target_new="ROME")
    c = EditRequest(case_id="3", subject="Eiffel Tower", prompt="The {} is in", target_new="Paris")
    assert request_tag(a, secret) == request_tag(b, secret) != request_tag(c, secret)
    assert request_tag(a, secret) != request_tag(a, b"t" * 32)
    assert normalise("  A\u00a0B ") == "a b"
    with pytest.raises(ValueError, match="16 bytes"):
        request_tag(a, b"short")


def test_the_gate_replay_counts_what_each_rule_keeps_of_related_and_unrelated_mkvs():
    from bench.gate_analysis import replay

    own, sender = relation_world()
    vectors = {"v": torch.cat([own, sender])}
    slots = {"a": [[0, 1, 2, 3]], "b": [[4, 5, 6]]}  # b's rows 4, 5 share a's relation; row 6 does not
    out = replay(vectors, slots, groups=[0, 0, 0, 0, 0, 0, 1], alphas=(0.5,))
    (paper,), (whole_set,) = out["paper"]["v"], out["set"]["v"]
    assert (paper["related_offered"], paper["unrelated_offered"]) == (6, 1)
    assert (paper["related_kept"], paper["unrelated_kept"], paper["precision"], paper["recall"]) == (6, 0, 1.0, 1.0)
    assert (whole_set["related_kept"], whole_set["unrelated_kept"]) == (6, 1)
    assert whole_set["precision"] == pytest.approx(6 / 7)


def test_the_probe_replay_keeps_offers_by_their_largest_kl_and_labels_are_summarised():
    from bench.gate_analysis import label_summary, offers, oracles, replay_probe

    slots = {"a": [[0, 1]], "b": [[2, 3, 4]]}
    served = offers(slots, groups=[0, 1, 0, 2, 1])  # a is offered b's rows 2 (group 0), 3 (2), 4 (1)
    scores = [torch.tensor([3.0, 0.5, 1.5]), torch.tensor([0.1, 2.0])]  # a's offer, then b's
    rows = {r["tau"]: r for r in replay_probe(scores, served, taus=(1.0, 2.5))}
    assert [o.receiver for o in served] == ["a", "b"]
    # tau 1: a keeps 2 and 4 (both related), b keeps a's row 1 (group 1: related to b's row 4)
    assert (rows[1.0]["related_kept"], rows[1.0]["unrelated_kept"], rows[1.0]["related_offered"]) == (3, 0, 4)
    assert (rows[2.5]["related_kept"], rows[2.5]["recall"]) == (1, 0.25)
    requests = [
        EditRequest(case_id=str(i), subject=f"S{i}", prompt=p, target_new="X")
        for i, p in enumerate(["{} is", "{} was", "{} is", "{} has", "{} had"])
    ]
    summary = label_summary(requests, served, [0, 1, 0, 2, 1])
    assert summary == {"groups": 3, "offered": 5, "related": 4, "related_same_template": 2}
    kinds = oracles(requests, served, file_groups=[0, 0, 0, 0, 0])  # one answer kind in the whole file
    assert (kinds["answer_kind"]["related_kept"], kinds["answer_kind"]["unrelated_kept"]) == (4, 1)
    assert (kinds["template"]["related_kept"], kinds["template"]["unrelated_kept"]) == (2, 0)


def test_factor_average_is_the_product_of_the_means_with_short_clients_padded():
    """MEMITAvg: mean(R) mean(A)^T, column i of every client paired; a client with fewer edits gets
    zero columns; a client without edits is left out."""
    rng = np.random.default_rng(0)
    a1, r1 = rng.normal(size=(6, 3)), rng.normal(size=(4, 3))
    a2, r2 = rng.normal(size=(6, 2)), rng.normal(size=(4, 2))
    up = lambda a, r: {"factor_k.7": a, "factor_r.7": r}  # noqa: E731
    empty = up(np.zeros((6, 0)), np.zeros((4, 0)))
    out = factor_average([(3, up(a1, r1)), (2, up(a2, r2)), (0, empty)], (7,))
    a2p, r2p = np.pad(a2, ((0, 0), (0, 1))), np.pad(r2, ((0, 0), (0, 1)))
    np.testing.assert_allclose(out["delta.7"], ((r1 + r2p) / 2) @ ((a1 + a2p) / 2).T)
    alone = factor_average([(3, up(a1, r1))], (7,))
    np.testing.assert_allclose(alone["delta.7"], r1 @ a1.T)  # one client: its own MEMIT update
    # not the mean of the clients' updates: the cross terms R_1 A_2^T and R_2 A_1^T enter
    assert not np.allclose(out["delta.7"], (r1 @ a1.T + r2p @ a2p.T) / 2)
    with pytest.raises(ValueError, match="no client sent factors"):
        factor_average([(0, empty)], (7,))


def test_simple_average_and_task_arithmetic_of_constructed_updates():
    a, b = np.array([[1.0, -2.0]]), np.array([[3.0, 4.0]])
    updates = [(2, {"delta.1": a}), (0, {"delta.1": b})]  # a client without edits still counts
    np.testing.assert_allclose(merge_updates("sa", updates)["delta.1"], [[2.0, 1.0]])
    np.testing.assert_allclose(merge_updates("ta", updates)["delta.1"], TA_SCALE * np.array([[4.0, 2.0]]))
    with pytest.raises(ValueError, match="unknown merge"):
        merge_updates("median", updates)
    with pytest.raises(ValueError, match="different layers"):
        merge_updates("sa", [(1, {"delta.1": a}), (1, {"delta.2": b})])


def test_ties_trims_elects_the_sign_by_mass_and_averages_the_agreeing_values():
    deltas = np.array(
        [
            [10.0, -1.0, 0.5, 0.1, -6.0],
            [-4.0, 2.0, 0.2, -0.3, -5.0],
            [3.0, 0.1, 0.4, 8.0, 0.0],
        ]
    )
    # keep 0.4 of 5: |x| >= the 3rd smallest |x| of each row (the reference's kthvalue, 5 - int(2)),
    # trimmed rows [10, -1, 0, 0, -6], [-4, 2, 0, 0, -5], [3, 0, 0.4, 8, 0]; column sums 9, 1, 0.4,
    # 8, -11 elect + + + + -; the agreeing values' means 6.5, 2, 0.4, 8, -5.5
    merged = ties_merge(deltas, keep=0.4, scale=0.5)
    np.testing.assert_allclose(merged, 0.5 * np.array([6.5, 2.0, 0.4, 8.0, -5.5]))
    # CollabEdit's setting: top 20%, lambda 0.4
    assert (TIES_KEEP, TIES_SCALE) == (0.2, 0.4)
    one = np.array([[1.0, -2.0, 3.0, -4.0, 5.0]])
    np.testing.assert_allclose(ties_merge(one), TIES_SCALE * np.array([0, 0, 0, -4.0, 5.0]))
    # an entry whose trimmed values cancel takes the sign of the majority of the elected signs
    tie = np.array([[2.0, 1.0, 3.0], [-2.0, 1.0, 3.0]])
    np.testing.assert_allclose(ties_merge(tie, keep=1.0, scale=1.0), [2.0, 1.0, 3.0])
    assert ties_merge(np.zeros((2, 3, 4))).shape == (3, 4)
