"""What both Flower apps agree on: how a step travels in a Flower Message (the run config they
both read is ``strategies.settings.RunSettings``).

A step is a ``RecordDict`` with a ``ConfigRecord`` "step" (one JSON string: the step name and its
arguments, or the reply body) and an ``ArrayRecord`` "arrays" (named numpy arrays, stacked).
Message types: ``query`` (handshake, tags), ``evaluate`` (metrics), ``train.steps`` (every edit step)
and plain ``train`` (SecAgg+ rounds, ``server_app.secure_sum``).

Every message comes from another party, so :func:`unpack` trusts nothing: the JSON is bounded in
bytes, nesting depth, integer digits and string form before it is used, and each array's ``.npy``
header is read and checked against its byte length and the caps *before* any array is built.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

QUERY_STEPS = ("whoami", "hello", "tags", "rejected")
EDIT_ACTION = "steps"

ARRAY_NAME = re.compile(r"^[A-Za-z0-9_.]{1,64}$")
# dtypes a fededit array may have: floats for vectors and statistics, int64 for layer lists, bytes
# for sealed MKV sets
ARRAY_DTYPES = ("<f2", "<f4", "<f8", "<i8", "|u1")
NPY_MAGIC = b"\x93NUMPY"


class MessageError(ValueError):
    """A message that is not a well-formed fededit step (the sender is at fault)."""


@dataclass(frozen=True)
class Limits:
    """Caps on one message, checked before anything is allocated for it."""

    max_message_bytes: int  # all arrays together (the run config's max-message-mb)
    max_json_bytes: int = 4 << 20  # the step record's JSON text
    max_depth: int = 8  # nesting of JSON objects and lists
    max_int_digits: int = 19  # fits int64
    max_arrays: int = 64
    max_dims: int = 4


def message_type(op: str) -> str:
    """``query``, ``evaluate``, or ``train.steps`` for every edit step: the plain ``train`` type is
    left to SecAgg+, whose messages the client's default train handler answers."""
    if op in QUERY_STEPS:
        return "query"
    return "evaluate" if op == "evaluate" else f"train.{EDIT_ACTION}"


def pack(body: dict, arrays: dict[str, np.ndarray]) -> RecordDict:
    record = ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})
    return RecordDict({"step": ConfigRecord({"json": json.dumps(body)}), "arrays": record})


def _int_parser(limits: Limits):
    def parse(text: str) -> int:
        if len(text.lstrip("-")) > limits.max_int_digits:
            raise MessageError(f"an integer of {len(text)} digits")
        return int(text)

    return parse


def _no_constant(name: str):
    raise MessageError(f"JSON constant {name} (not finite)")


