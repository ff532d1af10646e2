"""The schema of every reply a client may send the server, one pydantic model per step.

A reply body (already bounded by the wire decoder: size, depth, integer digits, Unicode) is checked
here for its fields, their strict types and their ranges before any strategy reads it: a reply that
does not fit is the client's fault (``ReplyError``), and the session rejects that client. What
depends on the federation (shapes, layers, fingerprint, ids) is checked afterwards in ``validation``.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    ValidationError,
    model_validator,
)

from fededit_core.data.errors import validation_message
from fededit_core.fedleke.tags import Tag
from fededit_core.paths import SafeName

MAX_ITEMS = 10_000  # requests (MKVs) in one upload, one slot or one client
MAX_LAYERS = 256

Key = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Text = Annotated[str, StringConstraints(max_length=256)]
Name = SafeName
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=160)]
Count = Annotated[StrictInt, Field(ge=0, le=MAX_ITEMS)]
Dimension = Annotated[StrictInt, Field(ge=1, le=1 << 20)]
Layer = Annotated[StrictInt, Field(ge=0, le=4096)]
Number = Annotated[Union[StrictInt, StrictFloat], Field(allow_inf_nan=False)]
Scalar = Union[StrictBool, Number, Text, None]
Numbers = Annotated[dict[Key, Union[Scalar, Annotated[dict[Key, Scalar], Field(max_length=64)]]], Field(max_length=64)]
PerRequest = Annotated[dict[Key, Union[Number, None]], Field(max_length=8)]
Settings = Annotated[
    dict[Key, Union[Scalar, Annotated[list[Scalar], Field(max_length=MAX_LAYERS)]]], Field(max_length=64)
]


class ReplyError(ValueError):
    """A reply that does not fit its step's schema."""


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class WhoamiReply(_Reply):
    client: Name


class HelloReply(_Reply):
    client: Name
    fingerprint: Text
    templates: Text
    covariance: Settings
    hparams: Settings
    d_model: Dimension
    d_ff: Dimension
    layers: Annotated[list[Layer], Field(min_length=1, max_length=MAX_LAYERS)]
    n_requests: Count
    slot_sizes: Annotated[list[Count], Field(min_length=1, max_length=1000)]
    next_slot: Annotated[StrictInt, Field(ge=0, le=1000)]
    kind: Literal["counterfact", "zsre", "requests"]
    reuse: StrictBool
    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] | None = None
    key_proof: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None

    @model_validator(mode="after")
    def _proof_whole(self):
        if (self.key_id is None) != (self.key_proof is None):
            raise ValueError("a key proof comes with the key's id, or neither is sent")
        return self


class TagsReply(_Reply):
    tags: Annotated[list[Tag | None], Field(max_length=MAX_ITEMS)]
    facts: Annotated[list[Tag | None], Field(max_length=MAX_ITEMS)] | None = None


class EditReply(_Reply):
    """FedEdit's upload (ids, tags, fingerprint and the MKV arrays, or one sealed blob); ``local``
    sends only the report."""

    report: Numbers
    ids: Annotated[list[RequestId], Field(max_length=MAX_ITEMS)] | None = None
    tags: Annotated[list[Tag | Literal[""]], Field(max_length=MAX_ITEMS)] | None = None
    fingerprint: Text | None = None
    refused_reuse: Annotated[list[Tag], Field(max_length=MAX_ITEMS)] = []  # served z that failed verification

    @model_validator(mode="after")
    def _upload_whole(self):
        if len({self.ids is None, self.tags is None, self.fingerprint is None}) > 1:
            raise ValueError("an upload has ids, tags and fingerprint together, or none of them")
        return self


class ReportReply(_Reply):
    report: Numbers


class ReeditReply(_Reply):
    report: Numbers
    suspects: Annotated[list[Name], Field(max_length=1000)] = []  # senders whose sets it refused


class EditAvgUpdateReply(_Reply):
    n: Count
    report: Numbers
    fingerprint: Text


class EmptyReply(_Reply):
    pass


