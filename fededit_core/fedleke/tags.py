"""Request tags: a keyed hash that lets the server match repeated requests without seeing them.

tag = HMAC-SHA256(secret, normalise(subject) | normalise(relation template) | normalise(target_new))

The federation secret is shared by the clients and never sent to the server, so the server can
tell that two clients asked for the same edit (and serve a stored z instead of a new optimisation)
but cannot test guesses of the text.

fact tag = HMAC-SHA256(secret, "fact" | normalise(subject) | normalise(relation template)), without the
object: equal fact tags under different request tags are two edits of one fact to different objects
(a conflict, CollabEdit's second challenge). Sent only when the run resolves conflicts.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from typing import Annotated

from pydantic import StringConstraints

from fededit_core.data.requests import EditRequest

TAG_PATTERN = r"^[0-9a-f]{64}$"  # a tag as it travels: 64 lower-case hex digits
Tag = Annotated[str, StringConstraints(pattern=TAG_PATTERN)]


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def request_tag(request: EditRequest, secret: bytes) -> str:
    return _keyed(secret, request.subject, request.prompt, request.target_new)


def fact_tag(request: EditRequest, secret: bytes) -> str:
    return _keyed(secret, "fact", request.subject, request.prompt)


def _keyed(secret: bytes, *parts: str) -> str:
    if len(secret) < 16:
        raise ValueError("the federation secret must be at least 16 bytes")
    message = "\x1f".join(normalise(x) for x in parts)
    return hmac.new(secret, message.encode("utf-8"), hashlib.sha256).hexdigest()
