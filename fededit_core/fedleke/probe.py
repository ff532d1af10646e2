"""The probe gate: does an incoming MKV change the answer to one of the receiver's own questions?

Eq. 8 compares vectors; on relation-partitioned CounterFact no cosine of z, delta or the keys tells
an edit of the receiver's relation from another (README, "Why the gate keeps nothing here"): the
keys are read before the relation's words and z, delta share one dominant direction. The probe asks
the model instead, with the receiver's own text, which never leaves it. For an own request i (its
plain prompt, subject's last token at position p_i) and an incoming MKV j (z_j, h_j = z_j - delta_j),
write h_j, then z_j, into block L's output at p_i and compare the next-token distributions at the
prompt's end:

    s_ij = KL( p(. | prompt_i, z_j at p_i) || p(. | prompt_i, h_j at p_i) )           (nats)

Only the edit j's delta differs between the two runs, seen through the receiver's relation. The
rule rests on the hope that an edit of that relation moves the answer (s_ij large) and an edit of
another relation mostly leaves it (s_ij small); on SmolLM2-135M and the benchmark's CounterFact
workload it does not hold: delta moves every answer about the subject by about a nat or more
(README, "Why the gate keeps nothing here"). The rule keeps MKV j on its own when

    keep(j) = max_i s_ij > tau                    (i over the receiver's own relation prompts so far)

Own requests of one relation template are probed once (the first of them): the question is the
relation, so more subjects of one template add cost without information.
"""

from __future__ import annotations

import torch

from fededit_core.data.requests import EditRequest
from fededit_core.model.families import family_for
from fededit_core.model.tokens import encode_with_subject, pad_right

DEFAULT_PROBE_TAU = 1.0  # nats; no tau separates on the benchmark (README, "Why the gate keeps nothing here")
MAX_PROBE_TAU = 100.0  # the largest threshold a run config or an instruction may carry
PROBE_BATCH = 64  # rows (prompt, vector) per forward pass


def probe_requests(requests: list[EditRequest]) -> list[EditRequest]:
    """One own request per relation template, in order of first appearance."""
    seen, out = set(), []
    for r in requests:
        if r.prompt not in seen:
            seen.add(r.prompt)
            out.append(r)
    return out


def _next_token_logp(model, tok, seqs, positions, vectors, layer: int) -> torch.Tensor:
    """log p(next token | seq) at each sequence's end, with ``vectors[r]`` written as block ``layer``'s
    output at ``positions[r]`` of row r; (rows, vocab) float32."""
    family = family_for(model)
    device = next(model.parameters()).device
    batch = pad_right(seqs, tok.pad_token_id).to(device)
    rows = torch.arange(len(seqs), device=device)
    pos = torch.as_tensor(positions, device=device)

    def write(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.index_put((rows, pos), vectors.to(device=device, dtype=hidden.dtype))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = family.layers(model)[layer].register_forward_hook(write)
    try:
        with torch.no_grad():
            out = family.base_model(model)(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            )
            last = batch.attention_mask.sum(1) - 1
            final = out.last_hidden_state[rows, last]
            return torch.log_softmax(family.lm_head(model)(final).float(), -1).cpu()
    finally:
        handle.remove()


def probe_divergence(
    model, tok, own: list[EditRequest], z: torch.Tensor, delta: torch.Tensor, layer: int, batch_size: int = PROBE_BATCH
) -> torch.Tensor:
    """s (n_own, m): KL(p(. | own prompt i, z_j) || p(. | own prompt i, h_j)) in nats (module docstring)."""
    if z.ndim != 2 or tuple(delta.shape) != tuple(z.shape):
        raise ValueError(f"z and delta must be (m, d) alike, got {tuple(z.shape)} and {tuple(delta.shape)}")
    n, m = len(own), len(z)
    if not n or not m:
        return torch.zeros(n, m)
    prompts = [encode_with_subject(tok, r.prompt, r.subject) for r in own]
    h = z - delta
    pairs = [(i, j) for i in range(n) for j in range(m)]
    out = torch.empty(len(pairs))
    step = max(1, batch_size // 2)
    for first in range(0, len(pairs), step):
        chunk = pairs[first : first + step]
        seqs = [prompts[i][0] for i, _ in chunk] * 2
        positions = [prompts[i][1] for i, _ in chunk] * 2
        js = torch.tensor([j for _, j in chunk])
        logp = _next_token_logp(model, tok, seqs, positions, torch.cat([z[js], h[js]]), layer)
        with_z, with_h = logp[: len(chunk)], logp[len(chunk) :]
        out[first : first + len(chunk)] = (with_z.exp() * (with_z - with_h)).sum(-1).clamp_min(0)
    return out.view(n, m)


def probe_keep(divergence: torch.Tensor, tau: float) -> torch.Tensor:
    """(m,) bool: keep(j) = max_i s_ij > tau; all False when the receiver has no own prompt."""
    if divergence.ndim != 2:
        raise ValueError(f"divergence must be (n_own, m), got {tuple(divergence.shape)}")
    if divergence.shape[0] == 0:
        return torch.zeros(divergence.shape[1], dtype=torch.bool)
    return divergence.max(dim=0).values > tau
