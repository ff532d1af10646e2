"""Forward hooks that read (and optionally stop at) named modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def _capture(model: nn.Module, names: list[str], stop_after: str | None, inputs: bool) -> Iterator[dict]:
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def record(value) -> None:
            captured[name] = (value[0] if isinstance(value, tuple) else value).detach()
            if name == stop_after:
                raise _StopForward

        if inputs:
            return lambda module, args: record(args[0])
        return lambda module, args, output: record(output)

    try:
        for name in names:
            module = model.get_submodule(name)
            register = module.register_forward_pre_hook if inputs else module.register_forward_hook
            handles.append(register(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def capture_inputs(model: nn.Module, names: list[str], stop_after: str | None = None):
    """Record the first positional input of each named module into the yielded dict.

    With ``stop_after`` the forward pass is cut short once that module has been reached, so nothing
    above the last needed layer is computed; call the model through ``run_until``.
    """
    return _capture(model, names, stop_after, inputs=True)


def capture_outputs(model: nn.Module, names: list[str], stop_after: str | None = None):
    """Record the output tensor of each named module into the yielded dict (see ``capture_inputs``)."""
    return _capture(model, names, stop_after, inputs=False)


def run_until(model: nn.Module, **inputs) -> None:
    """Run ``model(**inputs)`` without gradients, tolerating a cut made by ``capture_inputs``."""
    inputs.setdefault("use_cache", False)
    with torch.no_grad():
        try:
            model(**inputs)
        except _StopForward:
            pass
