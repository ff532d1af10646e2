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
from fededit_core.memit.target import (
    REFERENCE_STOP_LOSS,
    ZResult,
    _cache_for,
    _prefix_kv,
    _replay_from,
    _split_rows,
    block_output_over_suffixes,
    build_rows,
)
from fededit_core.memit.templates import ContextTemplates
from fededit_core.model.families import family_for
from fededit_core.model.kv_cache import cache_kwargs

KL_STOP = 0.01  # compute_zs: with the target already the argmax, stop once KL <= this
NLL_FACTOR_AT_ARGMAX = 0.1  # compute_zs: the NLL's weight while the target is the argmax


def optimise_pmet_targets(
    model, tok, requests: list[EditRequest], hp: MEMITHyperParams, templates: ContextTemplates, progress: bool = True
) -> ZResult:
    """PMET's FFN targets z (n, d) and the FFN outputs before the edit h (n, d), ``hp.batch_size``
    requests at a time. Each request has its own two deltas, loss and stopping rule, so a group
    reaches what the reference's one-request loop reaches (Adam acts elementwise)."""
    start = time.perf_counter()
    zs, hs, steps, probs = [], [], [], []
    groups = range(0, len(requests), hp.batch_size)
    for first in tqdm(groups, desc="PMET targets", unit="group", disable=not progress, leave=False):
        z, h, s, p = _PmetGroup(model, tok, requests[first : first + hp.batch_size], hp, templates).run()
        zs.append(z), hs.append(h), steps.extend(s), probs.extend(p)
    d = family_for(model).weight_matrix(model, hp.z_layer).shape[0]
    empty = torch.zeros(0, d)
    return ZResult(
        torch.cat(zs) if zs else empty, torch.cat(hs) if hs else empty, steps, probs, time.perf_counter() - start
    )


