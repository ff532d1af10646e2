"""The reproduction benchmark on a tiny model: z shared through the base-model cache, every method
side by side, CollabEdit = centralised MEMIT, the overlap workload's reuse, the JSON schema,
resuming from the cache, and the outputs (Markdown, PNG)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import experiments, reproduce
from bench.zcache import BaseZCache
from fededit_core.memit.editor import make_editor
from fededit_core.memit.keys import hidden_at_subject
from fededit_core.memit.target import optimise_z
from strategies.collabedit import CONFLICT_POLICIES
from tests.federation_kit import isolated_tiny_world

TINY = reproduce.Preset(
    "tiny",
    {"counterfact": 8},
    n_clients=2,
    n_slots=2,
    ablation_sizes=(4, 8),
    curve_edits=8,
    client_counts=(2,),
    slot_counts=(1, 2),
    overlap_edits=6,
    overlap_clients=2,
    overlap_slots=2,
    merging_edits=(4, 8),
    sequential_edits=8,
    sequential_long_edits=6,
    challenge_grid=(2, 2, 2),
    conflict_share=0.25,
    forgetting_grid=(2, 2, 1),
    datasets=("counterfact",),
    fluency=False,
    alpha=0.0,
    others_limit=0,
)
SECTIONS = tuple(s for s in reproduce.SECTIONS if s not in ("clients", "iid"))  # those two: the slots' code


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with isolated_tiny_world(tmp_path_factory, "bench") as world:
        yield world


@pytest.fixture(scope="module")
def bench_run(world):
    out, cache = world["root"] / "out", world["root"] / "bench-cache"
    summary = reproduce.run(
        TINY, out, cache, {"counterfact": world["data"]}, SECTIONS, model=world["model"], hparams=world["hparams"]
    )
    return {"summary": summary["counterfact"], "out": out, "cache": cache}


def test_base_z_cache_optimises_once_on_the_base_model_and_reads_h_on_the_current_one(world, tmp_path):
    editor = make_editor(world["model"], **world["hparams"])
    requests = experiments.select_requests(world["data"], 4, seed=0)
    expected = optimise_z(editor.model, editor.tok, requests, editor.hp, editor.templates, progress=False)
    editor.edit(requests[:2], progress=False)  # the model is now edited: z must still come from the base
    cache = BaseZCache(tmp_path / "z")
    editor.z_cache = cache
    first = editor.compute_z(requests, progress=False)
    assert cache.optimised == 4 and cache.hits == 0
    torch.testing.assert_close(first.z, expected.z.float(), rtol=1e-4, atol=1e-4)
    current_h = hidden_at_subject(editor.model, editor.tok, requests, editor.hp.z_layer)
    torch.testing.assert_close(first.h, current_h.float())
    assert not torch.allclose(first.h, expected.h.float(), atol=1e-4)  # the edit moved h_L
    again = editor.compute_z(requests, progress=False)
    assert cache.optimised == 4 and cache.hits == 4
    torch.testing.assert_close(again.z, first.z)
    changed = requests[0].model_copy(update={"target_new": "Berlin"})
    assert cache.key(editor, changed) != cache.key(editor, requests[0])
    editor.hp = editor.hp.model_copy(update={"editor": "alphaedit", "nullspace_threshold": 0.5})
    assert BaseZCache(tmp_path / "z2").key(editor, requests[0]) == cache.key(editor, requests[0])  # MEMIT's z


def test_every_method_reported_with_retention_against_centralised(bench_run):
    js = bench_run["summary"]
    assert (js["dataset"], js["n_edits"], js["n_clients"], js["n_slots"]) == ("counterfact", 8, 2, 2)
    methods = js["methods"]
    for m in ("unedited", "centralised", "local", "editavg", "sa", "ta", "ties", "fededit", "fededit-noreedit"):
        assert methods[m]["score"] is not None, m
    central = methods["centralised"]["score"]
    for m in ("local", "editavg", "fededit", "fededit-noreedit", "collabedit"):
        assert methods[m]["retention"] == pytest.approx(methods[m]["score"] / central)
    # CollabEdit's merged statistics are one global MEMIT edit per slot: the centralised schedule
    assert methods["collabedit"]["retention"] == pytest.approx(1.0, abs=1e-6)
    # in thin factors (the default) as in dense statistics (run beside it), with fewer bytes
    assert js["config"]["collab_transport"] == "lowrank"
    assert methods["collabedit-dense"]["score"] == pytest.approx(methods["collabedit"]["score"], abs=1e-6)
    collab = methods["collabedit"]
    assert collab["dense_bytes_up_per_client"] == methods["collabedit-dense"]["bytes_up_per_client"]
    assert collab["bytes_up_per_client"] < collab["dense_bytes_up_per_client"] / 4
    assert methods["local"]["bytes_up_per_client"] < methods["fededit"]["bytes_up_per_client"]
    assert methods["fededit-noreedit"]["kept_sets"] == methods["fededit-noreedit"]["received_sets"] > 0


def test_methods_share_z_computed_once_per_request(bench_run):
    stored = list((bench_run["cache"] / "z").rglob("*.pt"))
    conflicts = round(TINY.conflict_share * 8)  # the conflict workload's copies ask for other objects
    assert len(stored) == 8 + conflicts  # distinct requests, whatever the number of methods and sections


def test_overlap_workload_reuses_z_of_repeated_requests(bench_run):
    ov = bench_run["summary"]["overlap"]
    with_reuse, without = ov["reuse"], ov["no_reuse"]
    assert with_reuse["reused"] > 0 and without["reused"] == 0
    assert with_reuse["optimised"] + with_reuse["reused"] == without["optimised"]
    assert ov["reused_share"] == pytest.approx(with_reuse["reused"] / without["optimised"])


def test_ablation_and_slot_curves_have_every_point(bench_run):
    js = bench_run["summary"]
    assert sorted((r["n_edits"], r["method"]) for r in js["ablation"]) == [
        (4, "fededit"),
        (4, "fededit-noreedit"),
        (8, "fededit"),
        (8, "fededit-noreedit"),
    ]
    assert sorted({r["n_slots"] for r in js["slots"]}) == [1, 2]
    assert all(r["retention"] == pytest.approx(r["score"] / r["centralised_score"]) for r in js["slots"])


def test_merging_figure_has_every_baseline_at_every_size_and_collabedit_is_the_global_edit(bench_run):
    rows = bench_run["summary"]["merging"]
    assert sorted((r["n_edits"], r["method"]) for r in rows) == [
        (n, m) for n in (4, 8) for m in sorted(("collabedit", "sa", "ta", "ties"))
    ]
    for r in rows:
        assert r["score"] is not None and r["centralised_score"] is not None
        if r["method"] == "collabedit":  # one round: one global MEMIT edit of the union
            assert r["retention"] == pytest.approx(1.0, abs=1e-6)
    assert (bench_run["out"] / "merging_counterfact.png").is_file()
    from bench.tables import curve_table

    table = curve_table(rows, "n_edits", "counterfact")
    assert "0/0" not in table and table.count("| - | ") >= len(rows)  # no MKV sets in a merge: "-", not 0/0


def test_outputs_written_and_a_rerun_reads_everything_from_the_cache(bench_run, world, monkeypatch):
    out = bench_run["out"]
    text = (out / "README.md").read_text()
    assert "Table 1: CounterFact" in text and "Table 3" in text and "Overlap workload" in text
    pytest.importorskip("matplotlib")
    for name in ("slots_counterfact.png", "bytes_per_edit.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = json.loads((out / "counterfact.json").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("a cached experiment ran again")

    monkeypatch.setattr(experiments.Runner, "_federated", refuse)
    monkeypatch.setattr(experiments.Runner, "_centralised", refuse)
    reproduce.run(
        TINY,
        out,
        bench_run["cache"],
        {"counterfact": world["data"]},
        SECTIONS,
        model=world["model"],
        hparams=world["hparams"],
    )
    after = json.loads((out / "counterfact.json").read_text())
    assert after["methods"] == before["methods"] and after["overlap"] == before["overlap"]


def test_gate_alpha_reruns_the_main_fededit_run_at_each_alpha_against_the_cached_centralised(bench_run, world):
    from bench import gate_alpha

    runner = reproduce.make_runner(
        bench_run["cache"], {"counterfact": world["data"]}, world["model"], "cpu", "fp32", world["hparams"]
    )
    rows = gate_alpha.sweep(TINY, runner, "counterfact", "memit", [0.0, 1.0])
    every, none = rows  # cos > 1 holds for no pair
    assert every["alpha"] == 0.0 and every["kept_sets"] > 0 and every["applied"] > 0
    assert none["alpha"] == 1.0 and none["kept_sets"] == 0 and none["applied"] == 0
    central = json.loads((bench_run["out"] / "counterfact.json").read_text())["methods"]["centralised"]
    assert none["retention"] == pytest.approx(none["score"] / central["score"])


def test_zsre_federated_runs_are_scored_with_zsre_metrics_like_centralised(world, tmp_path):
    """The workers read a plain-schema copy of the workload; zsRE requests must keep their
    token-accuracy evaluation (EA/PA/NA) there, as in the centralised run, not CounterFact's."""
    from fededit_core.client.worker import EditWorker
    from tests.federation_kit import SUBJECTS, WORDS

    rows = [
        {
            "subject": s,
            "src": f"Where is the {s}?",
            "alt": WORDS[i % 4].strip(),
            "answers": [WORDS[(i + 1) % 4].strip()],
            "rephrase": f"In which city is the {s}?",
            "loc": "nq question: where is the museum",
            "loc_ans": "Rome",
        }
        for i, s in enumerate(SUBJECTS)
    ]
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(rows))
    runner = experiments.Runner(
        tmp_path / "cache",
        {"zsre": data},
        world["model"],
        world["hparams"],
        EditWorker(z_cache=BaseZCache(tmp_path / "z")),
    )
    preset = reproduce.Preset(
        "t", {"zsre": 8}, 2, 1, (8,), 8, (2,), (1,), 4, 2, 1, others_limit=0, datasets=("zsre",), alpha=0.0
    )
    central = runner.run(reproduce.base_exp(preset, "zsre", "centralised", partition="iid"))
    local = runner.run(reproduce.base_exp(preset, "zsre", "local", partition="iid"))
    assert local["report"]["kind"] == "zsre"
    assert set(central["weighted"]) == set(local["report"]["weighted"]) >= {"ea", "pa", "na", "score"}