class CollabReply(_Reply):
    report: Numbers | None = None
    n: Count | None = None
    fingerprint: Text | None = None
    max_abs: Annotated[Number, Field(ge=0)] | None = None
    n_used: Count | None = None  # the requests in the statistics (the slot's, less those skipped)
    resid_norm: Annotated[Number, Field(ge=0)] | None = None  # their mean |R| at this layer

    @model_validator(mode="after")
    def _statistics_whole(self):
        if (self.n is None) != (self.fingerprint is None):
            raise ValueError("statistics come with their count n and the model fingerprint together")
        return self


class RejectedReply(_Reply):
    acknowledged: Literal[True]


class EvaluateReply(_Reply):
    client: Name
    kind: Literal["counterfact", "zsre", "requests"]
    n_own: Count
    n_others: Annotated[StrictInt, Field(ge=0, le=1_000_000)]
    own: Numbers | None
    others: Numbers | None
    own_before: Numbers | None
    others_before: Numbers | None
    reports: Annotated[list[Numbers], Field(max_length=1000)]
    # asked for with per_request (simulation): every MKV id re-edited, and the ids and metrics of the
    # absorbed requests evaluated, one by one (numbers and ids only, no request text)
    reedited_ids: Annotated[list[RequestId], Field(max_length=MAX_ITEMS)] | None = None
    others_ids: Annotated[list[RequestId], Field(max_length=MAX_ITEMS)] | None = None
    others_per_request: Annotated[list[PerRequest], Field(max_length=MAX_ITEMS)] | None = None

    @model_validator(mode="after")
    def _one_metric_per_id(self):
        if (self.others_ids is None) != (self.others_per_request is None) or len(self.others_ids or ()) != len(
            self.others_per_request or ()
        ):
            raise ValueError("others_ids and others_per_request come together, one metric row per id")
        return self


class ErrorReply(_Reply):
    """A client's own report that its step failed."""

    error: Annotated[str, StringConstraints(min_length=1, max_length=2000)]


REPLIES: dict[str, type[_Reply]] = {
    "whoami": WhoamiReply,
    "hello": HelloReply,
    "tags": TagsReply,
    "edit": EditReply,
    "reedit": ReeditReply,
    "editavg_update": EditAvgUpdateReply,
    "editavg_factors": EditAvgUpdateReply,
    "editavg_apply": EmptyReply,
    "collab": CollabReply,
    "rejected": RejectedReply,
    "evaluate": EvaluateReply,
}

# the names of the arrays each reply may carry (no entry: the reply carries no arrays); which of
# them must be present is checked in ``validation``
REPLY_ARRAYS: dict[str, re.Pattern] = {
    "edit": re.compile(r"(z|delta|keys|corrections|layers|sealed)"),
    "editavg_update": re.compile(r"delta\.[0-9]{1,4}"),
    "editavg_factors": re.compile(r"factor_[kr]\.[0-9]{1,4}"),
    "collab": re.compile(r"(rk|kk|kf|rf)"),
}


def parse_error(body: dict) -> str | None:
    """The client's error message when ``body`` is an error reply, else None."""
    if "error" not in body:
        return None
    try:
        return ErrorReply.model_validate(body).error
    except ValidationError:
        raise ReplyError("an error reply that is not one non-empty 'error' string of at most 2000 characters") from None


def parse_reply(op: str, body: dict, arrays: dict) -> dict:
    """The reply to step ``op`` as a checked dict (only the fields the client sent)."""
    schema = REPLIES.get(op)
    if schema is None:
        raise ReplyError(f"no reply is expected to step {op!r}")
    allowed = REPLY_ARRAYS.get(op)
    unexpected = sorted(name for name in arrays if allowed is None or not allowed.fullmatch(name))
    if unexpected:
        raise ReplyError(f"the reply to {op!r} carries unexpected arrays {unexpected[:4]}")
    try:
        return schema.model_validate(body).model_dump(exclude_unset=True)
    except ValidationError as err:
        raise ReplyError(f"the reply to {op!r} does not fit its schema: {validation_message(err, limit=3)}") from None
