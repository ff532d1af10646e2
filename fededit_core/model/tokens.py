"""Tokenising prompts and locating the last subject token (MEMIT's fact-lookup position)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right padded
    attention_mask: torch.Tensor  # (B, T)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))


def pad_right(sequences: list[list[int]], pad_id: int | None) -> Batch:
    """Right-pad to one width; ``pad_id`` None (a tokenizer without pad token, e.g. GPT-2's) pads
    with id 0, which is harmless: padded positions are masked out and come after every real token."""
    return _pad(sequences, pad_id, left=False)


def pad_left(sequences: list[list[int]], pad_id: int | None) -> Batch:
    """Left-pad to one width (generation: every row's last real token at the end)."""
    return _pad(sequences, pad_id, left=True)


def _pad(sequences: list[list[int]], pad_id: int | None, left: bool) -> Batch:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), 0 if pad_id is None else pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
    return Batch(ids, mask)


def encode_target(tok, target: str) -> list[int]:
    """Token ids of ``" " + target`` (no special tokens), as the metrics score it."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def encode_with_subject(tok, template: str, subject: str) -> tuple[list[int], int]:
    """Ids of ``template`` with ``{}`` filled by ``subject`` and the index of the subject's last token.

    The index is the token whose character span holds the subject's last character.
    """
    if template.count("{}") != 1:
        raise ValueError(f'template {template!r} needs exactly one "{{}}" for the subject')
    prefix = template[: template.index("{}")]
    text = template.replace("{}", subject)
    end_char = len(prefix) + len(subject)  # subject occupies [len(prefix), end_char)
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if start <= end_char - 1 < end:
                return enc["input_ids"], i
    ids = tok(text)["input_ids"]
    return ids, len(tok(text[:end_char])["input_ids"]) - 1
