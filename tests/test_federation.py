"""Every strategy end to end on a tiny model, with in-process clients (no Flower): what the server
stores and serves, reuse, CollabEdit = global MEMIT, EditAvg, validation, handshake, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fededit_core.data.partition import load_partitions
from fededit_core.fedleke.reedit import paper_keep
from fededit_core.memit.target import ZResult
from fededit_core.memit.update import solve_update, statistics_from_factors
from strategies.aggregate import MERGES, merge_updates
from strategies.federation import run_federation
from strategies.session import FederationError, Reply
from strategies.settings import RunSettings
from strategies.store import MKVStore
from tests.federation_kit import (
    SUBJECTS,
    DirectTransport,
    client_specs,
    isolated_tiny_world,
    request_record,
    write_jsonl,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with isolated_tiny_world(tmp_path_factory, "world") as world:
        yield world


def run(world, tmp_path, strategy, run="r", transport=None, specs=None, **settings):
    specs = specs or client_specs(world, tmp_path, run)
    transport = transport or DirectTransport(specs)
    settings = RunSettings(
        run=run,
        strategy=strategy,
        num_slots=2,
        alpha=settings.pop("alpha", 0.0),
        store_path=tmp_path / "store.sqlite",
        **settings,
    )
    report = run_federation(transport, list(specs), settings, {"strategy": strategy}, progress=False)
    return report, transport


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "plaintext"])
def test_fededit_stores_exactly_the_uploads_and_serves_only_the_others(world, tmp_path, seal):
    report, transport = run(world, tmp_path, "fededit", seal_mkvs=seal)
    store = MKVStore(tmp_path / "store.sqlite")
    uploads = store.uploads("r")
    assert store.count("r") == 8 and len(uploads) == 4  # 2 clients x 2 slots, 2 requests each
    edits = {(c, ins.args["slot"]): reply for c, ins, reply in transport.log if ins.op == "edit"}
    names = ("sealed",) if seal else ("z", "delta", "keys")
    for upload in uploads:  # byte for byte what the client sent, under its name and slot
        sent = edits[(upload.client, upload.slot)]
        assert upload.ids == sent.body["ids"] and all(
            i.startswith(f"{upload.client}/{upload.slot}/") for i in upload.ids
        )
        assert set(upload.arrays) == set(sent.arrays) - {"layers"} | ({"layers"} if not seal else set())
        for name in names:
            np.testing.assert_array_equal(upload.arrays[name], sent.arrays[name])
    served = [(c, ins) for c, ins, _ in transport.log if ins.op == "reedit"]
    assert len(served) == 4
    for client, ins in served:
        if seal:  # the other client's blob of this slot, as it was uploaded
            (source,) = ins.args["sources"]
            assert source["sender"] != client and not ins.args["ids"]
            blob = edits[(source["sender"], source["slot"])].arrays["sealed"]
            np.testing.assert_array_equal(ins.arrays["sealed.0"], blob)
            continue
        assert ins.args["ids"] and client not in ins.args["senders"]
        assert not any(i.startswith(client + "/") for i in ins.args["ids"])
        assert len(ins.arrays["z"]) == len(ins.args["ids"])
    # alpha 0: every z is similar enough, so each client re-edited all 4 of the other's requests
    assert [c["applied"] for c in report["clients"]] == [4, 4]
    assert [c["n_others"] for c in report["clients"]] == [4, 4]
    assert report["strategy"] == "fededit" and report["weighted"]["n"] == 8
    assert all(c["bytes_sent"] > 0 and c["bytes_received"] > 0 for c in report["clients"])


def test_the_reedit_gate_keeps_nothing_at_alpha_one_and_everything_without_gate(world, tmp_path):
    gated, _ = run(world, tmp_path / "a", "fededit", alpha=1.0)
    assert [c["applied"] for c in gated["clients"]] == [0, 0]
    assert [c["received_sets"] for c in gated["clients"]] == [2, 2]
    ungated, _ = run(world, tmp_path / "b", "fededit-noreedit", alpha=1.0)
    assert [c["kept_sets"] for c in ungated["clients"]] == [2, 2]
    assert ungated["strategy"] == "fededit-noreedit"


def test_the_run_configs_gate_reaches_the_clients_and_the_authors_rule_decides_per_mkv(world, tmp_path):
    report, transport = run(world, tmp_path / "a", "fededit", alpha=0.0, gate="paper")
    assert report["server"]["gate"] == "paper"
    own = {c: transport.worker.participant(spec).own for c, spec in transport.specs.items()}

    def rows(c, slot):
        return [i for i, id_ in enumerate(own[c].ids) if id_.split("/")[1] == str(slot)]

    expected = [  # each incoming delta of the other's slot-t set against the receiver's own of slot t
        sum(int(paper_keep(own[c].delta[rows(c, t)], own[o].delta[rows(o, t)], 0.0).sum()) for t in (0, 1))
        for c, o in (("client-0", "client-1"), ("client-1", "client-0"))
    ]
    assert [c["applied"] for c in report["clients"]] == expected and sum(expected) > 0
    nothing, _ = run(world, tmp_path / "b", "fededit", alpha=1.0, gate="paper")
    assert [c["applied"] for c in nothing["clients"]] == [0, 0]
    with pytest.raises(FederationError, match="gate must be one of"):
        RunSettings(run="x", gate="sets")


def test_the_probe_gates_threshold_reaches_the_clients_through_the_run_config(world, tmp_path):
    """gate 'probe': at tau 0 what moves an own prompt's answer at all is kept (on the tiny world's
    saturated head some MKVs give KL 0 in float32), at 100 nats nothing."""
    some, _ = run(world, tmp_path / "a", "fededit", gate="probe", probe_tau=0.0)
    assert some["server"]["gate"] == "probe" and some["server"]["tau"] == 0.0
    assert all(0 < c["applied"] <= 4 for c in some["clients"])
    nothing, _ = run(world, tmp_path / "b", "fededit", gate="probe", probe_tau=100.0)
    assert [c["applied"] for c in nothing["clients"]] == [0, 0]
    with pytest.raises(ValidationError):
        RunSettings(run="x", gate="probe", probe_tau=-1.0)


@pytest.mark.parametrize("seal", [True, False], ids=["sealed", "plaintext"])
def test_a_request_computed_before_is_reused_not_optimised(world, tmp_path, seal):
    records = [
        request_record(i, s, f"client-{i % 2}")
        for i, s in enumerate(["Eiffel Tower", "Colosseum", "Big Ben", "Louvre"])
    ]
    records[3] = {**records[0], "case_id": "again", "client": "client-1"}  # client-1, slot 1 = client-0, slot 0
    data = write_jsonl(tmp_path / "repeat.jsonl", records)
    specs = client_specs(world, tmp_path, "reuse", data=str(data))
    report, transport = run(world, tmp_path, "fededit", run="reuse", specs=specs, seal_mkvs=seal)
    c1 = next(c for c in report["clients"] if c["client"] == "client-1")
    assert c1["reused"] == 1 and c1["optimised"] == 1
    assert report["server"]["z_served_for_reuse"] == 1
    first = next(r for c, i, r in transport.log if i.op == "edit" and c == "client-0" and i.args["slot"] == 0)
    again = next(r for c, i, r in transport.log if i.op == "edit" and c == "client-1" and i.args["slot"] == 1)
    own = transport.worker.participant(specs["client-1"]).own
    np.testing.assert_array_equal(
        own.z[own.ids.index("client-1/1/0")], transport.worker.participant(specs["client-0"]).own.z[0]
    )
    if seal:  # served as client-0's blob of slot 0 and its row 0
        asked = next(i for c, i, _ in transport.log if i.op == "edit" and c == "client-1" and i.args["slot"] == 1)
        assert asked.args["sources"] == [{"sender": "client-0", "slot": 0, "n": 1}] and asked.args["reuse_row"] == [0]
        np.testing.assert_array_equal(asked.arrays["sealed.0"], first.arrays["sealed"])
    else:
        np.testing.assert_array_equal(again.arrays["z"][0], first.arrays["z"][0])
    assert again.body["tags"][0] == first.body["tags"][0]


def test_collabedit_equals_one_global_memit_edit(world, tmp_path):
    specs = client_specs(world, tmp_path, "collab", num_slots=1)
    transport = DirectTransport(specs)
    settings = RunSettings(run="collab", strategy="collabedit", num_slots=1, store_path=tmp_path / "s.sqlite")
    run_federation(transport, list(specs), settings, {}, progress=False)
    worker = transport.worker
    editor = worker.editor(specs["client-0"])
    merged = {name: worker.participant(spec).layers for name, spec in specs.items()}
    # the reference: one MEMIT edit of the union, with each client's z (optimised on the base model)
    parts = load_partitions(world["data"], 2, "field")
    editor.reset()
    zs = [editor.compute_z(parts[name], progress=False) for name in sorted(parts)]
    union = [r for name in sorted(parts) for r in parts[name]]
    editor.edit(union, z=ZResult(torch.cat([z.z for z in zs]), torch.cat([z.h for z in zs])), progress=False)
    reference = editor.edited_layers()
    editor.reset()
    for layers in merged.values():
        for layer, weight in reference.items():
            shift = (weight - editor.base_weights[layer]).norm()
            assert shift > 0
            assert (layers[layer] - weight).norm() <= 1e-3 * shift


def collab_run(world, tmp_path, run: str, data: str | None = None, num_slots: int = 1, **settings):
    """A CollabEdit federation of the two tiny clients, no centralised run: (report, transport, specs)."""
    specs = client_specs(world, tmp_path, run, num_slots=num_slots, data=data)
    transport = DirectTransport(specs)
    config = RunSettings(
        run=run,
        strategy="collabedit",
        num_slots=num_slots,
        store_path=tmp_path / f"{run}.sqlite",
        centralised=False,
        **settings,
    )
    report = run_federation(transport, list(specs), config, {}, progress=False)
    return report, transport, specs


def test_collabedit_thin_factors_merge_the_model_the_dense_statistics_merge(world, tmp_path):
    """Low-rank transport: the merged layers of the dense path, from uploads of the slot's rank rather
    than d_ff columns. The dense path rounds its statistics to float32 on the wire (4e-6 of the update
    here); the thin factors travel in float64 and match float64 statistics to 1e-6
    (test_collabedit_engine)."""
    layers, uploads = {}, {}
    for transport_form in ("dense", "lowrank"):
        _, transport, specs = collab_run(world, tmp_path, f"collab-{transport_form}", collab_transport=transport_form)
        layers[transport_form] = {name: transport.worker.participant(spec).layers for name, spec in specs.items()}
        uploads[transport_form] = [
            r.arrays for _, i, r in transport.log if i.op == "collab" and i.args.get("stats") is not None
        ]
    base = transport.worker.editor(specs["client-0"]).base_weights
    for name in layers["lowrank"]:
        for layer, weight in layers["dense"][name].items():
            shift = (weight.double() - base[layer].double()).norm()
            assert shift > 0
            assert (layers["lowrank"][name][layer].double() - weight.double()).norm() <= 2e-5 * shift
    assert {tuple(sorted(a)) for a in uploads["lowrank"]} == {("kf", "rf")}
    d_ff = base[next(iter(base))].shape[1]
    assert max(a["kf"].shape[1] for a in uploads["lowrank"]) < d_ff
    size = {form: sum(v.nbytes for a in uploads[form] for v in a.values()) for form in uploads}
    assert size["lowrank"] < size["dense"] / 4


def test_collabedit_dynamic_covariance_solves_later_slots_against_earlier_keys(world, tmp_path):
    """beta1 > 0: slot 1 is solved with lambda (beta0 C0 + beta1 K0 K0^T) + K1 K1^T, K0 K0^T the merged
    keys of slot 0 at that layer; the last layer shows both slots' updates, rebuilt from what the
    server sent, in the final weights."""
    beta0, beta1 = 0.5, 2.0
    report, transport = run(world, tmp_path, "collabedit", collab_beta0=beta0, collab_beta1=beta1)
    specs = transport.specs
    editor = transport.worker.editor(specs["client-0"])
    last = len(editor.hp.layers) - 1
    layer = editor.hp.layers[last]
    sums = {
        ins.args["slot"]: statistics_from_factors(ins.arrays["kf"], ins.arrays["rf"])
        for _, ins, _ in transport.log
        if ins.op == "collab" and ins.args.get("apply") == last and ins.args["beta1"] == beta1
    }
    lam, c0 = editor.hp.mom2_weight, editor.c0()[layer].double()
    first = solve_update(*sums[0], c0, lam, prior=lam * beta0 * c0)
    second = solve_update(*sums[1], c0, lam, prior=lam * (beta0 * c0 + beta1 * sums[0][1]))
    plain = solve_update(*sums[1], c0, lam)
    final = transport.worker.participant(specs["client-0"]).layers[layer].double()
    expected = editor.base_weights[layer].double() + first + second
    assert (final - expected).norm() <= 1e-4 * (first + second).norm()
    assert (second - plain).norm() > 1e-3 * plain.norm()  # the memory changed slot 1's solve
    # every client remembers both slots' keys, and a restarted client reads them back
    memory = transport.worker.participant(specs["client-1"]).key_memory[layer]
    torch.testing.assert_close(memory @ memory.T, sums[0][1] + sums[1][1], rtol=1e-6, atol=1e-6)
    transport.worker.forget("r")
    restored = transport.worker.participant(specs["client-1"]).key_memory[layer]
    torch.testing.assert_close(restored, memory)


def test_collabedit_counts_a_request_two_clients_send_once(world, tmp_path):
    """client-1 also holds client-0's first request, in the same slot: with collab-dedup the merged
    model is the one of a federation without the copy; without it, the copy weighs twice."""
    records = [request_record(i, s, f"client-{i % 2}") for i, s in enumerate(SUBJECTS)]
    copy = {**records[0], "case_id": "copy", "client": "client-1"}
    files = {
        "copy": write_jsonl(tmp_path / "copy.jsonl", [*records, copy]),
        "plain": write_jsonl(tmp_path / "plain.jsonl", records),
    }
    layers, logs = {}, {}
    for name, data, dedup in (("dedup", "copy", True), ("twice", "copy", False), ("plain", "plain", True)):
        report, transport, specs = collab_run(world, tmp_path, f"dup-{name}", str(files[data]), collab_dedup=dedup)
        layers[name] = transport.worker.participant(specs["client-0"]).layers
        logs[name] = (report, transport.log)
    report, log = logs["dedup"]
    first = [(c, i) for c, i, _ in log if i.op == "collab" and i.args.get("stats") == 0]
    assert {c: i.args["skip"] for c, i in first} == {"client-0": [], "client-1": [4]}
    used = {c: r.body["n_used"] for c, i, r in log if i.op == "collab" and i.args.get("stats") == 0}
    assert used == {"client-0": 4, "client-1": 4}
    assert report["server"]["duplicates_counted_once"] == 1
    assert report["server"]["residual_norm_by_slot"]["0"] > 0
    base = transport.worker.editor(transport.specs["client-0"]).base_weights
    for layer, weight in layers["plain"].items():
        shift = (weight.double() - base[layer].double()).norm()
        assert (layers["dedup"][layer].double() - weight.double()).norm() <= 1e-5 * shift
        assert (layers["twice"][layer].double() - weight.double()).norm() > 1e-3 * shift
    assert logs["twice"][0]["server"]["duplicates_counted_once"] == 0


@pytest.mark.parametrize("num_slots", [1, 2])
def test_collabedit_conflict_policies(world, tmp_path, num_slots):
    """client-1 edits client-0's first fact (same subject and prompt) to another object. One slot:
    keep-both merges both, last-writer refuses client-0's (first in name order), reject refuses both;
    the merged model is then the federation's without the refused requests. Two slots (client-0's in
    slot 0, client-1's in slot 1): last-writer lets the later slot write over it, reject refuses it."""
    records = [request_record(i, s, f"client-{i % 2}") for i, s in enumerate(SUBJECTS)]
    rival = {**records[0], "case_id": "rival", "client": "client-1", "target_new": records[1]["target_new"]}
    assert rival["target_new"] != records[0]["target_new"]
    data = str(write_jsonl(tmp_path / f"rival{num_slots}.jsonl", [*records, rival]))
    seen = {}
    for policy in ("keep-both", "last-writer", "reject"):
        report, transport, specs = collab_run(
            world, tmp_path, f"c{num_slots}-{policy}", data, num_slots=num_slots, collab_conflict=policy
        )
        refused = {
            (c, i.args["slot"], row)
            for c, i, _ in transport.log
            if i.op == "collab" and i.args.get("stats") == 0
            for row in i.args["conflicts"]
        }
        seen[policy] = (report["server"]["conflicts"], refused, transport, specs)
    last_slot = num_slots - 1  # client-1's rival is its last request: the last slot's last row
    rival_row = 4 if num_slots == 1 else 2
    assert seen["keep-both"][:2] == (0, set())
    if num_slots == 1:
        assert seen["last-writer"][:2] == (1, {("client-0", 0, 0)})
        assert seen["reject"][:2] == (1, {("client-0", 0, 0), ("client-1", 0, rival_row)})
        # last-writer's model is a federation's without client-0's request of that fact
        plain = [r for r in records if r["case_id"] != "c0"] + [rival]
        _, transport, specs = collab_run(world, tmp_path, "c1-plain", str(write_jsonl(tmp_path / "p.jsonl", plain)))
        expected = transport.worker.participant(specs["client-1"]).layers
        _, _, writer, writer_specs = seen["last-writer"]
        got = writer.worker.participant(writer_specs["client-1"]).layers
        base = writer.worker.editor(writer_specs["client-0"]).base_weights
        for layer, weight in expected.items():
            shift = (weight.double() - base[layer].double()).norm()
            assert (got[layer].double() - weight.double()).norm() <= 1e-5 * shift
    else:
        assert seen["last-writer"][:2] == (1, set())  # the later slot writes over the earlier edit
        assert seen["reject"][:2] == (1, {("client-1", last_slot, rival_row)})
    participant = seen["reject"][2].worker.participant(seen["reject"][3]["client-1"])
    assert participant.conflicted_ids == [f"client-1/{last_slot}/{rival_row}"]


