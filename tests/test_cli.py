"""The ``fededit`` command on tiny saved models: eval, edit, and the errors bad input gets.

Most tests call ``fededit_core.cli.main`` in-process (stdout/stderr via capsys); two run the real
console script in a subprocess. The model is a tiny random Llama (``tests/tiny.py``) with one token
per target word and a scaled LM head, saved with ``save_pretrained`` (model + tokenizer), so that an
edit of layers 1 and 2 with a small lambda writes its facts within a few z steps.
"""

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fededit_core.cli import main
from fededit_core.data.loaders import dataset_kind, load_requests
from fededit_core.eval.metrics import evaluate
from fededit_core.model.loading import load_model
from tests.tiny import tiny_model_with_words, tiny_tokenizer

WORDS = (" Rome", " English", " Berlin", " Tokyo", " Madrid")
EDITED = ("model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight")
WORD_LIST = (
    "the of and to in is was for on that with as by at from his her city river king music year "
    "team game house night light stone water garden"
).split()

PLAIN = [
    {
        "case_id": "paris",
        "subject": "Paris",
        "prompt": "The capital is {}",
        "target_new": "Rome",
        "target_true": "Berlin",
        "paraphrase_prompts": ["Its capital: Paris"],
        "neighborhood_prompts": ["The capital is Lyon"],
    },
    {
        "case_id": "darrieux",
        "subject": "Danielle Darrieux",
        "prompt": "She speaks like {}",
        "target_new": "English",
        "target_true": "Tokyo",
        "paraphrase_prompts": ["Talks like Danielle Darrieux"],
        "neighborhood_prompts": ["She speaks like Bob"],
    },
    {
        "case_id": "toyota",
        "subject": "Toyota",
        "prompt": "Cars by {}",
        "target_new": "Berlin",
        "target_true": "Madrid",
        "paraphrase_prompts": ["Made by Toyota"],
        "neighborhood_prompts": ["Cars by Ford"],
    },
]
COUNTERFACT_SIMPLE = [
    {
        "case_id": 1,
        "prompt": "The capital is Paris",
        "subject": "Paris",
        "target_new": "Rome",
        "ground_truth": "Berlin",
        "rephrase_prompt": "Its capital: Paris",
        "locality_prompt": "The capital is Lyon",
        "locality_ground_truth": "Madrid",
    },
    {
        "case_id": 2,
        "prompt": "Cars by Toyota",
        "subject": "Toyota",
        "target_new": "Tokyo",
        "ground_truth": "English",
        "rephrase_prompt": "Made by Toyota",
        "locality_prompt": "Cars by Ford",
        "locality_ground_truth": "Berlin",
    },
    {
        "case_id": 3,
        "prompt": "She speaks like Danielle Darrieux",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "Madrid",
        "rephrase_prompt": "Talks like Danielle Darrieux",
        "locality_prompt": "He speaks like Bob",
        "locality_ground_truth": "Rome",
    },
]
ZSRE = [
    {
        "subject": "Ramalinaceae",
        "src": "Which family does Ramalinaceae belong to?",
        "alt": "Rome",
        "answers": ["Berlin"],
        "rephrase": "What family are Ramalinaceae?",
        "loc": "nq question: skiing",
        "loc_ans": "Tokyo",
    },
    {
        "subject": "Toyota",
        "src": "Who founded Toyota?",
        "alt": "Madrid",
        "answers": ["English"],
        "rephrase": "Toyota was founded by",
        "loc": "nq question: rivers",
        "loc_ans": "Rome kings",
    },
]


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


