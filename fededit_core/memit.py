"""MEMIT (Meng et al. 2023): spread each fact's target z over the edited layers R in closed form.

For each layer l in R, in order, on the partly edited model:
    K = template-averaged keys (inputs of W_out at the last subject token), one column per request
    R = (z - h_L) / (number of layers left)                  (Eq. 18-20)
    Delta = R K^T (lambda C0 + K K^T)^-1                     (Eq. 14), solved in float64
    W_out += Delta
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .covariance import CovarianceStore
from .families import family_for, model_dims
from .hparams import MEMITHyperParams
from .requests import EditRequest
from .templates import ContextTemplates, sample_context_templates
from .tokens import encode_with_subject, pad_right
from .trace import capture_inputs, capture_outputs, run_until
from .zopt import ZResult, optimise_z, optimise_z_reference


def layer_statistics(keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R K^T, K K^T) in float64 from keys (n, d_ff) and residuals (n, d): sums over requests."""
    keys, resid = keys.double(), resid.double()
    return resid.T @ keys, keys.T @ keys


def solve_update(rk: torch.Tensor, kk: torch.Tensor, c0: torch.Tensor, mom2_weight: float) -> torch.Tensor:
    """Delta = (R K^T)(lambda C0 + K K^T)^-1, (d, d_ff), float64."""
    a = mom2_weight * c0.to(device=kk.device, dtype=torch.float64) + kk.double()
    if not torch.isfinite(a).all() or not torch.isfinite(rk).all():
        raise ValueError("MEMIT statistics hold NaN or infinite values")
    return torch.linalg.solve(a, rk.double().T).T  # a is symmetric


def memit_delta(keys: torch.Tensor, resid: torch.Tensor, c0: torch.Tensor, mom2_weight: float) -> torch.Tensor:
    """The minimiser of |Delta K - R|^2 + lambda tr(Delta C0 Delta^T) (Eq. 14)."""
    return solve_update(*layer_statistics(keys, resid), c0, mom2_weight)


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


def hidden_at_subject(model, tok, requests: list[EditRequest], layer: int) -> torch.Tensor:
    """h_L (n, d): output of block ``layer`` at the last subject token of each plain prompt."""
    family = family_for(model)
    seqs, lookup = _template_rows(tok, requests, ContextTemplates.plain())
    return _read_at_subject(model, tok, seqs, lookup, f"{family.layers_path}.{layer}", inputs=False)


@dataclass
class EditResult:
    """What one MEMIT edit did: the targets, the per-layer updates and where the time went."""

    z: ZResult
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (d, d_ff)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n, d_ff), as used
    seconds: dict[str, float] = field(default_factory=dict)


class MemitEditor:
    """MEMIT on one model: keeps the base weights of the edited layers, its templates and its C0."""

    def __init__(self, model: nn.Module, tok, hparams: MEMITHyperParams,
                 templates: ContextTemplates | None = None, covariance: CovarianceStore | None = None):
        self.model, self.tok, self.hp = model, tok, hparams
        self.family = family_for(model)
        self.device = next(model.parameters()).device
        self.n_layers, self.d_model, self.d_ff = model_dims(model)
        hparams.check_model(self.n_layers)
        self.base_weights = {l: self.family.weight_matrix(model, l).detach().clone() for l in hparams.layers}
        self.templates = templates or sample_context_templates(model, tok, seed=hparams.template_seed)
        self.covariance = covariance or CovarianceStore(
            model, tok, hparams.cov_source, hparams.cov_samples, hparams.cov_seq_len)
        self.z_cache = None  # a zcache.BaseZCache: z optimised once on the base model (benchmarks)

    # --- state of the edited layers -------------------------------------------------------------
    def edited_layers(self) -> dict[int, torch.Tensor]:
        """Current W_out (d, d_ff) of every edited layer (a copy)."""
        return {l: self.family.weight_matrix(self.model, l).detach().clone() for l in self.hp.layers}

    def load_layers(self, weights: dict[int, torch.Tensor]) -> None:
        """Set the edited layers' W_out to ``weights`` (e.g. to swap one client's edits in)."""
        for layer, w in weights.items():
            if tuple(w.shape) != (self.d_model, self.d_ff):
                raise ValueError(f"layer {layer}: weight of shape {tuple(w.shape)}, expected {(self.d_model, self.d_ff)}")
            current = self.family.weight_matrix(self.model, layer)
            with torch.no_grad():
                current.copy_(w.to(current.dtype))

    def reset(self) -> None:
        """Back to the base model."""
        self.load_layers(self.base_weights)

    def weight_shift(self, layer: int) -> torch.Tensor:
        """W_l - W_l(base), float64."""
        return (self.family.weight_matrix(self.model, layer).detach().double() - self.base_weights[layer].double())

    def c0(self) -> dict[int, torch.Tensor]:
        """C0 of every edited layer, always measured on the base model (cached after the first call)."""
        layers = list(self.hp.layers)
        if self.covariance.in_memory(layers):
            return self.covariance.get_many(layers)
        current = self.edited_layers()
        self.reset()
        try:
            return self.covariance.get_many(layers)
        finally:
            self.load_layers(current)

    # --- MEMIT ----------------------------------------------------------------------------------
    def compute_z(self, requests: list[EditRequest], reference: bool = False, progress: bool = True) -> ZResult:
        if self.z_cache is not None and not reference:
            return self.z_cache.z_for(self, requests, progress=progress)
        fn = optimise_z_reference if reference else optimise_z
        return fn(self.model, self.tok, requests, self.hp, self.templates, progress=progress)

    def layer_inputs(self, requests: list[EditRequest], z: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (n, d_ff) at the i-th edited layer and residuals (z - h_L) / (layers left), (n, d),
        both read off the current (partly edited) model."""
        layer = self.hp.layers[i]
        keys = compute_keys(self.model, self.tok, requests, layer, self.templates)
        current = hidden_at_subject(self.model, self.tok, requests, self.hp.z_layer)
        return keys, (z - current) / (len(self.hp.layers) - i)

    def apply_statistics(self, layer: int, rk: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        """W_layer += (R K^T)(lambda C0 + K K^T)^-1; the statistics may be sums over clients (CollabEdit)."""
        delta = solve_update(rk.to(self.device), kk.to(self.device), self.c0()[layer], self.hp.mom2_weight)
        self.family.add_update(self.model, layer, delta)
        return delta

    def edit(self, requests: list[EditRequest], z: ZResult | None = None, progress: bool = True) -> EditResult:
        """Text-based MEMIT of ``requests`` on the current model (optimising z unless given)."""
        if not requests:
            raise ValueError("no edit requests given")
        started = time.perf_counter()
        self.c0()  # built (on the base model) or loaded before anything is timed as editing
        seconds = {"covariance": time.perf_counter() - started}
        z = z or self.compute_z(requests, progress=progress)
        seconds["z"] = z.seconds
        result = EditResult(z=z, seconds=seconds)
        started = time.perf_counter()
        for i, layer in enumerate(self.hp.layers):
            keys, resid = self.layer_inputs(requests, z.z, i)
            delta = self.apply_statistics(layer, *layer_statistics(keys.to(self.device), resid.to(self.device)))
            result.deltas[layer], result.keys[layer] = delta.float(), keys
        seconds["layers"] = time.perf_counter() - started
        return result
