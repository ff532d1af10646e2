"""MEMIT hyperparameters: one validated object, with per-family defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fededit_core.memit.nullspace import DEFAULT_ALPHAEDIT_L2, DEFAULT_NULLSPACE_THRESHOLD

EDITORS = ("memit", "alphaedit", "pmet")
DEFAULT_EDITOR = "memit"


class MEMITHyperParams(BaseModel):
    """Settings of Meng et al. (2023), Eq. 14-16, and of the z optimisation (Sec. 4.2); ``editor``
    picks the closed-form layer update: MEMIT's, or AlphaEdit's (``memit.nullspace``) with its own two."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    editor: Literal[EDITORS] = Field(DEFAULT_EDITOR, description="memit | alphaedit | pmet")  # type: ignore[valid-type]
    nullspace_threshold: float = Field(
        DEFAULT_NULLSPACE_THRESHOLD, gt=0, description="alphaedit: C0's eigenvalues below it span the null space"
    )
    alphaedit_l2: float = Field(
        DEFAULT_ALPHAEDIT_L2, gt=0, description="alphaedit: L2 in (P (K K^T + K_p K_p^T) + L2 I)"
    )

    layers: tuple[int, ...] = Field(description="edited layers R; z lives at L = max(R)")
    mom2_weight: float = Field(15000.0, gt=0, description="lambda in (lambda C0 + K K^T)")
    v_lr: float = Field(0.5, gt=0)
    v_steps: int = Field(25, ge=1)
    v_weight_decay: float = Field(1e-3, ge=0)
    clamp_norm_factor: float = Field(4.0, gt=0, description="|delta| <= factor * |h_L|")
    kl_factor: float = Field(0.0625, ge=0)
    stop_prob: float = Field(
        0.95, gt=0, le=1.0, description="a request stops once exp(-mean target-token NLL) exceeds this"
    )
    stop_on: Literal["target_prob", "total_loss"] = Field(
        "target_prob",
        description="a request stops when exp(-NLL) > stop_prob, or (the reference code's rule, "
        "kmeng01/memit memit/compute_z.py line 162) when NLL + KL + weight decay < 5e-2",
    )
    batch_size: int = Field(32, ge=1, description="requests optimised together")
    autocast: str | None = Field(None, description="bf16/fp16 autocast of the z optimisation, or None")
    cov_source: str = Field("self", description="'self' (sampled from the model), a text file, or hf:<dataset>")
    cov_samples: int = Field(400, ge=1, description="sequences of cov_seq_len tokens")
    cov_seq_len: int = Field(64, ge=2)
    template_seed: int = 0

    @model_validator(mode="after")
    def _layers_ok(self):
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        if list(self.layers) != sorted(set(self.layers)) or min(self.layers) < 0:
            raise ValueError(f"layers must be distinct, ascending and >= 0, got {list(self.layers)}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {self.autocast!r}")
        return self

    @property
    def z_layer(self) -> int:
        return self.layers[-1]

    def check_model(self, n_layers: int) -> None:
        if self.layers[-1] >= n_layers:
            raise ValueError(f"layers {list(self.layers)} exceed the model's {n_layers} layers")


# Starting points: the published settings (MEMIT repo / EasyEdit) and, for SmolLM2, our sweep.
FAMILY_DEFAULTS: dict[str, dict] = {
    "gptj": dict(
        layers=(3, 4, 5, 6, 7, 8),
        mom2_weight=15000.0,
        v_lr=0.5,
        v_weight_decay=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
    ),
    "gpt2": dict(
        layers=(13, 14, 15, 16, 17),
        mom2_weight=20000.0,
        v_lr=0.5,
        v_weight_decay=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
    ),
    "gpt_neox": dict(
        layers=(3, 4, 5, 6, 7, 8),
        mom2_weight=15000.0,
        v_lr=0.5,
        v_weight_decay=0.5,
        clamp_norm_factor=0.75,
        kl_factor=0.0625,
    ),
    "llama": dict(
        layers=(4, 5, 6, 7, 8),
        mom2_weight=15000.0,
        v_lr=0.5,
        v_weight_decay=1e-3,
        clamp_norm_factor=4.0,
        kl_factor=0.0625,
    ),
}

# Known models, recognised by (model_type, hidden_size, num_hidden_layers, intermediate_size).
SMOLLM2_135M = ("llama", 576, 30, 1536)
MODEL_DEFAULTS: dict[tuple, dict] = {
    # SmolLM2-135M: chosen by `python -m bench.sweep_smollm2` (README, "SmolLM2 sweep")
    SMOLLM2_135M: dict(layers=(4, 5, 6, 7, 8), mom2_weight=5000.0),
}


# Per editor, over the family's defaults: PMET's own z optimisation and lambda, as published
# (xpq-tech/PMET edit/hparams/PMET/EleutherAI_gpt-j-6B.json; its nll_loss_factor 1 is memit.pmet's).
EDITOR_DEFAULTS: dict[str, dict] = {
    "pmet": dict(v_lr=0.2, v_steps=30, kl_factor=1.0, v_weight_decay=0.5, clamp_norm_factor=0.75, mom2_weight=6000.0),
}


# Per known model and editor, over all of the above: SmolLM2-135M's PMET settings, chosen by
# `python -m bench.sweep_editors` (README, "Editor sweep"); AlphaEdit's published ones won there.
MODEL_EDITOR_DEFAULTS: dict[tuple[tuple, str], dict] = {
    (SMOLLM2_135M, "pmet"): dict(clamp_norm_factor=4.0, mom2_weight=1000.0),
}


def model_signature(config) -> tuple:
    return (
        config.model_type,
        getattr(config, "hidden_size", None),
        getattr(config, "num_hidden_layers", None),
        getattr(config, "intermediate_size", None),
    )


def default_hparams(family: str, config=None, n_layers: int | None = None, **overrides) -> MEMITHyperParams:
    """Defaults for a family (and a known model, given its config), then for the editor named in
    ``overrides`` (and that editor on that model), scaled down for models with few layers."""
    editor = overrides.get("editor", DEFAULT_EDITOR)
    signature = model_signature(config) if config is not None else None
    settings = dict(FAMILY_DEFAULTS.get(family, FAMILY_DEFAULTS["llama"]))
    settings.update(MODEL_DEFAULTS.get(signature, {}))
    settings.update(EDITOR_DEFAULTS.get(editor, {}))
    settings.update(MODEL_EDITOR_DEFAULTS.get((signature, editor), {}))
    if n_layers is not None and max(settings["layers"]) >= n_layers:
        settings["layers"] = tuple(range(max(0, n_layers // 2 - 1), n_layers // 2 + 1))
    settings.update(overrides)
    return MEMITHyperParams(**settings)