def _state(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(stderr: str) -> str:
    """The error: the last line of stderr, which must be the only ``fededit: error:`` line."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if "fededit: error:" in line]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], f"the error message is not one line:\n{stderr}"
    assert errors[0].startswith("fededit: error: ")
    assert "Traceback" not in stderr
    return errors[0]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _private_cache_one_thread(tmp_path, monkeypatch):
    """A fresh cache per test, and one torch thread: the CLI would otherwise take every core, and on
    a loaded machine OpenMP threads spin-waiting for a core make these tiny runs 10-30x slower."""
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # configure_threads() leaves the count alone then
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny Llama (model + tokenizer), a covariance corpus and the data files."""
    root = tmp_path_factory.mktemp("cli")
    model, tok = tiny_model_with_words("llama", WORDS, head_scale=10.0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text(
        "\n".join(" ".join(rng.choice(WORD_LIST) for _ in range(12)).capitalize() + "." for _ in range(60)),
        encoding="utf-8",
    )
    return {
        "root": root,
        "model": root / "model",
        "corpus": corpus,
        "plain": _write_jsonl(root / "edits.jsonl", PLAIN),
        "counterfact": _write_json(root / "cf.json", COUNTERFACT_SIMPLE),  # one JSON list
        "zsre": _write_jsonl(root / "zsre.jsonl", ZSRE),
    }


def _edit_argv(files, out: Path, *extra: str, requests: Path | None = None, model: Path | None = None) -> list[str]:
    return [
        "edit",
        "--model",
        str(model or files["model"]),
        "--requests",
        str(requests or files["plain"]),
        "--out",
        str(out),
        "--mom2-weight",
        "10",
        "--cov-source",
        str(files["corpus"]),
        "--cov-samples",
        "8",
        *extra,
    ]


# --- eval -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, columns", [("counterfact", ["es", "ps", "ns"]), ("zsre", ["ea", "pa", "na"])])
def test_eval_writes_the_metrics(files, tmp_path, capsys, kind, columns):
    data, out = files[kind], tmp_path / "metrics" / "eval.json"  # the parent folder is created
    assert main(["eval", "--model", str(files["model"]), "--data", str(data), "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert str(files["model"]) in stdout and all(c in stdout for c in columns)

    metrics = json.loads(out.read_text())
    n_records = len(COUNTERFACT_SIMPLE if kind == "counterfact" else ZSRE)
    assert metrics["n"] == n_records and metrics["kind"] == kind
    assert metrics["model"] == str(files["model"]) and metrics["data"] == str(data)
    for key in [*columns, "score"]:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert "per_request" not in metrics

    # the numbers are those of the library on the same model and records
    model, tok = load_model(str(files["model"]))
    expected = evaluate(model, tok, load_requests(data), dataset_kind(data))
    for key in ["n", *columns, "score"]:
        assert metrics[key] == pytest.approx(expected[key]), key

    # --n 1: the first record only
    one = tmp_path / "one.json"
    assert main(["eval", "--model", str(files["model"]), "--data", str(data), "--n", "1", "--json", str(one)]) == 0
    metrics = json.loads(one.read_text())
    assert metrics["n"] == 1
    expected = evaluate(model, tok, load_requests(data, n=1), dataset_kind(data))
    for key in [*columns, "score"]:
        assert metrics[key] == pytest.approx(expected[key]), key
        assert 0.0 <= metrics[key] <= 1.0, key


def test_eval_json_is_strict_when_a_rate_is_undefined(files, tmp_path, capsys):
    """Records without paraphrases leave PS undefined (NaN): the JSON says null, not NaN."""
    data = _write_jsonl(
        tmp_path / "bare.jsonl",
        [{"subject": "Paris", "prompt": "The capital is {}", "target_new": "Rome", "target_true": "Berlin"}],
    )
    out = tmp_path / "bare.json"
    assert main(["eval", "--model", str(files["model"]), "--data", str(data), "--json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text
    metrics = json.loads(text)
    assert metrics["n"] == 1 and metrics["ps"] is None and metrics["ns"] is None
    assert metrics["es"] in (0.0, 1.0) and metrics["score"] == metrics["es"]


# --- edit -----------------------------------------------------------------------------------------


def test_edit_saves_the_edited_model_and_a_summary(files, tmp_path, capsys):
    out = tmp_path / "edited"
    assert main(_edit_argv(files, out, "--n", "2", "--layers", "1,2")) == 0
    captured = capsys.readouterr()
    assert "editing 2 request(s)" in captured.err and "layers [1, 2]" in captured.err
    lines = captured.out.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert header.split() == ["model", "n", "es", "ps", "ns", "score"]
    assert any(line.startswith("unedited ") for line in lines) and any(line.startswith("edited ") for line in lines)
    assert "The capital is Paris" in captured.out and "She speaks like Danielle Darrieux" in captured.out
    assert "Cars by Toyota" not in captured.out  # --n 2: the third request is not edited
    assert f"saved the edited model to {out}" in captured.out

    # the folder reloads, and only the edited layers' down projections moved
    base = _state(AutoModelForCausalLM.from_pretrained(files["model"], dtype=torch.float32))
    edited = _state(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert set(edited) == set(base)
    for name, tensor in edited.items():
        if name in EDITED:
            assert not torch.equal(tensor, base[name]), f"{name} was not edited"
        else:
            assert torch.equal(tensor, base[name]), f"{name} changed although not edited"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(" Rome", add_special_tokens=False)["input_ids"] == [259]  # the added word tokens survive

    summary = json.loads((out / "fededit_edit.json").read_text())
    assert summary["n"] == 2 and summary["requests"] == str(files["plain"])
    hp = summary["hparams"]
    assert hp["layers"] == [1, 2] and hp["mom2_weight"] == 10.0
    assert hp["cov_source"] == str(files["corpus"]) and hp["cov_samples"] == 8
    groups = summary["templates"]["groups"]
    assert groups[0] == ["{}"] and all("{}" in t for g in groups for t in g)
    for when in ("before", "after"):
        assert set(summary[when]) == {"n", "es", "ps", "ns", "score"}
        assert summary[when]["n"] == 2
        assert all(0.0 <= summary[when][k] <= 1.0 for k in ("es", "ps", "ns", "score"))
    assert summary["after"]["es"] == 1.0 and summary["after"]["es"] > summary["before"]["es"]
    assert set(summary["seconds"]) == {"covariance", "z", "layers"}

    # evaluating the saved folder gives the "after" numbers
    metrics = tmp_path / "after.json"
    assert main(["eval", "--model", str(out), "--data", str(files["plain"]), "--n", "2", "--json", str(metrics)]) == 0
    reloaded = json.loads(metrics.read_text())
    for key in ("n", "es", "ps", "ns", "score"):
        assert reloaded[key] == pytest.approx(summary["after"][key]), key


def test_edit_takes_context_templates_as_input(files, tmp_path):
    """Parties can share templates: the summary's templates feed the next edit unchanged."""
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"groups": [["{}"], ["Hello there. {}", "Well. {}"]], "seed": None}))
    out = tmp_path / "edited"
    assert main(_edit_argv(files, out, "--n", "1", "--layers", "1,2", "--templates", str(templates))) == 0
    summary = json.loads((out / "fededit_edit.json").read_text())
    assert summary["templates"]["groups"] == [["{}"], ["Hello there. {}", "Well. {}"]]
    templates.write_text(json.dumps({"groups": [["no slot here"]]}))
    assert main(_edit_argv(files, tmp_path / "other", "--n", "1", "--templates", str(templates))) == 2


# --- bad input ------------------------------------------------------------------------------------


def _bad_requests(tmp_path: Path, case: str) -> Path:
    if case == "malformed-json":
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(PLAIN[0]) + "\n" + '{"subject": "Paris", "prompt": \n', encoding="utf-8")
        return path
    if case == "subject-absent":
        return _write_jsonl(tmp_path / "bad.jsonl", [{**COUNTERFACT_SIMPLE[0], "subject": "Lyon"}])
    if case == "empty-target":
        return _write_jsonl(tmp_path / "bad.jsonl", [PLAIN[0], {**PLAIN[1], "target_new": "  "}])
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("malformed-json", r"bad\.jsonl: invalid JSON on line 2"),
        ("subject-absent", r"bad\.jsonl: record 0: subject 'Lyon' is absent from its prompt"),
        ("empty-target", r"bad\.jsonl: record 1: empty target: field 'target_new' is empty"),
    ],
)
def test_bad_requests_file(files, tmp_path, capsys, case, expected):
    out = tmp_path / "out"
    assert main(_edit_argv(files, out, requests=_bad_requests(tmp_path, case))) == 2
    captured = capsys.readouterr()
    assert re.search(expected, _error_line(captured.err)), captured.err
    assert captured.out == "" and not out.exists()
    # eval reads the same files the same way
    assert main(["eval", "--model", str(files["model"]), "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert re.search(expected, _error_line(capsys.readouterr().err))


def _bad_model(root: Path, case: str) -> Path:
    folder = root / case
    folder.mkdir()
    if case == "empty-folder":
        (folder / "notes.txt").write_text("not a model")
    elif case == "broken-config":
        (folder / "config.json").write_text("{not json")
    elif case == "no-weights":
        model, tok = tiny_model_with_words("llama", WORDS)
        model.config.save_pretrained(folder)
        tok.save_pretrained(folder)
    elif case == "bert":  # a causal LM of an architecture fededit cannot edit
        from transformers import BertConfig, BertLMHeadModel

        tok = tiny_tokenizer()
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            is_decoder=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            BertLMHeadModel(config).save_pretrained(folder)
        tok.save_pretrained(folder)
    elif case == "vit":  # not a causal LM at all
        from transformers import ViTConfig

        config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        config.save_pretrained(folder)
    else:
        raise AssertionError(case)
    return folder


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty-folder", "holds no config.json (not a saved model)"),
        ("broken-config", "config.json' is not a valid JSON file"),
        ("no-weights", "could not load model"),
        ("bert", "unsupported architecture 'bert': fededit can edit gpt2, gpt_neox, gptj, llama"),
        ("vit", "ViTConfig"),
    ],
)
def test_bad_model_folder(files, tmp_path, capsys, case, expected):
    folder = _bad_model(tmp_path, case)
    out = tmp_path / "out"
    assert main(_edit_argv(files, out, model=folder)) == 2
    line = _error_line(capsys.readouterr().err)
    assert expected in line and len(line) <= 520, line
    assert not out.exists()
    assert main(["eval", "--model", str(folder), "--data", str(files["plain"])]) == 2
    assert expected in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--layers", "1,4"], "layers [1, 4] exceed the model's 4 layers"),
        (["--layers", "7"], "layers [7] exceed the model's 4 layers"),
        (["--layers", "2,1"], "invalid MEMITHyperParams: layers must be distinct, ascending and >= 0, got [2, 1]"),
        (["--mom2-weight", "0"], "invalid MEMITHyperParams: mom2_weight: Input should be greater than 0"),
        (["--cov-source", "/nonexistent/corpus.txt"], "covariance corpus '/nonexistent/corpus.txt': no such file"),
    ],
)
def test_bad_settings(files, tmp_path, capsys, extra, expected):
    out = tmp_path / "out"
    assert main(_edit_argv(files, out, *extra)) == 2
    assert expected in _error_line(capsys.readouterr().err)
    assert not out.exists()


