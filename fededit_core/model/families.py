"""Model-family adapters: where the edited MLP projection, the layers, the final norm and the LM head live.

MEMIT edits the MLP output projection W_out (d_model x d_ff) of layer l: its input is the key k
(d_ff) and its output is added to the residual stream. ``Linear`` stores W_out as (d_model, d_ff);
GPT-2's ``Conv1D`` stores the transpose (d_ff, d_model), which ``transposed`` records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # the ModuleList of transformer blocks
    edit_module: str  # MLP output projection of block {}
    attn_out_module: str  # attention output projection of block {} (PMET's second target)
    base_model_path: str  # the decoder without LM head (applies the final norm)
    lm_head_path: str
    transposed: bool = False  # weight stored as (d_ff, d_model)

    def edit_module_name(self, layer: int) -> str:
        return self.edit_module.format(layer)

    def attn_out_module_name(self, layer: int) -> str:
        return self.attn_out_module.format(layer)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def edit_weight(self, model: nn.Module, layer: int) -> torch.nn.Parameter:
        """The edited weight as stored by the module."""
        return model.get_submodule(self.edit_module_name(layer)).weight

    def weight_matrix(self, model: nn.Module, layer: int) -> torch.Tensor:
        """W_out as a (d_model, d_ff) view, whatever the storage orientation."""
        weight = self.edit_weight(model, layer)
        return weight.T if self.transposed else weight

    def add_update(self, model: nn.Module, layer: int, delta: torch.Tensor) -> None:
        """W_out += delta, with delta given as (d_model, d_ff)."""
        weight = self.edit_weight(model, layer)
        with torch.no_grad():
            weight.add_((delta.T if self.transposed else delta).to(device=weight.device, dtype=weight.dtype))

    def base_model(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.base_model_path)

    def lm_head(self, model: nn.Module) -> nn.Module:
        # the module's name moves between transformers versions (GPT-NeoX: embed_out -> lm_head)
        head = model.get_output_embeddings()
        return head if head is not None else model.get_submodule(self.lm_head_path)


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
        layers_path="model.layers",
        edit_module="model.layers.{}.mlp.down_proj",
        attn_out_module="model.layers.{}.self_attn.o_proj",
        base_model_path="model",
        lm_head_path="lm_head",
    ),
    ModelFamily(
        name="gpt2",
        model_types=("gpt2",),
        layers_path="transformer.h",
        edit_module="transformer.h.{}.mlp.c_proj",
        attn_out_module="transformer.h.{}.attn.c_proj",
        base_model_path="transformer",
        lm_head_path="lm_head",
        transposed=True,
    ),
    ModelFamily(
        name="gptj",
        model_types=("gptj",),
        layers_path="transformer.h",
        edit_module="transformer.h.{}.mlp.fc_out",
        attn_out_module="transformer.h.{}.attn.out_proj",
        base_model_path="transformer",
        lm_head_path="lm_head",
    ),
    ModelFamily(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers_path="gpt_neox.layers",
        edit_module="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn_out_module="gpt_neox.layers.{}.attention.dense",
        base_model_path="gpt_neox",
        lm_head_path="lm_head",  # "embed_out" before transformers 5
    ),
)


class UnsupportedModelError(ValueError):
    pass


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model_or_type: nn.Module | str) -> ModelFamily:
    """The adapter for a model (or its ``config.model_type``); a clear error for anything else."""
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r}: fededit can edit {', '.join(supported_model_types())}"
    )


def model_dims(model: nn.Module) -> tuple[int, int, int]:
    """(number of layers, d_model, d_ff) read off the edited projection of layer 0."""
    family = family_for(model)
    d_model, d_ff = family.weight_matrix(model, 0).shape
    return len(family.layers(model)), d_model, d_ff
