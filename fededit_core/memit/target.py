"""MEMIT's target vectors z = h_L + delta (Meng et al. 2023, Eq. 16; the reference code's compute_z).

For each request, delta is added to the hidden state after layer L at the last subject token of
every prompt (each context template followed by the target's first tokens, plus the KL prompt
``"{} is a"``) and optimised with Adam on

    loss = mean_templates NLL(target | prompt)            (per target token)
         + kl_factor * KL(p_delta || p_0) on "{} is a"    (at the subject's last token)
         + weight_decay * |delta| / |h_L|^2

with |delta| clamped to clamp_norm_factor * |h_L|.

``optimise_z`` does this for a batch of requests at once and cheaply per step. Each prompt is cut
at the last subject token: the prefix before it never sees delta, so its keys/values are computed
once for every block and reused as a KV cache; blocks 0..L run once over the suffix and their
output is replayed with delta injected; each step runs only the blocks above L over the suffix
tokens, in length-sorted chunks. Logits are computed only at the target and KL positions,
converged requests leave the batch, and bf16/fp16 autocast is available. ``optimise_z_reference`` is the one-request-at-a-time loop of the reference code (full
forward, full logits, stop on total loss < 5e-2), kept as the speed baseline.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fededit_core.data.requests import EditRequest
from fededit_core.memit.hparams import MEMITHyperParams
from fededit_core.memit.templates import ContextTemplates
from fededit_core.model.families import ModelFamily, family_for
from fededit_core.model.hooks import capture_outputs, run_until
from fededit_core.model.kv_cache import cache_kwargs, returned_cache
from fededit_core.model.tokens import encode_target, encode_with_subject, pad_right

KL_PROMPT = "{} is a"
N_CHUNKS = 3  # rows of one step go through the network in this many length-sorted chunks
REFERENCE_STOP_LOSS = 5e-2  # kmeng01/memit memit/compute_z.py line 162: stop once the total loss is below it


@dataclass
class ZRows:
    """All prompts of a group of requests, right padded, with where to inject and what to predict."""

    input_ids: torch.Tensor  # (rows, T)
    attention_mask: torch.Tensor
    lookup: torch.Tensor  # (rows,) last subject token
    request: torch.Tensor  # (rows,) request index within the group
    is_kl: torch.Tensor  # (rows,) bool
    target_row: torch.Tensor  # (n_target_tokens,) row of each target token
    target_pos: torch.Tensor  # position whose logits predict it
    target_tok: torch.Tensor
    target_len: torch.Tensor  # (requests,) tokens in each request's target
    n_requests: int

    def rows_of(self, requests: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(torch.isin(self.request, requests)).flatten()


def build_rows(tok, requests: list[EditRequest], templates: ContextTemplates) -> ZRows:
    seqs, lookup, req_of_row, is_kl = [], [], [], []
    t_row, t_pos, t_tok, t_len = [], [], [], []
    for r, request in enumerate(requests):
        target = encode_target(tok, request.target_new)
        t_len.append(len(target))
        for template in templates.flat:
            ids, idx = encode_with_subject(tok, template.replace("{}", request.prompt, 1), request.subject)
            row = len(seqs)
            seqs.append(ids + target[:-1])
            lookup.append(idx)
            req_of_row.append(r)
            is_kl.append(False)
            for j, token in enumerate(target):
                t_row.append(row)
                t_pos.append(len(ids) - 1 + j)
                t_tok.append(token)
        ids, idx = encode_with_subject(tok, KL_PROMPT, request.subject)
        seqs.append(ids[: idx + 1])  # the KL term reads the last subject token: nothing after it matters
        lookup.append(idx)
        req_of_row.append(r)
        is_kl.append(True)
    batch = pad_right(seqs, tok.pad_token_id)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return ZRows(
        batch.input_ids,
        batch.attention_mask,
        as_long(lookup),
        as_long(req_of_row),
        torch.tensor(is_kl),
        as_long(t_row),
        as_long(t_pos),
        as_long(t_tok),
        as_long(t_len),
        len(requests),
    )


@dataclass
class ZResult:
    z: torch.Tensor  # (n, d) target hidden state at layer L
    h: torch.Tensor  # (n, d) hidden state at layer L before the edit (the "{}" template)
    steps: list[int] = field(default_factory=list)  # optimisation steps per request
    target_prob: list[float] = field(default_factory=list)  # exp(-mean target NLL) at the end
    seconds: float = 0.0

    @property
    def delta(self) -> torch.Tensor:
        return self.z - self.h


class _Passthrough(nn.Module):
    """Stands in for a frozen block below L: its output is replayed from the cache instead."""

    def __init__(self, as_tuple: bool = False):
        super().__init__()
        self.as_tuple = as_tuple  # some blocks (GPT-J) return (hidden_states, ...)

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class _Replay(nn.Module):
    """Stands in for block L: returns the cached output of blocks 0..L with delta injected."""

    def __init__(self, as_tuple: bool = False):
        super().__init__()
        self.value: torch.Tensor | None = None
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (self.value,) if self.as_tuple else self.value


@contextlib.contextmanager
def _replay_from(model: nn.Module, family: ModelFamily, layer: int, as_tuple: bool = False):
    """Temporarily replace blocks 0..layer so that a forward starts from a cached hidden state."""
    blocks = family.layers(model)
    originals = [blocks[i] for i in range(layer + 1)]
    replay = _Replay(as_tuple)
    try:
        for i in range(layer):
            blocks[i] = _Passthrough(as_tuple)
        blocks[layer] = replay
        yield replay
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def _chunk_terms(
    rows: ZRows,
    chunk_rows: torch.Tensor,
    chunk_req: torch.Tensor,
    n_active: int,
    hidden: torch.Tensor,
    lm_head: nn.Module,
):
    """Loss terms of one chunk of rows from its final hidden states (logits only where needed).

    Returns the per-request sum over rewriting rows of each row's mean target-token NLL, the number of
    such rows per request, and the next-token log-probs at the KL rows with their requests.
    """
    device = hidden.device
    row_map = torch.full((rows.input_ids.shape[0],), -1, dtype=torch.long)
    row_map[chunk_rows] = torch.arange(len(chunk_rows))
    keep = row_map[rows.target_row] >= 0
    t_local = row_map[rows.target_row[keep]].to(device)
    logits = lm_head(hidden[t_local, rows.target_pos[keep].to(device)]).float()
    token_lp = torch.log_softmax(logits, -1).gather(1, rows.target_tok[keep].to(device)[:, None])[:, 0]
    row_req = chunk_req.to(device)
    tok_len = rows.target_len[rows.request[rows.target_row[keep]]].to(device).float()
    nll_sum = torch.zeros(n_active, device=device).index_add(0, row_req[t_local], -token_lp / tok_len)
    is_kl = rows.is_kl[chunk_rows].to(device)
    n_rows = torch.zeros(n_active, device=device).index_add(
        0, row_req[~is_kl], torch.ones(int((~is_kl).sum()), device=device)
    )
    kl_rows = torch.nonzero(is_kl).flatten()
    kl_lookup = rows.lookup[chunk_rows][kl_rows.cpu()].to(device)
    kl_logp = torch.log_softmax(lm_head(hidden[kl_rows, kl_lookup]).float(), -1)
    return nll_sum, n_rows, row_req[kl_rows], kl_logp


def target_prob_with_z(
    model: nn.Module,
    tok,
    requests: list[EditRequest],
    z: torch.Tensor,
    hp: MEMITHyperParams,
    templates: ContextTemplates,
) -> torch.Tensor:
    """exp(-mean NLL of the target) over the same prompts as the optimisation, with the given z
    written at layer L's last subject token and no optimisation: what ``optimise_z`` compares
    with ``stop_prob`` (a receiver checks a z it did not compute with it)."""
    probs = []
    for first in range(0, len(requests), hp.batch_size):
        group = _GroupOptimiser(model, tok, requests[first : first + hp.batch_size], hp, templates)
        probs.append(group.prob_of(z[first : first + hp.batch_size]))
    return torch.cat(probs) if probs else torch.zeros(0)


def optimise_z(
    model: nn.Module,
    tok,
    requests: list[EditRequest],
    hp: MEMITHyperParams,
    templates: ContextTemplates,
    progress: bool = True,
) -> ZResult:
    """Batched z optimisation (see module docstring); requests go ``hp.batch_size`` at a time."""
    start = time.perf_counter()
    zs, hs, steps, probs = [], [], [], []
    bar = tqdm(total=len(requests), desc="optimising z", unit="req", disable=not progress, leave=False)
    for first in range(0, len(requests), hp.batch_size):
        group = requests[first : first + hp.batch_size]
        z, h, s, p = _GroupOptimiser(model, tok, group, hp, templates).run()
        zs.append(z), hs.append(h), steps.extend(s), probs.extend(p)
        bar.update(len(group))
    bar.close()
    return ZResult(torch.cat(zs), torch.cat(hs), steps, probs, time.perf_counter() - start)


@dataclass
class _SplitRows:
    """Rows cut at the injection point: a left-padded prefix (before the last subject token, never
    affected by delta, so its keys/values are cached once) and a right-padded suffix (recomputed)."""

    prefix_ids: torch.Tensor  # (R, P)
    prefix_mask: torch.Tensor
    prefix_pos: torch.Tensor
    suffix_ids: torch.Tensor  # (R, S); column 0 is the last subject token
    suffix_mask: torch.Tensor
    suffix_pos: torch.Tensor

    def to(self, device) -> "_SplitRows":
        return _SplitRows(*(t.to(device) for t in vars(self).values()))


def _split_rows(rows: ZRows, pad_id: int | None) -> _SplitRows:
    pad_id = 0 if pad_id is None else pad_id  # no pad token (GPT-2): any id, padding is masked
    lengths = rows.attention_mask.sum(1)
    prefix_len, suffix_len = rows.lookup, lengths - rows.lookup
    n_rows, width_p, width_s = len(lengths), int(prefix_len.max()), int(suffix_len.max())
    out = [
        torch.full((n_rows, width_p), pad_id),
        torch.zeros(n_rows, width_p, dtype=torch.long),
        torch.ones(n_rows, width_p, dtype=torch.long),
        torch.full((n_rows, width_s), pad_id),
        torch.zeros(n_rows, width_s, dtype=torch.long),
        torch.ones(n_rows, width_s, dtype=torch.long),
    ]
    for r in range(n_rows):
        p, s = int(prefix_len[r]), int(suffix_len[r])
        if p:
            out[0][r, width_p - p :] = rows.input_ids[r, :p]
            out[1][r, width_p - p :] = 1
            out[2][r, width_p - p :] = torch.arange(p)
        out[3][r, :s] = rows.input_ids[r, p : p + s]
        out[4][r, :s] = 1
        out[5][r, :s] = torch.arange(p, p + s)
    return _SplitRows(*out)


def _prefix_kv(base: nn.Module, split: _SplitRows) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Keys and values of every layer over the prefixes, computed once."""
    if split.prefix_ids.shape[1] == 0:
        return None
    with torch.no_grad():
        out = base(
            input_ids=split.prefix_ids, attention_mask=split.prefix_mask, position_ids=split.prefix_pos, use_cache=True
        )
    return [(layer.keys, layer.values) for layer in returned_cache(out).layers]