def test_collabedit_secure_path_sends_no_statistics_and_edits_as_the_plain_one(world, tmp_path):
    layers = {}
    for secure in (False, True):  # DirectTransport's secure_sum adds the clients' arrays (bench/inprocess.py)
        transport_form = "dense" if secure else "lowrank"
        _, transport, specs = collab_run(
            world, tmp_path, f"collab-{secure}", secure_aggregation=secure, collab_transport=transport_form
        )
        layers[secure] = {name: transport.worker.participant(spec).layers for name, spec in specs.items()}
    stats_replies = [r for _, i, r in transport.log if i.op == "collab" and i.args.get("stats") is not None]
    assert stats_replies and all(not r.arrays and r.body["max_abs"] > 0 for r in stats_replies)
    assert not [i for _, i, _ in transport.log if i.op == "collab_masked"]  # the server sees no client's
    assert transport.sums and all(np.abs(s["kk"]).max() <= 2 * 8.0 for _, s in transport.sums)  # each in the clip
    base = transport.worker.editor(specs["client-0"]).base_weights
    for name in layers[True]:
        for layer, weight in layers[False][name].items():
            shift = (weight - base[layer]).norm()
            assert shift > 0
            assert (layers[True][name][layer] - weight).norm() <= 1e-4 * shift


