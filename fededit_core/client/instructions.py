"""The schema of every instruction the server may send a client, one pydantic model per step.

The server is another party: its arguments are checked here for their fields, strict types and
ranges (alpha a cosine threshold in [0, 1], ids of the form ``<sender>/<slot>/<i>`` and never the
client's own), and its arrays for their names, dtypes, shapes against this client's own model and
for values finite in float32, before any step touches the model. Anything else is a
``StepError`` whose message names the field, never its value.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    ValidationError,
)

from fededit_core.data.errors import validation_message
from fededit_core.fedleke.probe import MAX_PROBE_TAU
from fededit_core.fedleke.reedit import GATES, VECTORS
from fededit_core.fedleke.sealing import sealed_length
from fededit_core.fedleke.tags import Tag
from fededit_core.memit.dynamic_covariance import MAX_BETA
from fededit_core.memit.update import STATISTICS_FORMS
from fededit_core.paths import SAFE_NAME, SafeName


class StepError(RuntimeError):
    """A step this client refuses or cannot do (a bad instruction, a step out of order); its message
    holds no request text, so the server may be told."""


MAX_ITEMS = 100_000  # MKVs in one re-edit instruction (every other client's slot)

Slot = Annotated[StrictInt, Field(ge=0, le=1000)]
LayerIndex = Annotated[StrictInt, Field(ge=0, le=4096)]
Name = SafeName
RequestId = Annotated[str, StringConstraints(pattern=f"^{SAFE_NAME.pattern}/[0-9]{{1,4}}/[0-9]{{1,6}}$")]
Number = Annotated[Union[StrictInt, StrictFloat], Field(allow_inf_nan=False)]


class _Instruction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Empty(_Instruction):
    pass


class Hello(_Instruction):
    nonce: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] | None = None  # for the key proof


class SlotStep(_Instruction):
    slot: Slot


class Tags(SlotStep):
    facts: StrictBool = False  # also the fact tags (CollabEdit's conflict policy)


class SealedSource(_Instruction):
    """A sealed set the instruction carries (array ``sealed.<j>``): its sender, slot and count."""

    sender: Name
    slot: Slot
    n: Annotated[StrictInt, Field(ge=0, le=MAX_ITEMS)]


Sources = Annotated[list[SealedSource], Field(max_length=1000)]
Index = Annotated[StrictInt, Field(ge=0, le=MAX_ITEMS)]


class Edit(_Instruction):
    """Edit a slot. ``seal``: upload the MKVs sealed. Reuse: ``reuse_tags`` with their z either as
    plaintext rows (array ``reuse_z``) or as rows ``reuse_row`` of the sealed sets ``reuse_source``."""

    slot: Slot
    reuse_tags: Annotated[list[Tag], Field(max_length=MAX_ITEMS)] = []
    upload: StrictBool = True
    seal: StrictBool = False
    sources: Sources = []
    reuse_source: Annotated[list[Index], Field(max_length=MAX_ITEMS)] = []
    reuse_row: Annotated[list[Index], Field(max_length=MAX_ITEMS)] = []


class Reedit(_Instruction):
    """The other clients' sets: plaintext (``ids``, ``senders`` and arrays z, delta, keys, layers)
    or sealed (``sources`` and arrays ``sealed.<j>``)."""

    alpha: Annotated[Number, Field(ge=0, le=1)]
    gate: Literal[GATES]  # type: ignore[valid-type]
    vector: Literal[VECTORS]  # type: ignore[valid-type]
    tau: Annotated[Number, Field(ge=0, le=MAX_PROBE_TAU)]
    ids: Annotated[list[RequestId], Field(max_length=MAX_ITEMS)]
    senders: Annotated[list[Name], Field(max_length=MAX_ITEMS)]
    sources: Sources = []


class Collab(_Instruction):
    slot: Slot
    apply: LayerIndex | None = None
    stats: LayerIndex | None = None
    secure: StrictBool = False
    transport: Literal[STATISTICS_FORMS]  # type: ignore[valid-type]
    skip: Annotated[list[Index], Field(max_length=MAX_ITEMS)] = []  # rows left out of the slot (stats 0)
    conflicts: Annotated[list[Index], Field(max_length=MAX_ITEMS)] = []  # of them, those refused as conflicts
    beta0: Annotated[Number, Field(ge=0, le=MAX_BETA)]  # dynamic covariance (memit.dynamic_covariance)
    beta1: Annotated[Number, Field(ge=0, le=MAX_BETA)]


class CollabMasked(_Instruction):
    slot: Slot
    stats: LayerIndex
    scale: Annotated[Number, Field(gt=0)]


class Rejected(_Instruction):
    error: Annotated[str, StringConstraints(max_length=2000)]


class Evaluate(_Instruction):
    others: Literal["none", "reedited", "all"] = "none"
    fluency: StrictBool = False
    baseline: StrictBool = True
    others_limit: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = 0
    per_request: StrictBool = False  # simulation: also the absorbed requests' metrics one by one, by MKV id


INSTRUCTIONS: dict[str, type[_Instruction]] = {
    "hello": Hello,
    "tags": Tags,
    "edit": Edit,
    "reedit": Reedit,
    "editavg_update": SlotStep,
    "editavg_factors": SlotStep,
    "editavg_apply": SlotStep,
    "collab": Collab,
    "collab_masked": CollabMasked,
    "rejected": Rejected,
    "evaluate": Evaluate,
}


def parse_instruction(op: str, args: dict) -> _Instruction:
    schema = INSTRUCTIONS.get(op)
    if schema is None:
        raise StepError(f"unknown step {op!r}")
    try:
        return schema.model_validate(args)
    except ValidationError as err:
        raise StepError(f"the {op!r} instruction does not fit its schema: {validation_message(err, limit=3)}") from None


def expected_arrays(op: str, args: _Instruction, d_model: int, d_ff: int, layers: tuple[int, ...]) -> dict:
    """Array name -> expected shape (None: any length) of what instruction ``op`` must carry."""
    if op in ("edit", "reedit") and args.sources:
        return {f"sealed.{j}": (sealed_length(s.n, d_model, d_ff, len(layers)),) for j, s in enumerate(args.sources)}
    if op == "edit":
        return {"reuse_z": (len(args.reuse_tags), d_model)}
    if op == "reedit":
        n = len(args.ids)
        if not n:
            return {}
        return {
            "z": (n, d_model),
            "delta": (n, d_model),
            "keys": (n, len(layers), d_ff),
            "corrections": (n, len(layers), d_model),
            "layers": (len(layers),),
        }
    if op == "editavg_apply":
        return {f"delta.{l}": (d_model, d_ff) for l in layers}
    if op == "collab" and args.apply is not None:
        if args.transport == "lowrank":  # thin factors: any number of columns, the same in both
            return {"kf": (d_ff, None), "rf": (d_model, None)}
        return {"rk": (d_model, d_ff), "kk": (d_ff, d_ff)}
    return {}


def check_arrays(op: str, args: _Instruction, arrays: dict, d_model: int, d_ff: int, layers: tuple[int, ...]) -> None:
    """Exactly the arrays the step needs, with this model's shapes, finite in float32; integer layers
    equal to this client's edited layers."""
    expected = expected_arrays(op, args, d_model, d_ff, layers)
    if op == "edit" and not args.reuse_tags and "reuse_z" not in arrays:
        expected = {}
    if set(arrays) != set(expected):
        raise StepError(f"the {op!r} instruction carries arrays {sorted(arrays)[:6]}, expected {sorted(expected)}")
    for name, shape in expected.items():
        array = arrays[name]
        if not isinstance(array, np.ndarray) or not _fits(array.shape, shape):
            got = tuple(array.shape) if isinstance(array, np.ndarray) else type(array).__name__
            raise StepError(f"array {name!r} of the {op!r} instruction has shape {got}, expected {shape}")
        if name.startswith("sealed."):
            if array.dtype != np.uint8:
                raise StepError(f"array {name!r} of the {op!r} instruction has dtype {array.dtype}, expected bytes")
            continue
        if name == "layers":
            if array.dtype.kind not in "iu" or tuple(int(x) for x in array) != tuple(layers):
                raise StepError(f"the {op!r} instruction is for other layers than this client's {list(layers)}")
            continue
        if array.dtype.kind != "f":
            raise StepError(f"array {name!r} of the {op!r} instruction has dtype {array.dtype}, expected floats")
        with np.errstate(over="ignore"):
            if not np.isfinite(array.astype(np.float32, copy=False)).all():
                raise StepError(f"array {name!r} of the {op!r} instruction holds values not finite in float32")


