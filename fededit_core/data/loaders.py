"""Loading edit requests from CounterFact, zsRE and plain request files.

Four record schemas are recognised (from the keys of the first record):

* full ROME/MEMIT CounterFact: ``requested_rewrite{prompt, subject, target_new{str}, target_true{str}}``,
  ``paraphrase_prompts``, ``neighborhood_prompts``, ``generation_prompts``;
* simplified CounterFact: ``prompt`` (subject filled in), ``subject``, ``target_new``, ``ground_truth``,
  ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``;
* zsRE (MEND split): ``subject``, ``src``, ``alt``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``, read
  by one of two conventions (``zsre_target``): ``"answers"`` (MEMIT and FedLEKE, kmeng01/memit and
  zongkaiz/FLEKE ``dsets/zsre.py`` lines 42-48: the new object is ``answers[0]``, no true object, the
  neighbourhood question ``loc + "?"``) or ``"alt"`` (EasyEdit: the new object is ``alt``, the true
  one ``answers[0]``, ``loc`` as it is);
* plain requests (this project's own format): ``subject``, ``prompt`` (with ``"{}"``), ``target_new`` and
  optionally ``target_true``, ``case_id``, ``paraphrase_prompts``, ``neighborhood_prompts``,
  ``neighborhood_target``, ``generation_prompts``, ``timestamp``.

A file is either one JSON value (a list of records, or a single record) or JSON Lines (one record a
line). Every problem is reported as a :class:`DataError` naming the file, the record and the fault.
"""

from __future__ import annotations

import functools
import json
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from fededit_core.data.errors import DataError, validation_message
from fededit_core.data.requests import EditRequest

__all__ = ["DataError", "dataset_kind", "load_requests", "save_requests_jsonl"]

ZSRE_TARGETS = ("answers", "alt")
DEFAULT_ZSRE_TARGET = "answers"  # the convention of MEMIT and FedLEKE, whose tables this project reproduces

Schema = Literal["counterfact_full", "counterfact_simple", "zsre", "requests"]
Kind = Literal["counterfact", "zsre", "requests"]

_KIND_OF_SCHEMA: dict[str, Kind] = {
    "counterfact_full": "counterfact",
    "counterfact_simple": "counterfact",
    "zsre": "zsre",
    "requests": "requests",
}

_PLAIN_FIELDS = (
    "case_id",
    "subject",
    "prompt",
    "target_new",
    "target_true",
    "paraphrase_prompts",
    "neighborhood_prompts",
    "neighborhood_target",
    "generation_prompts",
    "timestamp",
)


class _RecordError(Exception):
    """Internal: a fault in one record, turned into a DataError with the file and index."""


# --------------------------------------------------------------------------- reading


