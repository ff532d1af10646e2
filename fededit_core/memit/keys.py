"""Reading the model at the last subject token: MEMIT's keys k (inputs of W_out), h_L (block outputs)
and PMET's FFN outputs (outputs of W_out)."""

from __future__ import annotations

import torch

from fededit_core.data.requests import EditRequest
from fededit_core.memit.templates import ContextTemplates
from fededit_core.model.families import family_for
from fededit_core.model.hooks import capture_inputs, capture_outputs, run_until
from fededit_core.model.tokens import encode_with_subject, pad_right


def _template_rows(tok, requests: list[EditRequest], templates: ContextTemplates):
    seqs, lookup = [], []
    for request in requests:
        for template in templates.flat:
            ids, idx = encode_with_subject(tok, template.replace("{}", request.prompt, 1), request.subject)
            seqs.append(ids)
            lookup.append(idx)
    return seqs, torch.tensor(lookup)


def _read_at_subject(model, tok, seqs, lookup, name: str, inputs: bool, batch_size: int = 64) -> torch.Tensor:
    """The input (or output) of module ``name`` at each sequence's lookup position, float32 on CPU."""
    device = next(model.parameters()).device
    capture = capture_inputs if inputs else capture_outputs
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = pad_right(seqs[start : start + batch_size], tok.pad_token_id).to(device)
        with capture(model, [name], stop_after=name) as seen:
            run_until(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        idx = lookup[start : start + batch_size].to(device)
        out.append(seen[name][torch.arange(len(idx), device=device), idx].float().cpu())
    return torch.cat(out)


def compute_keys(model, tok, requests: list[EditRequest], layer: int, templates: ContextTemplates) -> torch.Tensor:
    """Template-averaged keys (n, d_ff) at ``layer``: inputs of W_out at the last subject token."""
    family = family_for(model)
    seqs, lookup = _template_rows(tok, requests, templates)
    keys = _read_at_subject(model, tok, seqs, lookup, family.edit_module_name(layer), inputs=True)
    weights = templates.group_weights()
    return (keys.view(len(requests), len(weights), -1) * weights[None, :, None]).sum(1)


def hidden_at_last_token(model, tok, requests: list[EditRequest], layer: int) -> torch.Tensor:
    """(n, d): output of block ``layer`` at the last token of each plain prompt, where the model has
    read the relation's words (the subject's last token, before them in many templates, has not)."""
    family = family_for(model)
    seqs = [tok(r.text)["input_ids"] for r in requests]
    lookup = torch.tensor([len(s) - 1 for s in seqs])
    return _read_at_subject(model, tok, seqs, lookup, f"{family.layers_path}.{layer}", inputs=False)


def hidden_at_subject(model, tok, requests: list[EditRequest], layer: int) -> torch.Tensor:
    """h_L (n, d): output of block ``layer`` at the last subject token of each plain prompt."""
    family = family_for(model)
    seqs, lookup = _template_rows(tok, requests, ContextTemplates.plain())
    return _read_at_subject(model, tok, seqs, lookup, f"{family.layers_path}.{layer}", inputs=False)


def ffn_output_at_subject(model, tok, requests: list[EditRequest], layer: int) -> torch.Tensor:
    """(n, d): output of W_out (the FFN's contribution) of block ``layer`` at the last subject token of
    each plain prompt: PMET's target site."""
    family = family_for(model)
    seqs, lookup = _template_rows(tok, requests, ContextTemplates.plain())
    return _read_at_subject(model, tok, seqs, lookup, family.edit_module_name(layer), inputs=False)