def test_secure_aggregation_needs_collabedit_and_a_transport_that_offers_it(world, tmp_path):
    with pytest.raises(FederationError, match="offered for collabedit only"):
        RunSettings(run="x", strategy="fededit", secure_aggregation=True, collab_transport="dense")
    with pytest.raises(FederationError, match="set collab-transport = 'dense'"):
        RunSettings(run="x", strategy="collabedit", secure_aggregation=True)
    with pytest.raises(FederationError, match="secure aggregation needs a transport"):
        specs = client_specs(world, tmp_path, "nosecagg")
        inner = DirectTransport(specs)
        run(
            world,
            tmp_path,
            "collabedit",
            run="nosecagg",
            specs=specs,
            transport=inner.__call__,
            secure_aggregation=True,
            collab_transport="dense",
        )


def test_editavg_leaves_every_client_with_the_same_averaged_model(world, tmp_path):
    report, transport = run(world, tmp_path, "editavg")
    specs = transport.specs
    layers = [transport.worker.participant(spec).layers for spec in specs.values()]
    editor = transport.worker.editor(specs["client-0"])
    for layer in editor.hp.layers:
        torch.testing.assert_close(layers[0][layer], layers[1][layer])
        assert not torch.equal(layers[0][layer], editor.base_weights[layer])
    updates = [r for _, i, r in transport.log if i.op == "editavg_update" and i.args["slot"] == 0]
    average = next(i for _, i, _ in transport.log if i.op == "editavg_apply" and i.args["slot"] == 0)
    key = f"delta.{editor.hp.layers[0]}"
    np.testing.assert_allclose(average.arrays[key], (updates[0].arrays[key] + updates[1].arrays[key]) / 2, atol=1e-6)
    assert report["strategy"] == "editavg" and [c["n_others"] for c in report["clients"]] == [4, 4]