def _cache_for(kv, index: torch.Tensor | None):
    from transformers import DynamicCache

    if kv is None:
        return None
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k if index is None else k[index], v if index is None else v[index], i)
    return cache


def block_output_over_suffixes(
    model: nn.Module, base: nn.Module, split: _SplitRows, prefix_kv, full_mask: torch.Tensor, layer: int
) -> tuple[torch.Tensor, bool]:
    """Block ``layer``'s output over the suffixes (blocks 0..layer run once, the prefixes from their KV
    cache) and whether the block returns a tuple (what ``_replay_from`` must return in its place)."""
    name = f"{family_for(model).layers_path}.{layer}"
    as_tuple: dict = {}

    def note_kind(module, args, output) -> None:  # returns None: leaves the output alone
        as_tuple["tuple"] = isinstance(output, tuple)

    handle = model.get_submodule(name).register_forward_hook(note_kind)
    try:
        with torch.no_grad(), capture_outputs(model, [name], stop_after=name) as seen:
            run_until(
                base,
                input_ids=split.suffix_ids,
                attention_mask=full_mask,
                position_ids=split.suffix_pos,
                **cache_kwargs(base, _cache_for(prefix_kv, None)),
                use_cache=prefix_kv is not None,
            )
    finally:
        handle.remove()
    return seen[name], as_tuple["tuple"]


