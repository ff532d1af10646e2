import json
from pathlib import Path

import pytest

from fededit_core.data.loaders import DataError, dataset_kind, load_requests, save_requests_jsonl
from fededit_core.data.requests import EditRequest


def _write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


FULL_CF = {
    "case_id": 7,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Danielle Darrieux, a native", "Danielle Darrieux spoke the language"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Montesquieu is a native speaker of"],
    "attribute_prompts": ["Barack Obama, speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is", "Danielle Darrieux was born in"],
}

SIMPLE_CF = {
    "case_id": 42,
    "prompt": "The profession of Arun Nehru is",
    "target_new": "actor",
    "subject": "Arun Nehru",
    "ground_truth": "politician",
    "rephrase_prompt": "Arun Nehru is known for",
    "locality_prompt": "George Washington's profession is a",
    "locality_ground_truth": "politician",
}

ZSRE = {
    "subject": "Ramalinaceae",
    "src": "Which family does Ramalinaceae belong to?",
    "pred": "Ramalinales",
    "rephrase": "What family are Ramalinaceae?",
    "alt": "Lamiinae",
    "answers": ["Lecanorales"],
    "loc": "nq question: types of skiing in the winter olympics 2018",
    "loc_ans": "Downhill",
    "cond": "Ramalinales >> Lamiinae || Which family does Ramalinaceae belong to?",
}

PLAIN = {"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy"}


# --------------------------------------------------------------------------- schemas


def test_full_counterfact(tmp_path):
    path = _write_json(tmp_path / "mcf.json", [FULL_CF])
    (req,) = load_requests(path)
    assert dataset_kind(path) == "counterfact"
    assert req == EditRequest(
        case_id="7",
        subject="Danielle Darrieux",
        prompt="The mother tongue of {} is",
        target_new="English",
        target_true="French",
        paraphrase_prompts=tuple(FULL_CF["paraphrase_prompts"]),
        neighborhood_prompts=tuple(FULL_CF["neighborhood_prompts"]),
        neighborhood_target="French",
        generation_prompts=tuple(FULL_CF["generation_prompts"]),
    )
    assert req.text == "The mother tongue of Danielle Darrieux is"


def test_simplified_counterfact_replaces_first_subject_occurrence(tmp_path):
    second = dict(SIMPLE_CF, case_id=43, subject="Nehru", prompt="Nehru, son of Nehru, works as")
    path = _write_json(tmp_path / "cf.json", [SIMPLE_CF, second])
    first, other = load_requests(path)
    assert dataset_kind(path) == "counterfact"
    assert first.case_id == "42"
    assert first.prompt == "The profession of {} is"
    assert first.text == SIMPLE_CF["prompt"]
    assert (first.target_new, first.target_true) == ("actor", "politician")
    assert first.paraphrase_prompts == ("Arun Nehru is known for",)
    assert first.neighborhood_prompts == ("George Washington's profession is a",)
    assert first.neighborhood_target == "politician"
    assert first.generation_prompts == (SIMPLE_CF["prompt"],)
    assert other.prompt == "{}, son of Nehru, works as"


def test_zsre_as_memit_and_fedleke_by_default(tmp_path):
    """answers[0] is the new object and the nq question ends in "?" (their dsets/zsre.py)."""
    path = _write_json(tmp_path / "zsre.json", [ZSRE])
    (req,) = load_requests(path)
    assert dataset_kind(path) == "zsre"
    assert req.case_id == "0"
    assert req.prompt == "Which family does {} belong to?"
    assert (req.target_new, req.target_true) == ("Lecanorales", None)
    assert req.paraphrase_prompts == ("What family are Ramalinaceae?",)
    assert req.neighborhood_prompts == (ZSRE["loc"] + "?",)
    assert req.neighborhood_target == "Downhill"
    with pytest.raises(DataError, match=r"record 0: field 'answers' is empty"):
        load_requests(_write_json(tmp_path / "bare.json", [dict(ZSRE, answers=[])]))


def test_zsre_as_easyedit(tmp_path):
    no_answer = dict(ZSRE, answers=[])
    path = _write_json(tmp_path / "zsre.json", [ZSRE, no_answer])
    req, bare = load_requests(path, zsre_target="alt")
    assert req.case_id == "0" and bare.case_id == "1"
    assert (req.target_new, req.target_true) == ("Lamiinae", "Lecanorales")
    assert req.neighborhood_prompts == (ZSRE["loc"],)
    assert req.neighborhood_target == "Downhill"
    assert bare.target_true is None
    with pytest.raises(DataError, match="zsre-target must be one of"):
        load_requests(path, zsre_target="pred")