def test_editavg_factors_averages_memits_two_factors(world, tmp_path):
    report, transport = run(world, tmp_path, "editavg-factors")
    specs = transport.specs
    layers = [transport.worker.participant(spec).layers for spec in specs.values()]
    editor = transport.worker.editor(specs["client-0"])
    layer = editor.hp.layers[-1]
    torch.testing.assert_close(layers[0][layer], layers[1][layer])
    uploads = [r for _, i, r in transport.log if i.op == "editavg_factors" and i.args["slot"] == 0]
    average = next(i for _, i, _ in transport.log if i.op == "editavg_apply" and i.args["slot"] == 0)
    assert len(uploads) == 2 and uploads[0].arrays[f"factor_k.{layer}"].shape == (editor.d_ff, 2)
    mean = {x: sum(u.arrays[f"factor_{x}.{layer}"].astype(np.float64) for u in uploads) / 2 for x in "kr"}
    np.testing.assert_allclose(average.arrays[f"delta.{layer}"], mean["r"] @ mean["k"].T, rtol=1e-5, atol=1e-7)
    assert report["strategy"] == "editavg-factors" and [c["n_others"] for c in report["clients"]] == [4, 4]


@pytest.mark.parametrize("method", MERGES)
def test_collabedits_baselines_merge_the_clients_own_updates(world, tmp_path, method):
    report, transport = run(world, tmp_path, method)
    specs = transport.specs
    editor = transport.worker.editor(specs["client-0"])
    layers = [transport.worker.participant(spec).layers for spec in specs.values()]
    for slot in range(2):
        updates = [
            (r.body["n"], r.arrays) for _, i, r in transport.log if i.op == "editavg_update" and i.args["slot"] == slot
        ]
        sent = next(i for _, i, _ in transport.log if i.op == "editavg_apply" and i.args["slot"] == slot)
        assert len(updates) == 2
        for name, merged in merge_updates(method, updates).items():
            np.testing.assert_allclose(sent.arrays[name], merged, rtol=1e-6, atol=1e-7)
    for layer in editor.hp.layers:
        torch.testing.assert_close(layers[0][layer], layers[1][layer])
        assert not torch.equal(layers[0][layer], editor.base_weights[layer])
    assert report["strategy"] == method and [c["n_others"] for c in report["clients"]] == [4, 4]