class _GroupOptimiser:
    """The batched z optimisation of one group of requests (module docstring): set up once, then ``run``."""

    def __init__(
        self, model: nn.Module, tok, requests: list[EditRequest], hp: MEMITHyperParams, templates: ContextTemplates
    ):
        """Cuts the group's rows at the last subject token and computes once what delta never changes."""
        self.model, self.hp = model, hp
        self.family = family_for(model)
        self.device = next(model.parameters()).device
        self.rows = rows = build_rows(tok, requests, templates)
        self.n = n = rows.n_requests
        self.base, self.lm_head = self.family.base_model(model), self.family.lm_head(model)
        self.split = _split_rows(rows, tok.pad_token_id).to(self.device)
        self.prefix_kv = _prefix_kv(self.base, self.split)  # the prefixes never change: through every block once
        self.full_mask = torch.cat([self.split.prefix_mask, self.split.suffix_mask], dim=1)
        self.prefix_width = self.split.prefix_ids.shape[1]
        self.suffix_len = self.split.suffix_mask.sum(1).cpu()
        self.cached, self.as_tuple = self._blocks_to_layer()  # (R, S, d): block L's output over the suffixes
        suffix_target_pos = rows.target_pos - rows.lookup[rows.target_row]
        self.rows_local = ZRows(
            rows.input_ids,
            rows.attention_mask,
            torch.zeros_like(rows.lookup),
            rows.request,
            rows.is_kl,
            rows.target_row,
            suffix_target_pos,
            rows.target_tok,
            rows.target_len,
            n,
        )
        first_row = torch.tensor([int(torch.nonzero(rows.request == r)[0]) for r in range(n)])
        self.h_init = self.cached[first_row.to(self.device), 0].float()
        self.max_norm = hp.clamp_norm_factor * self.h_init.norm(dim=1)

    def _blocks_to_layer(self) -> tuple[torch.Tensor, bool]:
        """Block L's output over the suffixes (blocks 0..L run once) and whether block L returns a tuple."""
        return block_output_over_suffixes(
            self.model, self.base, self.split, self.prefix_kv, self.full_mask, self.hp.z_layer
        )

    def run(self) -> tuple[torch.Tensor, torch.Tensor, list[int], list[float]]:
        """Adam on delta until every request has stopped; z, h (on the CPU), steps and final target probs."""
        hp, n = self.hp, self.n
        self.delta = torch.zeros_like(self.h_init, requires_grad=True)
        self.optimiser = torch.optim.Adam([self.delta], lr=hp.v_lr)
        active = torch.arange(n)
        self.final_delta = torch.zeros_like(self.h_init)
        self.kl_init: torch.Tensor | None = None
        self.steps = [hp.v_steps] * n
        self.final_prob = [0.0] * n
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(hp.autocast or "")
        self.precision = torch.autocast(self.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with _replay_from(self.model, self.family, hp.z_layer, self.as_tuple) as replay:
            for step in range(hp.v_steps):
                nll, kl_logp = self._forward(replay, active)
                loss, d_act = self._loss(nll, kl_logp, active)
                done = self._judge(step, nll, loss, d_act, active)
                if step == hp.v_steps - 1 or bool(done.all()):
                    break
                self._update(loss, done)
                active = active[~done]
        z = (self.h_init + self.final_delta).cpu()
        return z, self.h_init.cpu(), self.steps, self.final_prob

    def prob_of(self, z: torch.Tensor) -> torch.Tensor:
        """Target probability per request with delta = z - h_L (one forward pass, no gradient)."""
        self.delta = z.to(self.h_init) - self.h_init
        self.precision = contextlib.nullcontext()
        with torch.no_grad(), _replay_from(self.model, self.family, self.hp.z_layer, self.as_tuple) as replay:
            nll, _ = self._forward(replay, torch.arange(self.n))
        return torch.exp(-nll).cpu()

    def _forward(self, replay: _Replay, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean target NLL and KL-prompt next-token log-probs of the active requests under the current delta."""
        rows, device = self.rows, self.device
        active_rows = rows.rows_of(active)
        local_of = torch.full((self.n,), -1, dtype=torch.long)
        local_of[active] = torch.arange(len(active))
        inject = self.delta[active.to(device)]
        nll_sum = torch.zeros(len(active), device=device)
        n_rows = torch.zeros(len(active), device=device)
        kl_parts, kl_reqs = [], []
        # rows sorted by suffix length and cut into chunks, each padded only to its own longest
        by_length = active_rows[torch.argsort(self.suffix_len[active_rows], stable=True)]
        for chunk in torch.tensor_split(by_length, min(N_CHUNKS, len(by_length))):
            part_sum, part_rows, kl_req, kl_part = self._chunk(replay, chunk, local_of, inject, len(active))
            nll_sum, n_rows = nll_sum + part_sum, n_rows + part_rows
            kl_parts.append(kl_part), kl_reqs.append(kl_req)
        nll = nll_sum / n_rows
        kl_logp = torch.cat(kl_parts)[torch.argsort(torch.cat(kl_reqs))]  # one KL row per request
        return nll, kl_logp

    def _chunk(self, replay: _Replay, chunk: torch.Tensor, local_of: torch.Tensor, inject: torch.Tensor, n_active: int):
        """``_chunk_terms`` of one chunk of rows: the blocks above L over its suffixes, with delta injected."""
        width = int(self.suffix_len[chunk].max())
        chunk_req = local_of[self.rows.request[chunk]]
        dev_chunk = chunk.to(self.device)
        value = self.cached[dev_chunk, :width].clone()
        value[:, 0] = value[:, 0] + inject[chunk_req.to(self.device)].to(self.cached.dtype)
        replay.value = value
        with self.precision:
            hidden = self.base(
                input_ids=self.split.suffix_ids[dev_chunk, :width],
                attention_mask=self.full_mask[dev_chunk, : self.prefix_width + width],
                position_ids=self.split.suffix_pos[dev_chunk, :width],
                **cache_kwargs(self.base, _cache_for(self.prefix_kv, dev_chunk)),
                use_cache=self.prefix_kv is not None,
            ).last_hidden_state
            return _chunk_terms(self.rows_local, chunk, chunk_req, n_active, hidden, self.lm_head)

    def _loss(self, nll: torch.Tensor, kl_logp: torch.Tensor, active: torch.Tensor):
        """Per active request NLL + kl_factor * KL(p_delta || p_0) + weight decay, and those requests' deltas."""
        device, hp = self.device, self.hp
        if self.kl_init is None:  # the first step has delta = 0: its KL-prompt distribution is p_0
            self.kl_init = kl_logp.detach().clone()
        kl_ref = self.kl_init[active.to(device)]
        kl = (kl_logp.exp() * (kl_logp - kl_ref)).sum(-1)
        d_act = self.delta[active.to(device)]
        wd = hp.v_weight_decay * d_act.norm(dim=1) / self.h_init[active.to(device)].norm(dim=1) ** 2
        return nll + hp.kl_factor * kl + wd, d_act

    def _judge(
        self, step: int, nll: torch.Tensor, loss: torch.Tensor, d_act: torch.Tensor, active: torch.Tensor
    ) -> torch.Tensor:
        """Which active requests stop (``hp.stop_on``: target prob > stop_prob, or total loss <
        REFERENCE_STOP_LOSS), recording probs, and steps and delta of those."""
        prob = torch.exp(-nll.detach())
        if self.hp.stop_on == "total_loss":
            done = (loss.detach() < REFERENCE_STOP_LOSS).cpu()
        else:
            done = (prob > self.hp.stop_prob).cpu()
        last = step == self.hp.v_steps - 1
        for i, r in enumerate(active.tolist()):
            self.final_prob[r] = float(prob[i])
            if done[i] or last:  # a request keeps the delta it was judged with
                self.steps[r] = step
                self.final_delta[r] = d_act[i].detach()
        return done

    def _update(self, loss: torch.Tensor, done: torch.Tensor) -> None:
        """One Adam step on the requests still running, then |delta| clamped to clamp_norm_factor * |h_L|."""
        self.optimiser.zero_grad()
        loss[~done.to(self.device)].sum().backward()
        self.optimiser.step()
        with torch.no_grad():
            norms = self.delta.norm(dim=1)
            scale = torch.clamp(self.max_norm / norms.clamp_min(1e-12), max=1.0)
            self.delta.mul_(scale[:, None])


def optimise_z_reference(
    model: nn.Module,
    tok,
    requests: list[EditRequest],
    hp: MEMITHyperParams,
    templates: ContextTemplates,
    progress: bool = True,
) -> ZResult:
    """The reference code's loop: one request at a time, full forward and full logits every step."""
    family = family_for(model)
    device = next(model.parameters()).device
    layer_name = f"{family.layers_path}.{hp.z_layer}"
    start = time.perf_counter()
    zs, hs, steps, probs = [], [], [], []
    for request in tqdm(requests, desc="optimising z (one at a time)", unit="req", disable=not progress, leave=False):
        rows = build_rows(tok, [request], templates)
        ids, mask = rows.input_ids.to(device), rows.attention_mask.to(device)
        lookup = rows.lookup.to(device)
        delta = torch.zeros(family.weight_matrix(model, 0).shape[0], device=device, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=hp.v_lr)
        state: dict = {}

        def add_delta(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # GPT-J blocks return a tuple
            if "h_init" not in state:
                state["h_init"] = hidden[0, lookup[0]].detach().clone().float()
            edited = hidden.index_put(
                (torch.arange(len(lookup), device=device), lookup),
                delta.to(hidden.dtype).expand(len(lookup), -1),
                accumulate=True,
            )
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        handle = model.get_submodule(layer_name).register_forward_hook(add_delta)
        try:
            for step in range(hp.v_steps):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                logp = torch.log_softmax(logits, -1)
                token_lp = logp[rows.target_row.to(device), rows.target_pos.to(device), rows.target_tok.to(device)]
                n_rows = int((~rows.is_kl).sum())
                nll = -(token_lp / rows.target_len[0]).sum() / n_rows
                kl_row = int(torch.nonzero(rows.is_kl)[0])
                kl_logp = logp[kl_row, lookup[kl_row]]
                if "kl_init" not in state:
                    state["kl_init"] = kl_logp.detach().clone()
                kl = (kl_logp.exp() * (kl_logp - state["kl_init"])).sum()
                h_init = state["h_init"]
                loss = nll + hp.kl_factor * kl + hp.v_weight_decay * delta.norm() / h_init.norm() ** 2
                if loss < REFERENCE_STOP_LOSS or step == hp.v_steps - 1:
                    break
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    max_norm = hp.clamp_norm_factor * h_init.norm()
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
        finally:
            handle.remove()
        zs.append((state["h_init"] + delta.detach()).cpu())
        hs.append(state["h_init"].cpu())
        steps.append(step)
        probs.append(float(torch.exp(-nll.detach())))
    return ZResult(torch.stack(zs), torch.stack(hs), steps, probs, time.perf_counter() - start)
