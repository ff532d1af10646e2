"""Context templates: the prefixes MEMIT prepends to a prompt when it computes z and the keys.

They are data, not hidden randomness: sampled from the model with a seed, serialisable, and
accepted as input, so every party of a federation can use the same ones. Following the reference
code, group 0 is ``["{}"]`` and group 1 holds short sampled sentences ``"<text>. {}"``; keys are
averaged within each group, then over groups.
"""

from __future__ import annotations

import hashlib
import json

import torch
from pydantic import BaseModel, ConfigDict, field_validator

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


class ContextTemplates(BaseModel):
    model_config = ConfigDict(frozen=True)

    groups: tuple[tuple[str, ...], ...]
    seed: int | None = None

    @field_validator("groups")
    @classmethod
    def _each_has_slot(cls, groups):
        if not groups or any(not g for g in groups):
            raise ValueError("context templates need at least one non-empty group")
        for group in groups:
            for template in group:
                if template.count("{}") != 1:
                    raise ValueError(f'context template {template!r} must hold exactly one "{{}}"')
        return groups

    @property
    def flat(self) -> list[str]:
        return [t for g in self.groups for t in g]

    def group_weights(self) -> torch.Tensor:
        """Weight of each flat template so that sum(w_i x_i) = mean over groups of in-group means."""
        weights = [1.0 / (len(self.groups) * len(g)) for g in self.groups for _ in g]
        return torch.tensor(weights, dtype=torch.float32)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([list(g) for g in self.groups]).encode()).hexdigest()[:16]

    @classmethod
    def plain(cls) -> "ContextTemplates":
        return cls(groups=(("{}",),))


def sample_context_templates(
    model, tok, seed: int = 0, n_per_word: int = 1, length: int = 10, top_k: int = 5
) -> ContextTemplates:
    """``["{}"]`` plus ``n_per_word`` top-k samples of ``length`` tokens after each seed word."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    texts = []
    for word in SEED_WORDS:
        prompt = tok(word, return_tensors="pt")["input_ids"].repeat(n_per_word, 1)
        ids = prompt
        with torch.no_grad():
            for _ in range(length):
                logits = model(input_ids=ids.to(device), use_cache=False).logits[:, -1].float().cpu()
                top = torch.topk(logits, top_k, dim=-1)
                pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
                ids = torch.cat([ids, top.indices.gather(1, pick)], dim=1)
        for row in ids:
            text = tok.decode(row, skip_special_tokens=True)
            texts.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return ContextTemplates(groups=(("{}",), tuple(texts)), seed=seed)