def test_local_shares_nothing(world, tmp_path):
    report, transport = run(world, tmp_path, "local")
    assert {i.op for _, i, _ in transport.log} == {"hello", "edit", "evaluate"}
    assert all(not r.arrays for _, i, r in transport.log if i.op == "edit")
    assert [c["n_others"] for c in report["clients"]] == [0, 0]


def test_a_bad_upload_is_rejected_and_the_run_goes_on(world, tmp_path):
    specs = client_specs(world, tmp_path, "bad")
    inner = DirectTransport(specs)

    def corrupting(instructions):
        replies = inner(instructions)
        reply = replies.get("client-1")
        if reply is not None and not reply.error and "edit" in [i.op for i in instructions.values()][:1]:
            z = reply.arrays["z"].copy()
            z[0, 0] = np.nan
            replies["client-1"] = Reply("client-1", reply.body, {**reply.arrays, "z": z})
        return replies

    report, _ = run(
        world, tmp_path, "fededit", run="bad", specs=specs, transport=corrupting, min_clients=1, seal_mkvs=False
    )
    store = MKVStore(tmp_path / "store.sqlite")
    assert {u.client for u in store.uploads("bad")} == {"client-0"}
    failed = {c["client"]: c["failed"] for c in report["clients"]}
    assert failed["client-0"] is None and "NaN" in failed["client-1"]
    assert any(i.op == "rejected" and c == "client-1" for c, i, _ in inner.log)
    assert report["weighted"]["n"] == 4  # the weighted figures cover the remaining client only
    # with a minimum of two clients the same fault stops the run
    with pytest.raises(FederationError, match="fewer than the minimum"):
        run(
            world,
            tmp_path / "min",
            "fededit",
            run="bad2",
            specs=client_specs(world, tmp_path / "min", "bad2"),
            transport=lambda ins: corrupting(ins),
            min_clients=2,
            seal_mkvs=False,
        )


