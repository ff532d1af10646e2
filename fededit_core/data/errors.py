"""Errors about input: a data file that cannot be read, and pydantic's errors as one readable line."""

from __future__ import annotations

from pydantic import ValidationError


class DataError(ValueError):
    """A data file that cannot be read as edit requests."""


def validation_message(exc: ValidationError, show_input: bool = False, limit: int | None = None) -> str:
    """``field: problem; field: problem`` (with the offending values when ``show_input``: only for a
    user's own terminal, never for a message that leaves the organisation); with ``limit``, the
    first ``limit`` problems and how many more there are."""
    parts = []
    errors = exc.errors()
    for err in errors[:limit]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if loc and show_input:
            msg = f"{msg} (got {err.get('input')!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (+{len(errors) - limit} more)" if limit is not None and len(errors) > limit else ""
    return "; ".join(parts) + more