def test_plain_jsonl_defaults_and_optional_fields(tmp_path):
    full = dict(
        PLAIN,
        subject="Rome",
        case_id="r1",
        target_true="Italy",
        paraphrase_prompts=["{} is a city in"],
        neighborhood_prompts=["Milan is the capital of"],
        neighborhood_target="Lombardy",
        timestamp=12.5,
    )
    full["target_new"] = "France"
    path = _write_jsonl(tmp_path / "reqs.jsonl", [PLAIN, full])
    # blank lines are allowed in JSON Lines
    path.write_text(path.read_text() + "\n\n")
    a, b = load_requests(path)
    assert dataset_kind(path) == "requests"
    assert a.case_id == "0" and a.target_true is None and a.paraphrase_prompts == ()
    assert b.case_id == "r1" and b.timestamp == 12.5 and b.neighborhood_target == "Lombardy"
    assert b.locality_target == "Lombardy"


def test_plain_json_list_and_single_object(tmp_path):
    assert load_requests(_write_json(tmp_path / "list.json", [PLAIN]))[0].subject == "Paris"
    assert load_requests(_write_json(tmp_path / "one.json", PLAIN))[0].subject == "Paris"


def test_targets_kept_as_given(tmp_path):
    (req,) = load_requests(_write_json(tmp_path / "t.json", [dict(PLAIN, target_new="New York")]))
    assert req.target_new == "New York"


def test_n_takes_first_records(tmp_path):
    records = [dict(PLAIN, case_id=str(i)) for i in range(5)]
    path = _write_jsonl(tmp_path / "r.jsonl", records)
    assert [r.case_id for r in load_requests(path, n=2)] == ["0", "1"]
    assert load_requests(path, n=0) == []
    assert len(load_requests(path, n=50)) == 5
    with pytest.raises(DataError, match="n must be"):
        load_requests(path, n=-1)


def test_n_skips_bad_records_after_the_first_n(tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [PLAIN, dict(PLAIN, target_new="")])
    assert len(load_requests(path, n=1)) == 1
    with pytest.raises(DataError):
        load_requests(path)


def test_save_round_trip(tmp_path):
    originals = load_requests(_write_json(tmp_path / "mcf.json", [FULL_CF])) + load_requests(
        _write_json(tmp_path / "zsre.json", [ZSRE, dict(ZSRE, answers=[])]), zsre_target="alt"
    )
    originals.append(EditRequest(case_id="t", subject="X", prompt="{} lives in", target_new="Y", timestamp=3.0))
    out = save_requests_jsonl(originals, tmp_path / "sub" / "saved.jsonl")
    assert dataset_kind(out) == "requests"
    assert load_requests(out) == originals


def test_zsre_requests_saved_plain_are_still_evaluated_as_zsre(tmp_path):
    originals = load_requests(_write_json(tmp_path / "zsre.json", [ZSRE]))
    out = save_requests_jsonl(originals, tmp_path / "saved.jsonl", kind="zsre", extra=[{"client": "client-0"}])
    assert dataset_kind(out) == "zsre"
    assert load_requests(out) == originals
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(out.read_text() + json.dumps({**PLAIN, "evaluate_as": "counterfact"}) + "\n")
    with pytest.raises(DataError, match="evaluate_as"):
        dataset_kind(mixed)


# --------------------------------------------------------------------------- errors