def test_clients_that_disagree_stop_the_run_at_the_handshake(world, tmp_path):
    specs = client_specs(world, tmp_path, "mismatch")
    other = specs["client-1"].model_copy(update={"hparams": {**world["hparams"], "mom2_weight": 99.0}})
    specs["client-1"] = other
    with pytest.raises(FederationError, match="hparams differs"):
        run(world, tmp_path, "fededit", run="mismatch", specs=specs)


def test_a_restarted_server_resumes_the_run(world, tmp_path):
    specs = client_specs(world, tmp_path, "resume")
    transport = DirectTransport(specs)

    def crash_at_slot_one(instructions):
        if any(i.args.get("slot") == 1 for i in instructions.values()):
            raise KeyboardInterrupt("server stops")
        return transport(instructions)

    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path, "fededit", run="resume", specs=specs, transport=crash_at_slot_one)
    assert MKVStore(tmp_path / "store.sqlite").last_slot("resume") == 0
    fresh = DirectTransport(specs)  # a new server process: new worker state, same disks
    report, _ = run(world, tmp_path, "fededit", run="resume", specs=specs, transport=fresh)
    assert not any(i.args.get("slot") == 0 for _, i, _ in fresh.log)  # slot 0 was not redone
    assert MKVStore(tmp_path / "store.sqlite").count("resume") == 8
    assert [c["n"] for c in report["clients"]] == [4, 4]