MAX_DATA_BYTES = 1 << 30  # a request file larger than this is refused before it is read
MAX_INT_DIGITS = 30


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _json(text: str):
    """``json.loads`` with bounded integers, no NaN/Infinity, and deep nesting as a ValueError."""
    try:
        return json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _read_text(path: Path) -> str:
    """The file's UTF-8 text: a regular file (not a pipe, device or folder) of at most ``MAX_DATA_BYTES``."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path}: not a regular file (a folder, pipe or device)")
    if info.st_size > MAX_DATA_BYTES:
        raise DataError(
            f"{path}: {info.st_size} bytes, more than the {MAX_DATA_BYTES >> 20} MB a request file may hold"
        )
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_DATA_BYTES + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_DATA_BYTES:
        raise DataError(f"{path}: more than the {MAX_DATA_BYTES >> 20} MB a request file may hold")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _read_records(path: Path) -> list[Any]:
    text = _read_text(path)
    stripped = text.lstrip("\ufeff").strip()
    if not stripped:
        raise DataError(f"{path}: file is empty")

    if stripped.startswith("["):
        try:
            value = _json(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        except ValueError as exc:
            raise DataError(f"{path}: invalid JSON: {exc}") from None
        return value

    # A single JSON object (possibly spread over several lines) ...
    try:
        value = _json(stripped)
    except ValueError:
        pass
    else:
        return [value]

    # ... otherwise JSON Lines.
    records: list[Any] = []
    for lineno, line in enumerate(text.lstrip("\ufeff").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(_json(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON on line {lineno} (column {exc.colno}): {exc.msg}") from None
        except ValueError as exc:
            raise DataError(f"{path}: invalid JSON on line {lineno}: {exc}") from None
    return records


def _detect_schema(record: Any) -> Schema | None:
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "requested_rewrite" in keys:
        return "counterfact_full"
    if {"src", "alt"} <= keys:
        return "zsre"
    if keys & {"ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth"}:
        return "counterfact_simple"
    if {"subject", "prompt", "target_new"} <= keys:
        return "requests"
    return None


def _schema_of(path: Path, records: list[Any]) -> Schema:
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records or JSON Lines, got {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no records")
    schema = _detect_schema(records[0])
    if schema is None:
        first = records[0]
        found = sorted(first) if isinstance(first, dict) else type(first).__name__
        raise DataError(
            f"{path}: record 0: unknown schema (keys {found}); expected full CounterFact "
            "(requested_rewrite, ...), simplified CounterFact (prompt, subject, target_new, ground_truth, ...), "
            "zsRE (subject, src, alt, answers, rephrase, loc, loc_ans) or plain requests "
            '(subject, prompt with "{}", target_new, ...)'
        )
    return schema


# --------------------------------------------------------------------------- field helpers


def _field(record: dict, key: str, where: str = "") -> Any:
    if key not in record:
        raise _RecordError(f"missing field {where + key!r}")
    return record[key]


def _string(value: Any, name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _RecordError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _RecordError(f"field {name!r} is empty")
    return value


def _target(value: Any, name: str) -> str:
    """A target string; ``{"str": ...}`` (ROME's form) is accepted too."""
    if isinstance(value, dict):
        if "str" not in value:
            raise _RecordError(f"missing field {name + '.str'!r}")
        value = value["str"]
        name = name + ".str"
    if not isinstance(value, str):
        raise _RecordError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RecordError(f"empty target: field {name!r} is empty")
    return value


def _optional_target(record: dict, key: str) -> str | None:
    value = record.get(key)
    return None if value is None else _target(value, key)


def _prompts(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _RecordError(f"field {name!r} must be a list of strings, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _RecordError(f"field {name}[{i}] must be a string, got {type(item).__name__}")
        if item.strip():
            out.append(item)
    return tuple(out)


def _template(text: str, subject: str, name: str) -> str:
    """``text`` with the first occurrence of ``subject`` replaced by ``"{}"``."""
    pos = text.find(subject)
    if pos < 0:
        raise _RecordError(f"subject {subject!r} is absent from its prompt {name!r}: {text!r}")
    return text[:pos] + "{}" + text[pos + len(subject) :]


def _case_id(record: dict, index: int) -> str:
    value = record.get("case_id")
    if value is None:
        return str(index)
    if isinstance(value, (dict, list)):
        raise _RecordError(f"field 'case_id' must be a string or number, got {type(value).__name__}")
    return str(value)


# --------------------------------------------------------------------------- converters


def _from_counterfact_full(record: dict, index: int) -> dict:
    rewrite = _field(record, "requested_rewrite")
    if not isinstance(rewrite, dict):
        raise _RecordError(f"field 'requested_rewrite' must be an object, got {type(rewrite).__name__}")
    subject = _string(_field(rewrite, "subject", "requested_rewrite."), "requested_rewrite.subject")
    prompt = _string(_field(rewrite, "prompt", "requested_rewrite."), "requested_rewrite.prompt")
    if "{}" not in prompt:
        raise _RecordError(f"field 'requested_rewrite.prompt' has no \"{{}}\" for the subject: {prompt!r}")
    target_new = _target(_field(rewrite, "target_new", "requested_rewrite."), "requested_rewrite.target_new")
    target_true = _target(_field(rewrite, "target_true", "requested_rewrite."), "requested_rewrite.target_true")
    return dict(
        case_id=_case_id(record, index),
        subject=subject,
        prompt=prompt,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_prompts(record.get("paraphrase_prompts"), "paraphrase_prompts"),
        neighborhood_prompts=_prompts(record.get("neighborhood_prompts"), "neighborhood_prompts"),
        neighborhood_target=target_true,
        generation_prompts=_prompts(record.get("generation_prompts"), "generation_prompts"),
    )


def _from_counterfact_simple(record: dict, index: int) -> dict:
    subject = _string(_field(record, "subject"), "subject")
    filled = _string(_field(record, "prompt"), "prompt")
    target_new = _target(_field(record, "target_new"), "target_new")
    target_true = _target(_field(record, "ground_truth"), "ground_truth")
    rephrase = _string(_field(record, "rephrase_prompt"), "rephrase_prompt", allow_empty=True)
    locality = _string(_field(record, "locality_prompt"), "locality_prompt", allow_empty=True)
    locality_target = _target(_field(record, "locality_ground_truth"), "locality_ground_truth")
    return dict(
        case_id=_case_id(record, index),
        subject=subject,
        prompt=_template(filled, subject, "prompt"),
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_prompts(rephrase, "rephrase_prompt"),
        neighborhood_prompts=_prompts(locality, "locality_prompt"),
        neighborhood_target=locality_target,
        generation_prompts=(filled,),
    )


def _from_zsre(record: dict, index: int, target: str = DEFAULT_ZSRE_TARGET) -> dict:
    """One zsRE record by the ``target`` convention (module docstring)."""
    subject = _string(_field(record, "subject"), "subject")
    src = _string(_field(record, "src"), "src")
    answers = record.get("answers") or []
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list):
        raise _RecordError(f"field 'answers' must be a list of strings, got {type(answers).__name__}")
    first_answer = _target(answers[0], "answers[0]") if answers else None
    if target == "answers":
        if first_answer is None:
            raise _RecordError("field 'answers' is empty: zsre-target 'answers' edits towards answers[0]")
        target_new, target_true = first_answer, None
    else:
        target_new, target_true = _target(_field(record, "alt"), "alt"), first_answer
    rephrase = _string(_field(record, "rephrase"), "rephrase", allow_empty=True)
    loc = _string(_field(record, "loc"), "loc", allow_empty=True)
    if target == "answers" and loc:
        loc += "?"  # the references append it to the nq question (dsets/zsre.py line 48)
    loc_ans = _target(_field(record, "loc_ans"), "loc_ans")
    return dict(
        case_id=_case_id(record, index),
        subject=subject,
        prompt=_template(src, subject, "src"),
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_prompts(rephrase, "rephrase"),
        neighborhood_prompts=_prompts(loc, "loc"),
        neighborhood_target=loc_ans,
    )


def _from_requests(record: dict, index: int) -> dict:
    subject = _string(_field(record, "subject"), "subject")
    prompt = _string(_field(record, "prompt"), "prompt")
    if prompt.count("{}") != 1:
        hint = ' (write the prompt with the subject replaced by "{}")' if subject in prompt else ""
        raise _RecordError(f"field 'prompt' must contain exactly one \"{{}}\" for the subject, got {prompt!r}{hint}")
    timestamp = record.get("timestamp")
    if timestamp is not None and (isinstance(timestamp, bool) or not isinstance(timestamp, (int, float))):
        raise _RecordError(f"field 'timestamp' must be a number, got {type(timestamp).__name__}")
    return dict(
        case_id=_case_id(record, index),
        subject=subject,
        prompt=prompt,
        target_new=_target(_field(record, "target_new"), "target_new"),
        target_true=_optional_target(record, "target_true"),
        paraphrase_prompts=_prompts(record.get("paraphrase_prompts"), "paraphrase_prompts"),
        neighborhood_prompts=_prompts(record.get("neighborhood_prompts"), "neighborhood_prompts"),
        neighborhood_target=_optional_target(record, "neighborhood_target"),
        generation_prompts=_prompts(record.get("generation_prompts"), "generation_prompts"),
        timestamp=timestamp,
    )


_CONVERTERS = {
    "counterfact_full": _from_counterfact_full,
    "counterfact_simple": _from_counterfact_simple,
    "zsre": _from_zsre,
    "requests": _from_requests,
}


# --------------------------------------------------------------------------- public API


EVALUATE_AS = "evaluate_as"  # optional field of plain records: "zsre" (e.g. zsRE requests saved plain)


def dataset_kind(path: str | Path) -> Kind:
    """How the file is evaluated: ``"counterfact"`` (either CounterFact schema), ``"zsre"`` or
    ``"requests"`` (the plain schema, evaluated like CounterFact unless its records say
    ``"evaluate_as": "zsre"``, as zsRE requests saved in the plain schema do)."""
    path = Path(path)
    records = _read_records(path)
    kind = _KIND_OF_SCHEMA[_schema_of(path, records)]
    if kind != "requests":
        return kind
    marks = {r.get(EVALUATE_AS) for r in records if isinstance(r, dict)}
    if not marks <= {None, "zsre", "requests"} or len(marks) > 1:
        raise DataError(
            f"{path}: field {EVALUATE_AS!r} must be 'zsre' or 'requests' and the same in every "
            f"record, got {sorted(map(str, marks))}"
        )
    return marks.pop() or "requests"


def load_requests(path: str | Path, n: int | None = None, zsre_target: str = DEFAULT_ZSRE_TARGET) -> list[EditRequest]:
    """Read the first ``n`` records (all when ``None``) of a CounterFact, zsRE or plain request file;
    ``zsre_target`` picks the zsRE convention (module docstring; other schemas ignore it).

    Raises :class:`DataError` naming the file, the record index and the fault.
    """
    path = Path(path)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise DataError(f"{path}: n must be a non-negative integer or None, got {n!r}")
    records = _read_records(path)
    schema = _schema_of(path, records)
    if zsre_target not in ZSRE_TARGETS:
        raise DataError(f"zsre-target must be one of {list(ZSRE_TARGETS)}, got {zsre_target!r}")
    convert = _CONVERTERS[schema]
    if schema == "zsre":
        convert = functools.partial(_from_zsre, target=zsre_target)
    selected = records if n is None else records[:n]
    out: list[EditRequest] = []
    for index, record in enumerate(selected):
        try:
            if not isinstance(record, dict):
                raise _RecordError(f"expected a JSON object, got {type(record).__name__}")
            out.append(EditRequest(**convert(record, index)))
        except _RecordError as exc:
            raise DataError(f"{path}: record {index}: {exc}") from None
        except ValidationError as exc:
            raise DataError(f"{path}: record {index}: {validation_message(exc)}") from None
    return out


def request_to_record(request: EditRequest) -> dict:
    """The plain-schema record of ``request`` (fields left at their defaults are omitted)."""
    record: dict[str, Any] = {}
    for key in _PLAIN_FIELDS:
        value = getattr(request, key)
        if value is None or value == ():
            continue
        record[key] = list(value) if isinstance(value, tuple) else value
    return record


def save_requests_jsonl(
    requests: Iterable[EditRequest], path: str | Path, kind: Kind = "requests", extra: Iterable[dict] | None = None
) -> Path:
    """Write ``requests`` as JSON Lines in the plain schema; ``load_requests`` reads them back unchanged
    and ``dataset_kind`` gives ``kind`` back (zsRE requests stay zsRE). ``extra``: more fields per record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    requests = list(requests)
    mark = {EVALUATE_AS: "zsre"} if kind == "zsre" else {}
    extras = list(extra) if extra is not None else [{}] * len(requests)
    if len(extras) != len(requests):
        raise ValueError(f"extra has {len(extras)} records for {len(requests)} requests")
    lines = [json.dumps({**request_to_record(r), **mark, **e}, ensure_ascii=False) for r, e in zip(requests, extras)]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def record_clients(path: str | Path, n: int | None = None) -> list[str | None]:
    """The optional ``"client"`` field of each record (``None`` where absent), in file order."""
    path = Path(path)
    records = _read_records(path)
    selected = records if n is None else records[:n]
    out: list[str | None] = []
    for index, record in enumerate(selected):
        value = record.get("client") if isinstance(record, dict) else None
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise DataError(f"{path}: record {index}: field 'client' must be a non-empty string, got {value!r}")
        out.append(value)
    return out
