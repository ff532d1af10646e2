"""Forward hooks that read (and optionally stop at) named modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: list[str], stop_after: str | None = None) -> Iterator[dict]:
    """Record the first positional input of each named module into the yielded dict.

    With ``stop_after`` the forward pass is cut short once that module has run (its input is kept),
    so nothing above the last needed layer is computed; call the model through ``run_until``.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args):
            captured[name] = args[0].detach()
            if name == stop_after:
                raise _StopForward

        return hook

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_pre_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: list[str], stop_after: str | None = None) -> Iterator[dict]:
    """Record the output tensor of each named module into the yielded dict (see ``capture_inputs``)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            captured[name] = (output[0] if isinstance(output, tuple) else output).detach()
            if name == stop_after:
                raise _StopForward

        return hook

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_until(model: nn.Module, **inputs) -> None:
    """Run ``model(**inputs)`` without gradients, tolerating a cut made by ``capture_inputs``."""
    inputs.setdefault("use_cache", False)
    with torch.no_grad():
        try:
            model(**inputs)
        except _StopForward:
            pass
