"""The loaders' door: malformed request files, a named pipe, a folder, a file over the cap."""

from __future__ import annotations

import json
import os
import random
import signal
import tempfile
from pathlib import Path

from tqdm import tqdm

from bench.fuzz.harness import tally

# --------------------------------------------------------------------------- the loaders' door

GOOD_RECORD = {
    "case_id": 1,
    "prompt": "{} is located in",
    "subject": "Paris",
    "target_new": "Rome",
    "target_true": "France",
}


def malformed_file(path: Path, rng: random.Random) -> str:
    """Write one malformed request file at ``path``; returns its kind."""
    good = json.dumps(GOOD_RECORD)
    kind = rng.choice(
        [
            "empty",
            "whitespace",
            "binary",
            "not_utf8",
            "truncated",
            "deep",
            "huge_int",
            "nan",
            "not_records",
            "record_not_object",
            "missing_field",
            "wrong_type",
            "no_placeholder",
            "prompts_not_strings",
            "infinite_timestamp",
            "two_placeholders",
            "empty_target",
            "bad_timestamp",
            "mixed_schemas",
            "counterfact_wrong",
            "zsre_wrong",
            "lone_surrogate",
        ]
    )
    record = dict(GOOD_RECORD)
    text = None
    if kind == "empty":
        text = ""
    elif kind == "whitespace":
        text = " \n\t\n"
    elif kind == "binary":
        path.write_bytes(rng.randbytes(rng.randrange(1, 512)))
        return kind
    elif kind == "not_utf8":
        path.write_bytes(good.encode()[:10] + b"\xff\xfe" + good.encode()[10:])
        return kind
    elif kind == "truncated":
        text = good[: rng.randrange(1, len(good) - 1)]
    elif kind == "deep":
        depth = rng.choice([50, 5000, 200_000])
        text = "[" * depth + "]" * depth
    elif kind == "huge_int":
        text = json.dumps(record)[:-1] + f', "timestamp": {"9" * rng.choice([40, 5000])}}}'
    elif kind == "nan":
        text = json.dumps(record)[:-1] + f', "timestamp": {rng.choice(["NaN", "Infinity"])}}}'
    elif kind == "not_records":
        text = json.dumps(rng.choice([5, "x", [], {}, None, [[]]]))
    elif kind == "record_not_object":
        text = good + "\n" + json.dumps(rng.choice([5, "x", [1], None])) + "\n"
    elif kind == "missing_field":
        record.pop(rng.choice(["prompt", "subject", "target_new"]))
    elif kind == "wrong_type":
        key = rng.choice(["prompt", "subject", "target_new", "case_id"])
        record[key] = rng.choice([5, None, [], {}, True]) if key != "case_id" else rng.choice([[], {}])
    elif kind == "no_placeholder":
        record["prompt"] = "Paris is located in"
    elif kind == "prompts_not_strings":
        record[rng.choice(["paraphrase_prompts", "neighborhood_prompts"])] = rng.choice([[5], [None], {}, 5, [["x"]]])
    elif kind == "infinite_timestamp":
        text = json.dumps(record)[:-1] + ', "timestamp": 1e400}\n'
    elif kind == "two_placeholders":
        record["prompt"] = "{} is {} located in"
    elif kind == "empty_target":
        record["target_new"] = rng.choice(["", " "])
    elif kind == "bad_timestamp":
        record["timestamp"] = rng.choice(["yesterday", [], {}])
    elif kind == "mixed_schemas":
        text = (
            good
            + "\n"
            + json.dumps({"src": "q?", "answers": ["a"], "rephrase": "r", "loc": "l", "loc_ans": "x"})
            + "\n"
        )
    elif kind == "counterfact_wrong":
        record = {"case_id": 0, "requested_rewrite": rng.choice(["x", {"prompt": "no subject", "subject": "S"}, {}])}
    elif kind == "zsre_wrong":
        record = {
            "src": "q?",
            "subject": "q",
            "answers": rng.choice(["a", [], [5]]),
            "rephrase": "r",
            "loc": "l",
            "loc_ans": "x",
        }
    elif kind == "lone_surrogate":
        text = json.dumps(record).replace("Rome", "\\ud800")
    if text is None:
        text = json.dumps(record) + "\n"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return kind


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def loader_case(path: Path) -> str:
    from fededit_core.data.errors import DataError
    from fededit_core.data.loaders import dataset_kind, load_requests

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        load_requests(path)
        dataset_kind(path)
    except DataError:
        return "rejected"
    except _Timeout:
        return "crashed: no answer within 10 s"
    except Exception as err:  # noqa: BLE001
        return f"crashed: {type(err).__name__}: {str(err)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return "accepted_invalid"


def special_files(root: Path) -> list[tuple[str, Path]]:
    """A named pipe nobody writes to, a folder, and a sparse file over the size cap."""
    from fededit_core.data.loaders import MAX_DATA_BYTES

    fifo = root / "pipe.jsonl"
    os.mkfifo(fifo)
    folder = root / "folder.jsonl"
    folder.mkdir()
    huge = root / "huge.jsonl"
    with huge.open("wb") as handle:
        handle.truncate(MAX_DATA_BYTES + 1)
    return [("named_pipe", fifo), ("folder", folder), ("over_size_cap", huge)]


def fuzz_loaders(n: int, seed: int, progress: bool = True) -> dict:
    rng = random.Random(seed + 2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind, path in special_files(root):
            results.append((loader_case(path), "file", kind))
        for i in tqdm(range(n), desc="loader fuzz", disable=not progress):
            path = root / f"case-{i}.jsonl"
            kind = malformed_file(path, random.Random(rng.randrange(2**63)))
            results.append((loader_case(path), "file", kind))
            path.unlink()
    return tally(results)
