"""PMET (Li et al., AAAI 2024): optimise the hidden states of both the attention (MHSA) and the FFN
output at the critical layer L, then write only the FFN weights, towards the FFN target.

Targets, per request (xpq-tech/PMET ``edit/pmet/compute_zs.py``, ``compute_zs``): two deltas, one
added to the output of L's attention output projection and one to the output of L's W_out, at the
last subject token of every prompt (the MEMIT prompts: context templates + relation, and the KL
prompt); Adam on

    loss = f * NLL(target) + kl_factor * KL + wd * (|d_mlp| / |m_0|^2 + |d_attn| / |a_0|^2)

with m_0, a_0 the outputs at the first prompt before the edit, each delta clamped to
clamp_norm_factor times its |m_0| or |a_0|; it stops once loss < 5e-2, f drops to 0.1 while the
target is already the most likely token everywhere (and it stops then if KL <= 0.01), and the FFN
target is z = m_0 + d_mlp. The attention target is not written.

Layer update (``edit/pmet/pmet_main.py``, ``execute_pmet``): for each edited layer i, on the partly
edited model, R = (z - FFN output of L at the plain prompt) / sqrt(layers left) and MEMIT's
Delta = R K^T (lambda C0 + K K^T)^-1 (``fededit_core.memit.rules``).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from fededit_core.data.requests import EditRequest
from fededit_core.memit.hparams import MEMITHyperParams
from fededit_core.memit.target import REFERENCE_STOP_LOSS, ZResult, build_rows
from fededit_core.memit.templates import ContextTemplates
from fededit_core.model.families import family_for

KL_STOP = 0.01  # compute_zs: with the target already the argmax, stop once KL <= this
NLL_FACTOR_AT_ARGMAX = 0.1  # compute_zs: the NLL's weight while the target is the argmax


def optimise_pmet_targets(
    model, tok, requests: list[EditRequest], hp: MEMITHyperParams, templates: ContextTemplates, progress: bool = True
) -> ZResult:
    """PMET's FFN targets z (n, d) and the FFN outputs before the edit h (n, d), one request at a time."""
    family = family_for(model)
    device = next(model.parameters()).device
    sites = {"mlp": family.edit_module_name(hp.z_layer), "attn": family.attn_out_module_name(hp.z_layer)}
    d = family.weight_matrix(model, hp.z_layer).shape[0]
    start = time.perf_counter()
    zs, hs, steps, probs = [], [], [], []
    for request in tqdm(requests, desc="PMET targets", unit="req", disable=not progress, leave=False):
        rows = build_rows(tok, [request], templates)
        ids, mask, lookup = rows.input_ids.to(device), rows.attention_mask.to(device), rows.lookup.to(device)
        at = (torch.arange(len(lookup), device=device), lookup)
        deltas = {k: torch.zeros(d, device=device, requires_grad=True) for k in sites}
        init: dict[str, torch.Tensor] = {}
        optimiser = torch.optim.Adam(list(deltas.values()), lr=hp.v_lr)

        def hook_for(kind: str):
            def add_delta(module, args, output):
                if kind not in init:
                    init[kind] = output[0, lookup[0]].detach().clone().float()
                return output.index_put(at, deltas[kind].to(output.dtype).expand(len(lookup), -1), accumulate=True)

            return add_delta

        handles = [model.get_submodule(name).register_forward_hook(hook_for(k)) for k, name in sites.items()]
        nll_factor, kl_init = 1.0, None
        try:
            for step in range(hp.v_steps):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                logp = torch.log_softmax(logits, -1)
                pos = (rows.target_row.to(device), rows.target_pos.to(device))
                token_lp = logp[pos[0], pos[1], rows.target_tok.to(device)]
                n_rows = int((~rows.is_kl).sum())
                nll_each = -token_lp.view(n_rows, -1).sum(1) / rows.target_len[0]
                at_argmax = bool((logp[pos].argmax(-1) == rows.target_tok.to(device)).all())
                kl_row = int(torch.nonzero(rows.is_kl)[0])
                kl_logp = logp[kl_row, lookup[kl_row]]
                if kl_init is None:
                    kl_init = kl_logp.detach().clone()
                kl = hp.kl_factor * (kl_logp.exp() * (kl_logp - kl_init)).sum()
                decay = sum(deltas[k].norm() / init[k].norm() ** 2 for k in sites)
                loss = nll_factor * nll_each.mean() + kl + hp.v_weight_decay * decay
                if loss < REFERENCE_STOP_LOSS or (at_argmax and kl <= KL_STOP) or step == hp.v_steps - 1:
                    break
                nll_factor = NLL_FACTOR_AT_ARGMAX if at_argmax else 1.0
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    for k, delta in deltas.items():
                        max_norm = hp.clamp_norm_factor * init[k].norm()
                        if delta.norm() > max_norm:
                            delta.mul_(max_norm / delta.norm())
        finally:
            for handle in handles:
                handle.remove()
        zs.append((init["mlp"] + deltas["mlp"].detach()).cpu())
        hs.append(init["mlp"].cpu())
        steps.append(step)
        probs.append(float(torch.exp(-nll_each.detach()).mean()))
    return ZResult(torch.stack(zs), torch.stack(hs), steps, probs, time.perf_counter() - start)
