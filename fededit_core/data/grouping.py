"""CounterFact relation groups and the relation partition (FedLEKE's non-IID CounterFact setup).

CounterFact files carry no relation id, but the templates of one relation share the kind of answer
(languages, countries, cities, companies, ...). Groups are formed from the answers:

1. each template ``t`` (``request.prompt``, with ``"{}"`` for the subject) gets a count vector
   ``c_t[a]`` = how often the string ``a`` is the ``target_true`` or ``target_new`` of its requests;
2. templates ``s`` and ``t`` are linked when ``cos(c_s, c_t) = c_s . c_t / (|c_s| |c_t|) >= 0.6``;
3. the connected components of these links (union-find, i.e. single linkage) are the groups.

The threshold 0.6 was read off the 10,000-record ``counterfact-train.json`` (215 templates). At 0.6
the groups are answer kinds: cities 1,741 requests, languages 1,701, countries 1,212, continents 943,
companies / products 696, sports positions 513, genres 439, occupations 359, TV networks 352,
employers / owners 320, twin cities 275, fields of work 271, ...; up to 0.7 the same kinds stay
together (a few city and country templates drop out). Below, groups chain through mixed templates
(``"{}, from"`` answers countries and companies): at 0.55 the employers join the countries, at 0.5
cities, countries and companies form one group of 4,082 requests. At 0.6 that file has **47 groups**,
29 of them a single small template (``"{} is named after"``, ``"The capital of {} is"``: answers too
varied to match anything). Whole groups per client make client sizes uneven when groups are large
next to ``n / n_clients`` (10 clients on that file: 729 to 1,757 requests).
"""

from __future__ import annotations

import random

import numpy as np

from fededit_core.data.clients import client_name
from fededit_core.data.loaders import DataError
from fededit_core.data.requests import EditRequest

THRESHOLD = 0.6


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def template_groups(requests: list[EditRequest], threshold: float = THRESHOLD) -> list[list[str]]:
    """Templates linked by ``cos(answer counts) >= threshold``, merged with union-find (module docstring)."""
    templates = list(dict.fromkeys(r.prompt for r in requests))  # first-seen order
    answers = sorted({a for r in requests for a in (r.target_true, r.target_new) if a is not None})
    t_index = {t: i for i, t in enumerate(templates)}
    a_index = {a: j for j, a in enumerate(answers)}
    counts = np.zeros((len(templates), len(answers)))
    for r in requests:
        for a in (r.target_true, r.target_new):
            if a is not None:
                counts[t_index[r.prompt], a_index[a]] += 1
    unit = counts / np.linalg.norm(counts, axis=1, keepdims=True)
    linked = (unit @ unit.T) >= threshold
    parent = list(range(len(templates)))
    for i, j in zip(*np.nonzero(np.triu(linked, k=1))):
        parent[_find(parent, int(i))] = _find(parent, int(j))
    groups: dict[int, list[str]] = {}
    for i, t in enumerate(templates):
        groups.setdefault(_find(parent, i), []).append(t)
    return list(groups.values())


def relation_groups(requests: list[EditRequest], threshold: float = THRESHOLD) -> list[list[int]]:
    """Request indices by relation group: largest group first (ties: earliest request), file order inside."""
    group_of = {t: g for g, ts in enumerate(template_groups(requests, threshold)) for t in ts}
    members: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        members.setdefault(group_of[r.prompt], []).append(i)
    return sorted(members.values(), key=lambda idx: (-len(idx), idx[0]))


def relation_partition(
    requests: list[EditRequest], n_clients: int, seed: int = 0, mix: float = 0.1
) -> dict[str, list[EditRequest]]:
    """Whole relation groups per client, then about ``mix`` of each client moved in from the others.

    1. Groups (:func:`relation_groups`), largest first, each go to the client with the fewest requests
       so far (ties: lowest index). With fewer groups than clients, the largest group is cut in two
       halves (file order) until there are ``n_clients`` groups, so every client gets one.
    2. Client ``c`` (home size ``n_c``) then receives ``round(mix * n_c)`` requests drawn at random
       (seeded) from the other clients' home requests: they are *moved*, so every request is held
       exactly once; a donor is never emptied.
    3. Each client's list is shuffled (seeded), so time slots cut in file order mix its relations.
    """
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or n_clients < 1:
        raise DataError(f"relation partition needs at least one client, got {n_clients!r}")
    if len(requests) < n_clients:
        raise DataError(f"relation partition: {len(requests)} requests cannot fill {n_clients} clients")
    if not 0.0 <= mix < 1.0:
        raise DataError(f"relation partition: mix must be in [0, 1), got {mix!r}")

    groups = relation_groups(requests)
    while len(groups) < n_clients:
        largest = groups.pop(0)
        half = (len(largest) + 1) // 2
        groups = sorted(groups + [largest[:half], largest[half:]], key=lambda idx: (-len(idx), idx[0]))

    home: list[list[int]] = [[] for _ in range(n_clients)]
    for group in groups:
        smallest = min(range(n_clients), key=lambda c: (len(home[c]), c))
        home[smallest].extend(group)

    rng = random.Random(seed)
    owner = {i: c for c, items in enumerate(home) for i in items}
    left = [len(items) for items in home]  # home requests still with their owner
    moved_in: list[list[int]] = [[] for _ in range(n_clients)]
    moved: set[int] = set()
    for c in range(n_clients):
        wanted = round(mix * len(home[c]))
        pool = [i for d in range(n_clients) if d != c for i in home[d] if i not in moved]
        rng.shuffle(pool)
        for i in pool:
            if len(moved_in[c]) >= wanted:
                break
            if left[owner[i]] > 1:
                left[owner[i]] -= 1
                moved.add(i)
                moved_in[c].append(i)

    parts: dict[str, list[EditRequest]] = {}
    for c in range(n_clients):
        held = [i for i in home[c] if i not in moved] + moved_in[c]
        rng.shuffle(held)
        parts[client_name(c)] = [requests[i] for i in held]
    return parts