def _error(tmp_path, content: str, name="bad.jsonl") -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_requests(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_error_malformed_jsonl_line(tmp_path):
    text = json.dumps(PLAIN) + "\n" + json.dumps(PLAIN) + "\n" + '{"subject": "a", "prompt": \n'
    message = _error(tmp_path, text)
    assert "line 3" in message and "invalid JSON" in message


def test_error_malformed_json_list(tmp_path):
    message = _error(tmp_path, '[\n {"subject": "a",\n  "prompt" "x"}\n]', name="bad.json")
    assert "invalid JSON" in message and "line 3" in message


def test_error_missing_field(tmp_path):
    records = [SIMPLE_CF, {k: v for k, v in SIMPLE_CF.items() if k != "ground_truth"}]
    message = _error(tmp_path, json.dumps(records), name="cf.json")
    assert "record 1" in message and "ground_truth" in message and "missing" in message

    rewrite = {k: v for k, v in FULL_CF["requested_rewrite"].items() if k != "target_true"}
    message = _error(tmp_path, json.dumps([dict(FULL_CF, requested_rewrite=rewrite)]), name="mcf.json")
    assert "record 0" in message and "requested_rewrite.target_true" in message

    message = _error(tmp_path, json.dumps([{k: v for k, v in ZSRE.items() if k != "loc_ans"}]), name="z.json")
    assert "loc_ans" in message

    message = _error(tmp_path, json.dumps(PLAIN) + "\n" + json.dumps({"subject": "a", "target_new": "b"}) + "\n")
    assert "record 1" in message and "prompt" in message


def test_error_subject_absent_from_prompt(tmp_path):
    message = _error(tmp_path, json.dumps([dict(SIMPLE_CF, subject="Gandhi")]), name="cf.json")
    assert "record 0" in message and "Gandhi" in message and "absent" in message

    message = _error(tmp_path, json.dumps([ZSRE, dict(ZSRE, subject="Lichen")]), name="z.json")
    assert "record 1" in message and "Lichen" in message and "absent" in message


def test_error_empty_target(tmp_path):
    message = _error(tmp_path, json.dumps([dict(SIMPLE_CF, target_new="  ")]), name="cf.json")
    assert "record 0" in message and "empty" in message and "target_new" in message

    rewrite = dict(FULL_CF["requested_rewrite"], target_true={"str": "", "id": "Q1"})
    message = _error(tmp_path, json.dumps([dict(FULL_CF, requested_rewrite=rewrite)]), name="mcf.json")
    assert "empty" in message and "target_true" in message

    message = _error(tmp_path, json.dumps(dict(PLAIN, target_new="")) + "\n")
    assert "empty" in message and "target_new" in message


def test_error_plain_prompt_without_slot(tmp_path):
    message = _error(tmp_path, json.dumps(dict(PLAIN, prompt="Paris is the capital of")) + "\n")
    assert '"{}"' in message and "record 0" in message


def test_error_unknown_schema_and_wrong_types(tmp_path):
    message = _error(tmp_path, json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert "unknown schema" in message
    message = _error(tmp_path, json.dumps([1, 2]), name="nums.json")
    assert "unknown schema" in message
    message = _error(tmp_path, json.dumps([PLAIN, "text"]), name="mixed.json")
    assert "record 1" in message and "JSON object" in message
    message = _error(tmp_path, json.dumps([dict(PLAIN, target_new=5)]), name="type.json")
    assert "target_new" in message and "string" in message
    message = _error(tmp_path, json.dumps([dict(PLAIN, paraphrase_prompts=[1])]), name="para.json")
    assert "paraphrase_prompts[0]" in message


def test_error_empty_and_missing_file(tmp_path):
    assert "empty" in _error(tmp_path, "\n\n")
    assert "no records" in _error(tmp_path, "[]", name="empty.json")
    with pytest.raises(DataError, match="no such file"):
        load_requests(tmp_path / "absent.json")
    with pytest.raises(DataError, match="no such file"):
        dataset_kind(tmp_path / "absent.json")


def test_errors_are_value_errors_not_key_errors(tmp_path):
    path = _write_json(tmp_path / "x.json", [{"requested_rewrite": {}}])
    with pytest.raises(ValueError) as info:
        load_requests(path)
    assert isinstance(info.value, DataError) and not isinstance(info.value, KeyError)


# --------------------------------------------------------------------------- the shared evaluation data


def _shared_data() -> Path | None:
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "shared" / "data", here.parents[1] / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


@pytest.mark.parametrize(
    "relative, kind, count",
    [
        ("counterfact/counterfact-val.json", "counterfact", 1919),
        ("counterfact/multi_counterfact-46.json", "counterfact", 46),
        ("zsre/zsre_mend_eval-600.json", "zsre", 600),
    ],
)
def test_shared_data_files(relative, kind, count):
    root = _shared_data()
    if root is None or not (root / relative).is_file():
        pytest.skip(f"shared evaluation data {relative} not present")
    path = root / relative
    assert dataset_kind(path) == kind
    requests = load_requests(path)
    assert len(requests) == count
    assert len(load_requests(path, n=10)) == 10
    for req in requests:
        assert req.prompt.count("{}") == 1 and req.target_new.strip()
        assert req.locality_target is not None and req.neighborhood_prompts
        assert req.paraphrase_prompts
        if kind == "counterfact":
            assert req.target_true
    if relative.endswith("multi_counterfact-46.json"):
        first = requests[0]
        assert first.text == "The mother tongue of Danielle Darrieux is"
        assert (first.target_new, first.target_true) == ("English", "French")
        assert len(first.paraphrase_prompts) == 2 and len(first.neighborhood_prompts) == 10
