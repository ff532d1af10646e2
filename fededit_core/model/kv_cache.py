"""A forward's KV cache under the name the installed transformers gives it.

transformers 5.x renamed the argument and the output field ``past_key_values`` to ``cache`` (the old
name warns, and goes in 5.40); the project supports the releases on both sides of the rename.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.lru_cache(maxsize=None)
def _argument_of(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` to pass to ``model(...)``."""
    return {_argument_of(type(model)): cache}


def returned_cache(output):
    """The cache a forward with ``use_cache=True`` returned."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values