class _PmetGroup:
    """One group's joint optimisation of the attention and FFN deltas at L (module docstring).

    As in ``memit.target.optimise_z``, each prompt is cut at the last subject token: its prefix never
    sees a delta, so its keys and values are computed once and reused, blocks 0..L-1 run once over the
    suffix and their output is replayed, and each step runs blocks L.. over the suffixes only
    (``replay``; with L = 0 every step is a full forward)."""

    def __init__(self, model, tok, requests: list[EditRequest], hp: MEMITHyperParams, templates: ContextTemplates):
        self.model, self.hp = model, hp
        self.family = family = family_for(model)
        self.device = device = next(model.parameters()).device
        self.sites = {"mlp": family.edit_module_name(hp.z_layer), "attn": family.attn_out_module_name(hp.z_layer)}
        self.base, self.lm_head = family.base_model(model), family.lm_head(model)
        self.rows = rows = build_rows(tok, requests, templates)
        self.n = rows.n_requests
        self.request = rows.request.to(device)
        self.first_row = torch.tensor([int(torch.nonzero(rows.request == r)[0]) for r in range(self.n)]).to(device)
        self.kl_rows = torch.nonzero(rows.is_kl).flatten().to(device)  # one per request, in request order
        self.rewrite_rows = (~rows.is_kl).to(device)
        d = family.weight_matrix(model, hp.z_layer).shape[0]
        self.deltas = {k: torch.zeros(self.n, d, device=device, requires_grad=True) for k in self.sites}
        self.init: dict[str, torch.Tensor] = {}
        self.replay = hp.z_layer > 0
        if self.replay:  # positions within the suffix, which starts at the last subject token
            self.split = _split_rows(rows, tok.pad_token_id).to(device)
            self.prefix_kv = _prefix_kv(self.base, self.split)
            self.full_mask = torch.cat([self.split.prefix_mask, self.split.suffix_mask], dim=1)
            self.cached, self.as_tuple = block_output_over_suffixes(  # blocks 0..L-1, once
                model, self.base, self.split, self.prefix_kv, self.full_mask, hp.z_layer - 1
            )
            self.at_subject = torch.zeros_like(rows.lookup).to(device)
            target_pos = rows.target_pos - rows.lookup[rows.target_row]
        else:
            self.ids, self.mask = rows.input_ids.to(device), rows.attention_mask.to(device)
            self.at_subject = rows.lookup.to(device)
            target_pos = rows.target_pos
        self.target = tuple(t.to(device) for t in (rows.target_row, target_pos, rows.target_tok))

    def _hook(self, kind: str):
        at = (torch.arange(len(self.at_subject), device=self.device), self.at_subject)

        def add_delta(module, args, output):
            if kind not in self.init:  # the first forward: delta = 0, the outputs before the edit
                self.init[kind] = output[self.first_row, self.at_subject[self.first_row]].detach().float().clone()
            return output.index_put(at, self.deltas[kind][self.request].to(output.dtype), accumulate=True)

        return add_delta

    def _hidden(self) -> torch.Tensor:
        if not self.replay:
            return self.base(input_ids=self.ids, attention_mask=self.mask).last_hidden_state
        with _replay_from(self.model, self.family, self.hp.z_layer - 1, self.as_tuple) as replay:
            replay.value = self.cached
            return self.base(
                input_ids=self.split.suffix_ids,
                attention_mask=self.full_mask,
                position_ids=self.split.suffix_pos,
                **cache_kwargs(self.base, _cache_for(self.prefix_kv, None)),
                use_cache=self.prefix_kv is not None,
            ).last_hidden_state

    def _terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per request: mean target NLL over its prompts, whether the target is the argmax everywhere, and
        the KL prompt's next-token log-probs."""
        hidden = self._hidden()
        row, pos, tok = self.target
        logp = torch.log_softmax(self.lm_head(hidden[row, pos]).float(), -1)
        token_lp = logp.gather(1, tok[:, None]).squeeze(1)
        argmax = (logp.argmax(-1) == tok).float()
        n_rows = len(self.at_subject)
        row_nll = torch.zeros(n_rows, device=self.device).index_add(0, row, -token_lp)
        row_miss = torch.zeros(n_rows, device=self.device).index_add(0, row, 1 - argmax)
        row_nll = row_nll / self.rows.target_len.to(self.device)[self.request]
        per = torch.zeros(self.n, device=self.device)
        count = per.index_add(0, self.request, self.rewrite_rows.float())
        nll = per.index_add(0, self.request, torch.where(self.rewrite_rows, row_nll, 0.0)) / count
        at_argmax = torch.zeros(self.n, device=self.device).index_add(0, self.request, row_miss) == 0
        kl_hidden = hidden[self.kl_rows, self.at_subject[self.kl_rows]]
        return nll, at_argmax, torch.log_softmax(self.lm_head(kl_hidden).float(), -1)

    def run(self) -> tuple[torch.Tensor, torch.Tensor, list[int], list[float]]:
        hp, n = self.hp, self.n
        optimiser = torch.optim.Adam(list(self.deltas.values()), lr=hp.v_lr)
        running = torch.ones(n, dtype=torch.bool, device=self.device)
        final = torch.zeros_like(self.deltas["mlp"])
        nll_factor = torch.ones(n, device=self.device)
        steps, probs = [hp.v_steps - 1] * n, [0.0] * n
        kl_init = None
        handles = [
            self.model.get_submodule(name).register_forward_hook(self._hook(k)) for k, name in self.sites.items()
        ]
        try:
            for step in range(hp.v_steps):
                nll, at_argmax, kl_logp = self._terms()
                if kl_init is None:
                    kl_init = kl_logp.detach().clone()
                kl = hp.kl_factor * (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
                decay = sum(self.deltas[k].norm(dim=1) / self.init[k].norm(dim=1) ** 2 for k in self.sites)
                loss = nll_factor * nll + kl + hp.v_weight_decay * decay
                stop = running & (
                    (loss < REFERENCE_STOP_LOSS) | (at_argmax & (kl <= KL_STOP)) | (step == hp.v_steps - 1)
                )
                for r in torch.nonzero(stop).flatten().tolist():  # each keeps the delta it was judged with
                    final[r], steps[r], probs[r] = (
                        self.deltas["mlp"][r].detach(),
                        step,
                        float(torch.exp(-nll[r].detach())),
                    )
                running = running & ~stop
                if not bool(running.any()):
                    break
                nll_factor = torch.where(at_argmax, NLL_FACTOR_AT_ARGMAX, 1.0)
                optimiser.zero_grad()
                loss[running].sum().backward()
                optimiser.step()
                with torch.no_grad():
                    for k, delta in self.deltas.items():
                        max_norm = hp.clamp_norm_factor * self.init[k].norm(dim=1)
                        delta.mul_(torch.clamp(max_norm / delta.norm(dim=1).clamp_min(1e-12), max=1.0)[:, None])
        finally:
            for handle in handles:
                handle.remove()
        return (self.init["mlp"] + final).cpu(), self.init["mlp"].cpu(), steps, probs