def test_unparsable_layers_are_a_usage_error(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_edit_argv(files, tmp_path / "out", "--layers", "1,x"))
    assert exc.value.code == 2
    assert "--layers takes comma-separated integers, got '1,x'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failed_edit_leaves_an_existing_out_folder_alone(files, tmp_path, capsys):
    """The edit fails once the model is loaded and editing has begun (no covariance corpus):
    the --out folder keeps its earlier contents."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "fededit_edit.json").write_text('{"earlier": true}')
    (out / "notes.txt").write_text("keep me")
    before = _listing(out)
    assert main(_edit_argv(files, out, "--layers", "1,2", "--cov-source", str(tmp_path / "missing.txt"))) == 2
    captured = capsys.readouterr()
    assert "editing 3 request(s)" in captured.err  # it did start
    assert "no such file" in _error_line(captured.err)
    assert _listing(out) == before


def test_out_that_is_a_file_is_refused_before_editing(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("a file, not a folder")
    assert main(_edit_argv(files, out)) == 2
    captured = capsys.readouterr()
    assert "exists and is not a folder" in _error_line(captured.err) and str(out) in captured.err
    assert "editing" not in captured.err  # refused up front, not after the edit
    assert out.read_text() == "a file, not a folder"


# --- the console script ---------------------------------------------------------------------------


def _script_env(tmp_path: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        FEDEDIT_CACHE=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.pop("PYTHONPATH", None)
    return env


def _script() -> str:
    script = Path(sys.executable).parent / "fededit"
    if not script.is_file():
        pytest.skip("the fededit console script is not installed in this environment")
    return str(script)


def test_console_script_eval(files, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [
            _script(),
            "eval",
            "--model",
            str(files["model"]),
            "--data",
            str(files["zsre"]),
            "--n",
            "1",
            "--json",
            str(out),
        ],
        env=_script_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ea" in proc.stdout and "score" in proc.stdout
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 1 and metrics["kind"] == "zsre"
    for key in ("ea", "pa", "na", "score"):
        assert 0.0 <= metrics[key] <= 1.0 and not math.isnan(metrics[key])


def test_console_script_error_exit_status(files, tmp_path):
    bad = _bad_requests(tmp_path, "malformed-json")
    out = tmp_path / "out"
    proc = subprocess.run(
        [_script(), *_edit_argv(files, out, requests=bad)],
        env=_script_env(tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid JSON on line 2" in _error_line(proc.stderr)
    assert proc.stdout == "" and not out.exists()