def _fits(got: tuple, shape: tuple) -> bool:
    return len(got) == len(shape) and all(e is None or e == g for e, g in zip(shape, got))


def check_sources(op: str, args: Edit | Reedit, own_name: str) -> None:
    """Sealed sets named once each, a re-edit's from other clients only; an edit's reuse rows
    inside them."""
    seen = [(s.sender, s.slot) for s in args.sources]
    if len(set(seen)) != len(seen):
        raise StepError(f"the {op!r} instruction names a sealed set twice")
    if op == "reedit":
        if args.sources and (args.ids or args.senders):
            raise StepError("a re-edit instruction carries sealed sets or plaintext MKVs, not both")
        for source in args.sources:
            if source.sender == own_name:
                raise StepError("the re-edit instruction holds this client's own MKVs")
        return
    if len(args.reuse_source) != len(args.reuse_tags) or len(args.reuse_row) != len(args.reuse_tags):
        if args.sources or args.reuse_source or args.reuse_row:
            raise StepError("a sealed reuse names one source and one row per tag")
    for j, row in zip(args.reuse_source, args.reuse_row):
        if j >= len(args.sources) or row >= args.sources[j].n:
            raise StepError("a reuse row lies outside the sealed sets of the instruction")


def check_reedit_ids(args: Reedit, own_name: str) -> None:
    """One sender per id, each id the sender's own (``<sender>/...``), none this client's."""
    if len(args.ids) != len(args.senders):
        raise StepError(f"{len(args.ids)} ids but {len(args.senders)} senders")
    if len(set(args.ids)) != len(args.ids):
        raise StepError("the re-edit instruction repeats an id")
    for rid, sender in zip(args.ids, args.senders):
        if rid.rsplit("/", 2)[0] != sender:
            raise StepError(f"an id of the re-edit instruction does not belong to its sender {sender!r}")
        if sender == own_name:
            raise StepError("the re-edit instruction holds this client's own MKVs")
