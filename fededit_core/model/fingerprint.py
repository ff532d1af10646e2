"""Model fingerprint: proves that parties hold the same base model.

sha256 over the architecture, the shape-defining config fields and the weights of every editable
projection (rounded to bfloat16, so an fp32 and a bf16 copy of one model agree).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from fededit_core.model.families import family_for

CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "n_inner",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "vocab_size",
    "rotary_dim",
    "rms_norm_eps",
    "layer_norm_epsilon",
    "rope_theta",
    "rope_parameters",
    "tie_word_embeddings",
)


def model_fingerprint(model: nn.Module) -> str:
    family = family_for(model)
    config = model.config.to_dict()
    described = {"family": family.name, **{k: config[k] for k in CONFIG_FIELDS if k in config}}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    for layer in range(len(family.layers(model))):
        weight = family.weight_matrix(model, layer).detach()
        rounded = weight.to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(rounded.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:32]