def _check_tree(value, depth: int, limits: Limits) -> None:
    if depth > limits.max_depth:
        raise MessageError(f"JSON nested deeper than {limits.max_depth}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MessageError("a JSON string that is not valid Unicode (lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_tree(key, depth + 1, limits)
            _check_tree(item, depth + 1, limits)
    elif isinstance(value, list):
        for item in value:
            _check_tree(item, depth + 1, limits)


def decode_json(text, limits: Limits) -> dict:
    """The step body: a JSON object within the caps, finite numbers, valid Unicode strings."""
    if not isinstance(text, str):
        raise MessageError(f"the step record's 'json' is {type(text).__name__}, not a string")
    if len(text) > limits.max_json_bytes:
        raise MessageError(f"the step record holds {len(text)} characters, more than {limits.max_json_bytes}")
    try:
        body = json.loads(text, parse_int=_int_parser(limits), parse_constant=_no_constant)
    except MessageError:
        raise
    except (ValueError, RecursionError) as err:
        raise MessageError(f"the step record is not valid JSON ({type(err).__name__})") from None
    if not isinstance(body, dict):
        raise MessageError(f"the step body is a JSON {type(body).__name__}, not an object")
    _check_tree(body, 0, limits)
    return body


def _npy_header(data: bytes) -> tuple[str, bool, tuple, int]:
    """(dtype, fortran order, shape, data offset) from a ``.npy`` v1-v3 header, read without numpy's
    loader (which would allocate what the header declares)."""
    if len(data) < 10 or not data.startswith(NPY_MAGIC):
        raise MessageError("an array is not in .npy format")
    major = data[6]
    if major == 1:
        size, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        if len(data) < 12:
            raise MessageError("a truncated .npy header")
        size, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise MessageError(f".npy format version {major} is not supported")
    if size > 4096 or start + size > len(data):
        raise MessageError("a .npy header that is too long or truncated")
    try:
        header = ast.literal_eval(data[start : start + size].decode("latin1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise MessageError("a .npy header that cannot be read") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise MessageError("a .npy header without exactly descr, fortran_order and shape")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str) or not isinstance(fortran, bool) or not isinstance(shape, tuple):
        raise MessageError("a .npy header with fields of the wrong type")
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape):
        raise MessageError("a .npy shape that is not a tuple of non-negative integers")
    return descr, fortran, shape, start + size


def decode_array(name: str, array, limits: Limits) -> np.ndarray:
    """One array: a little-endian float, int64 or byte ``.npy`` whose declared size matches its bytes."""
    if not isinstance(array, Array) or not isinstance(array.data, bytes):
        raise MessageError(f"array {name!r} is not a Flower Array of bytes")
    if array.stype != "numpy.ndarray":
        raise MessageError(f"array {name!r} has serialisation type {array.stype!r}, not numpy.ndarray")
    descr, fortran, shape, offset = _npy_header(array.data)
    if descr not in ARRAY_DTYPES:
        raise MessageError(f"array {name!r} has dtype {descr!r}; allowed: {list(ARRAY_DTYPES)}")
    if len(shape) > limits.max_dims:
        raise MessageError(f"array {name!r} has {len(shape)} dimensions, more than {limits.max_dims}")
    dtype = np.dtype(descr)
    count = int(np.prod(shape, dtype=object))
    if count * dtype.itemsize != len(array.data) - offset:
        raise MessageError(
            f"array {name!r} declares {count} elements of {dtype.itemsize} bytes, its data holds {len(array.data) - offset}"
        )
    values = np.frombuffer(array.data, dtype=dtype, offset=offset, count=count)
    return values.reshape(shape, order="F" if fortran else "C").copy(order="C")


def unpack(content, limits: Limits) -> tuple[dict, dict[str, np.ndarray]]:
    """(body, arrays) of a step message, or ``MessageError`` saying what is wrong with it."""
    if not isinstance(content, RecordDict):
        raise MessageError(f"the message content is {type(content).__name__}, not a RecordDict")
    extra = sorted(set(content.keys()) - {"step", "arrays"})
    if extra:
        raise MessageError(f"the message holds unexpected records {extra[:4]}")
    step = content.get("step")
    if not isinstance(step, ConfigRecord):
        raise MessageError("the message has no 'step' config record (not a fededit message)")
    if set(step.keys()) != {"json"}:
        raise MessageError("the 'step' record must hold exactly one entry 'json'")
    body = decode_json(step["json"], limits)
    record = content.get("arrays")
    if record is None:
        return body, {}
    if not isinstance(record, ArrayRecord):
        raise MessageError("the message's 'arrays' record is not an ArrayRecord")
    if len(record) > limits.max_arrays:
        raise MessageError(f"the message holds {len(record)} arrays, more than {limits.max_arrays}")
    total = 0
    for name, array in record.items():
        if not isinstance(name, str) or not ARRAY_NAME.match(name):
            raise MessageError("an array name that is not 1-64 letters, digits, '_' or '.'")
        total += len(array.data) if isinstance(getattr(array, "data", None), bytes) else 0
    if total > limits.max_message_bytes:
        raise MessageError(f"the message's arrays hold {total} bytes, more than the cap of {limits.max_message_bytes}")
    return body, {name: decode_array(name, array, limits) for name, array in record.items()}
