"""Where fededit keeps its caches: ``$FEDEDIT_CACHE``, else ``$XDG_CACHE_HOME/fededit``, else ``~/.cache/fededit``."""

from __future__ import annotations

import os
from pathlib import Path


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
    here = Path(__file__).resolve().parents[1]
    for candidate in (here.parent / "shared" / "data", here / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None
