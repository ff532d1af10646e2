"""Where fededit keeps its caches: ``$FEDEDIT_CACHE``, else ``$XDG_CACHE_HOME/fededit``, else ``~/.cache/fededit``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import StringConstraints

# a run's or a client's name becomes one folder name: letters, digits, '.', '_', '-', no leading dot
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SafeName = Annotated[str, StringConstraints(pattern=f"^{SAFE_NAME.pattern}$")]  # the same rule, as a field type


def cache_dir(*parts: str) -> Path:
    """The cache root (or a sub-folder of it), created on first use."""
    root = os.environ.get("FEDEDIT_CACHE")
    if root:
        base = Path(root)
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]) / "fededit"
    else:
        base = Path.home() / ".cache" / "fededit"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the project checkout, when it exists (development and CI only)."""
    here = project_root()
    for candidate in (here.parent / "shared" / "data", here / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def project_root() -> Path:
    """The folder that holds this checkout's packages (the source tree or the installed site)."""
    return Path(__file__).resolve().parents[1]


def recorded_path(path: str | Path) -> str:
    """A data path as results record it: relative to the project when it lies in the project or
    beside it (``../shared/data/...``), else as given: never this machine's absolute layout."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    root = project_root()
    if path.resolve().is_relative_to(root.parent):
        return os.path.relpath(path.resolve(), root)
    return str(path)


def generations_path(state_dir: str | Path, run: str, client: str) -> Path:
    """Where a client keeps its before/after generations (text: never sent to the server)."""
    return Path(state_dir) / run / f"{client}.generations.json"


def safe_name(name: str, what: str = "name") -> str:
    """``name`` when it can only ever be one folder name (``SAFE_NAME``), else ValueError: a run or
    client name from the run config must not reach outside the state folder (``../victim``)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        shown = repr(name) if isinstance(name, str) and len(name) <= 100 else f"a {type(name).__name__}"
        raise ValueError(f"{what} {shown} is not a plain folder name (letters, digits, '.', '_', '-'; at most 100)")
    return name
