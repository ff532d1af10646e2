"""Building an editor from a model spec: model, tokenizer, hyperparameters, templates and C0 store."""

from __future__ import annotations

import torch

from .families import family_for
from .hparams import MEMITHyperParams, default_hparams
from .memit import MemitEditor
from .models import load_model
from .templates import ContextTemplates


def configure_threads() -> None:
    """Use every core for intra-op parallelism on CPU (torch's default can be lower in containers),
    unless ``OMP_NUM_THREADS`` sets the number (torch has applied it already: it is left alone)."""
    import os

    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores))


def hparams_for(model, **overrides) -> MEMITHyperParams:
    """The defaults for this model's family (and for this very model when known), with overrides."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return default_hparams(family_for(model).name, model.config,
                           n_layers=model.config.num_hidden_layers, **overrides)


def make_editor(model_spec: str, device: str = "cpu", dtype: str = "fp32",
                templates: ContextTemplates | None = None, **hp_overrides) -> MemitEditor:
    configure_threads()
    model, tok = load_model(model_spec, device=device, dtype=dtype)
    return MemitEditor(model, tok, hparams_for(model, **hp_overrides), templates=templates)