def test_a_nodes_own_gate_setting_overrides_the_servers(world, tmp_path):
    """alpha 1 keeps nothing, but nodes configured with reedit-gate 'none' keep every set anyway."""
    specs = client_specs(world, tmp_path, "own-gate", reedit_gate="none")
    report, _ = run(world, tmp_path, "fededit", run="own-gate", specs=specs, alpha=1.0)
    assert [c["kept_sets"] for c in report["clients"]] == [2, 2]
    assert [c["applied"] for c in report["clients"]] == [4, 4]


def test_a_client_with_another_federation_secret_is_left_out_at_the_handshake(world, tmp_path):
    records = [request_record(i, f"Place {i}", f"client-{i % 3}") for i in range(6)]
    data = write_jsonl(tmp_path / "three.jsonl", records)
    specs = client_specs(world, tmp_path, "secret", n_clients=3, data=str(data))
    (tmp_path / "other-secret").write_bytes(b"x" * 32)
    specs["client-2"] = specs["client-2"].model_copy(update={"secret_file": str(tmp_path / "other-secret")})
    report, _ = run(world, tmp_path, "fededit", run="secret", specs=specs)
    failed = {c["client"]: c["failed"] for c in report["clients"]}
    assert "federation secret" in failed["client-2"] and failed["client-0"] is None and failed["client-1"] is None
    two = {k: specs[k] for k in ("client-0", "client-2")}
    with pytest.raises(FederationError, match="federation secret .* differs"):
        run(world, tmp_path, "fededit", run="secret2", specs=two)