def test_every_section_the_benchmark_plans_can_be_asked_for_by_name():
    assert set(reproduce.SECTIONS) == {
        s for s in reproduce.SECTIONS if reproduce.plan(reproduce.PRESETS["quick"], s, "counterfact")
    }


def test_bad_arguments_are_named(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--sections", "main,tables"])
    assert "unknown sections ['tables']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.main(["--quick", "--counterfact", "/nonexistent/cf.json"])
    assert "/nonexistent/cf.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.main(["--datasets", "zsre,wiki"])
    assert "unknown data sets ['wiki']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # only the chosen data set's file is required
        reproduce.main(
            ["--quick", "--datasets", "zsre", "--counterfact", "/nonexistent/cf.json", "--zsre", "/no/zs.json"]
        )
    err = capsys.readouterr().err
    assert "/no/zs.json not found" in err and "cf.json" not in err
    from bench import gate_alpha

    for bad, said in (("0.2,x", "comma-separated numbers"), ("1.5", "in [0, 1]")):
        with pytest.raises(SystemExit):
            gate_alpha.main(["--alphas", bad])
        assert said in capsys.readouterr().err


def test_each_data_sets_tables_use_its_own_metric_names():
    from bench.tables import markdown

    m = {"es": 0.9, "ps": 0.8, "ns": 0.7, "score": 0.8}
    all_js = {
        "counterfact": {
            "dataset": "counterfact",
            "methods": {},
            "iid": {"centralised": m, "fededit": {**m, "retention": 1.0}},
        },
        "zsre": {"dataset": "zsre", "methods": {}},
    }
    text = markdown(TINY, all_js, "tiny")
    iid = text[text.index("## IID split, counterfact") :]
    header = iid.splitlines()[2]
    assert "ES" in header and "EA" not in header, header
    assert "0.900" in iid


def test_selectivity_splits_offered_and_kept_mkvs_by_relation_group():
    """Two clients, two slots: each is offered one MKV of a relation it edits and one it does not."""
    from bench.selectivity import selectivity
    from fededit_core.data.requests import EditRequest

    def req(subject, prompt, true, new):
        return EditRequest(case_id=subject, subject=subject, prompt=prompt, target_true=true, target_new=new)

    parts = {
        "client-0": [req("A", "{} lives in", "Paris", "Rome"), req("B", "{} speaks", "French", "German")],
        "client-1": [req("C", "{} lives in", "Paris", "Rome"), req("D", "{} plays", "piano", "guitar")],
    }
    own = {"es": 1.0, "ps": 1.0, "ns": 1.0}
    report = {
        "clients": [
            {"client": "client-0", "failed": False, "n": 2, "own": own, "reedited_ids": ["client-1/0/0"],
             "others_ids": ["client-1/0/0"], "others_per_request": [{"es": 1.0, "ps": 1.0, "ns": 0.5}]},
            {"client": "client-1", "failed": False, "n": 2, "own": own, "reedited_ids": ["client-0/1/0"],
             "others_ids": ["client-0/1/0"], "others_per_request": [{"es": 0.0, "ps": 0.5, "ns": 1.0}]},
        ]
    }  # fmt: skip
    half = {"es": 0.5, "ps": 0.5, "ns": 1.0}
    central = {
        "clients": {"client-0": half, "client-1": half},
        "per_request": {"client-0": [own, {"es": 0.5, "ps": 0.5, "ns": 0.5}], "client-1": [own, own]},
    }
    found = selectivity("counterfact", parts, 2, report, central)
    assert found["gate"] == {"related_offered": 2, "related_kept": 1, "unrelated_offered": 2, "unrelated_kept": 1}
    assert found["others_related"]["n"] == 1 and found["others_related"]["score"] == pytest.approx(0.75)
    assert found["others_unrelated"]["n"] == 1 and found["others_unrelated"]["score"] == 0.0
    union = found["union"]
    first = union["by_client"][0]  # own 2 at 1.0 and one re-edited at (1, 1, 0.5): NS = 2.5 / 3
    assert first["n"] == 3 and first["score"] == pytest.approx(3 / (1 + 1 + 1.2))
    # centralised on the same requests: own (0.5, 0.5, 1.0) twice and client-1's first request (1, 1, 1)
    assert first["centralised_score"] == pytest.approx(3 / (1.5 + 1.5 + 1))
    assert union["n"] == 6 and union["retention"] == pytest.approx(union["score"] / union["centralised_score"])
    zsre = selectivity("zsre", parts, 2, report, None)  # zsRE: a client is one cluster, so nothing is related
    assert zsre["gate"]["related_offered"] == 0 and zsre["gate"]["unrelated_kept"] == 2


def test_selectivity_of_the_benchmark_runs(bench_run):
    methods = bench_run["summary"]["methods"]
    every, gated = methods["fededit-noreedit"], methods["fededit"]
    g = every["gate"]
    assert g["rule"] == "none" and gated["gate"]["rule"] == reproduce.DEFAULT_GATE
    assert methods["collabedit"]["gate"]["rule"] is None  # merged, not gated: absorbs everything
    assert g["related_kept"] == g["related_offered"] and g["unrelated_kept"] == g["unrelated_offered"]
    assert g["related_offered"] + g["unrelated_offered"] == every["applied"] > 0
    f = gated["gate"]
    assert f["related_kept"] + f["unrelated_kept"] == gated["applied"]
    assert (f["related_offered"], f["unrelated_offered"]) == (g["related_offered"], g["unrelated_offered"])
    assert every["others_related"]["n"] + every["others_unrelated"]["n"] == every["others"]["n"]
    union = every["union"]
    assert union["n"] == 8 + every["applied"]
    assert union["retention"] == pytest.approx(union["score"] / union["centralised_score"])
    assert "What the re-edit condition kept" in (bench_run["out"] / "README.md").read_text()


def test_collab_overlap_counts_each_copy_once_only_with_dedup(bench_run):
    ov = bench_run["summary"]["collab_overlap"]
    copies = ov["dedup"]["server"]["duplicates_counted_once"]
    assert copies == round(TINY.collab_overlap_share * 2 * 2) * 2  # per slot, over both slots
    assert ov["no_dedup"]["server"]["duplicates_counted_once"] == 0
    for run in ov.values():
        assert run["once"]["n"] + run["repeated"]["n"] == 8 - copies  # each copy took another request's place
        assert run["repeated"]["n"] == copies and run["repeated"]["score"] is not None
        assert len(run["server"]["residual_norm_by_slot"]) == 2


def test_conflict_policies_find_the_conflicts_and_say_which_object_each_answers(bench_run):
    conflict = bench_run["summary"]["conflict"]
    assert sorted(conflict) == sorted(CONFLICT_POLICIES)
    n = round(TINY.conflict_share * 8)
    for policy, run in conflict.items():
        answers = run["answers"]
        assert answers["same slot"]["n"] + answers["next slot"]["n"] == n
        for a in answers.values():
            if a["n"]:
                assert a["first"] + a["second"] + a["true"] == pytest.approx(1.0)
        # keep-both does not ask for fact tags; the other two see every conflict
        assert run["server"]["conflicts"] == (0 if policy == "keep-both" else n), policy
    md = (bench_run["out"] / "README.md").read_text()
    assert "conflict workload" in md and "overlap workload" in md


def test_forgetting_runs_every_round_for_each_beta_and_the_first_round_has_no_memory(bench_run):
    rows = {(r["beta1"], r["rounds"]): r for r in bench_run["summary"]["forgetting"]}
    assert sorted(rows) == [(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)]
    assert all(r["n"] == 2 and r["score"] is not None for r in rows.values())  # the two clients' old edits
    assert rows[(0.0, 1)]["score"] == rows[(1.0, 1)]["score"]  # one round: no earlier keys to remember


def test_sequential_curves_follow_the_first_slots_edits_after_every_slot(bench_run):
    rows = bench_run["summary"]["sequential"]
    assert sorted((r["method"], r["slot"]) for r in rows) == [
        (m, t) for m in ("centralised", "fededit") for t in (1, 2)
    ]
    assert all(r["n"] == 4 and r["score"] is not None for r in rows)  # slot 1: 2 clients x 2 requests
    assert "first slot's edits after every slot" in (bench_run["out"] / "README.md").read_text()


def test_long_sequential_workload_follows_its_own_first_slot(bench_run):
    rows = bench_run["summary"]["sequential_long"]
    assert [(r["method"], r["slot"]) for r in rows] == [(m, t) for m in TINY.sequential_long_methods for t in (1, 2)]
    assert all(r["n"] == 4 and r["score"] is not None for r in rows)  # slot 1: 2 clients x 2 of their 3
    readme = (bench_run["out"] / "README.md").read_text()
    assert "(6 edits in 2 slots)" in readme and "sequential_long_counterfact.png" in readme


def test_another_editor_writes_its_own_outputs_beside_memits(world, bench_run, tmp_path):
    out = tmp_path / "out"
    hparams = {**world["hparams"], "editor": "alphaedit", "nullspace_threshold": 1.0}
    summary = reproduce.run(
        TINY, out, bench_run["cache"], {"counterfact": world["data"]}, ("main",), model=world["model"], hparams=hparams
    )
    js = json.loads((out / "counterfact-alphaedit.json").read_text())
    assert js == json.loads(json.dumps(summary["counterfact"], default=str))
    assert js["config"]["editor"] == "alphaedit" and "README-alphaedit.md" in {p.name for p in out.iterdir()}
    federated = set(js["methods"]) - {"unedited", "centralised", "centralised_one_batch"}
    assert federated == set(TINY.editor_methods) and "editavg-factors" not in federated  # not AlphaEdit's split
    assert js["methods"]["collabedit"]["retention"] == pytest.approx(1.0, abs=0.02)
    assert not (out / "counterfact.json").exists()


def test_editors_compared_from_each_editors_outputs(tmp_path, capsys):
    from bench import compare_editors

    def main_table(centralised, fededit):
        return {
            "centralised": {"score": centralised},
            "fededit": {"score": fededit, "retention": fededit / centralised},
        }

    def curve(scores):
        return [{"method": "centralised", "slot": t + 1, "score": s} for t, s in enumerate(scores)]

    (tmp_path / "counterfact.json").write_text(
        json.dumps({"methods": main_table(0.8, 0.78), "sequential": curve([0.9, 0.7])})
    )
    (tmp_path / "counterfact-alphaedit.json").write_text(
        json.dumps(
            {"methods": main_table(0.5, 0.49), "sequential": curve([0.9, 0.85]), "sequential_long": curve([0.9, 0.6])}
        )
    )
    assert compare_editors.main(["--out", str(tmp_path)]) == 0
    text = (tmp_path / "editors.md").read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    assert "| memit | counterfact | 0.800 | - | - | - | 0.780 (97.5%) | - |" in text
    assert "| alphaedit | counterfact | 0.500 | - | - | - | 0.490 (98.0%) | - |" in text
    assert "| 2 | 0.850 | 0.700 |" in text  # after slot 2: alphaedit's curve, then memit's
    long = text.split("the `sequential_long` section")[1]
    assert "| 2 | 0.600 |" in long and "memit" not in long  # only AlphaEdit ran the long workload
    with pytest.raises(SystemExit):
        compare_editors.main(["--out", str(tmp_path / "empty")])
