"""MEMIT (Meng et al. 2023): spread each fact's target z over the edited layers R in closed form.

For each layer l in R, in order, on the partly edited model:
    K = template-averaged keys (inputs of W_out at the last subject token), one column per request
    R = (z - h_L) / (number of layers left)                  (Eq. 18-20)
    Delta = R K^T (lambda C0 + K K^T)^-1                     (Eq. 14), solved in float64
    W_out += Delta

``hparams.editor`` picks the editor, each a variation of that loop:
- ``memit``: as above;
- ``alphaedit``: the last step is AlphaEdit's null-space-projected update (``memit.nullspace``),
  solved against the keys of every edit this model received before (``key_memory``), whatever
  wrote them: a text edit, MKVs, or CollabEdit's summed statistics;
- ``pmet``: the targets are PMET's FFN outputs at L (``memit.pmet``), read at the FFN output
  rather than the block output, and R = (z - FFN_L) / sqrt(layers left).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fededit_core.data.requests import EditRequest
from fededit_core.memit.covariance import CovarianceStore
from fededit_core.memit.hparams import MEMITHyperParams, default_hparams
from fededit_core.memit.keys import compute_keys, ffn_output_at_subject, hidden_at_subject
from fededit_core.memit.nullspace import alphaedit_update
from fededit_core.memit.pmet import optimise_pmet_targets
from fededit_core.memit.target import ZResult, optimise_z, optimise_z_reference, target_prob_with_z
from fededit_core.memit.templates import ContextTemplates, sample_context_templates
from fededit_core.memit.update import layer_statistics, solve_update
from fededit_core.model.families import family_for, model_dims
from fededit_core.model.loading import configure_threads, load_model


@dataclass
class EditResult:
    """What one MEMIT edit did: the targets, the per-layer updates and where the time went."""

    z: ZResult
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (d, d_ff)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n, d_ff), as used
    # layer i -> (n, d): c_i = (site before layer i - site before layer 0) - sum_{j<i} Delta_j k_j (the layers
    # that move the site: ``moves_site``), the part of this edit's own effect on the target site (h_L, or
    # PMET's FFN output) that the first-order estimate misses (fedleke.mkv: the exact apply)
    corrections: dict[int, torch.Tensor] = field(default_factory=dict)
    plain_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n, d_ff) at the plain prompt
    resids: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (n, d): (z - h_L) / (layers left)
    seconds: dict[str, float] = field(default_factory=dict)


class MemitEditor:
    """MEMIT on one model: keeps the base weights of the edited layers, its templates and its C0."""

    def __init__(
        self,
        model: nn.Module,
        tok,
        hparams: MEMITHyperParams,
        templates: ContextTemplates | None = None,
        covariance: CovarianceStore | None = None,
    ):
        self.model, self.tok, self.hp = model, tok, hparams
        self.family = family_for(model)
        self.device = next(model.parameters()).device
        self.n_layers, self.d_model, self.d_ff = model_dims(model)
        hparams.check_model(self.n_layers)
        self.base_weights = {l: self.family.weight_matrix(model, l).detach().clone() for l in hparams.layers}
        self.templates = templates or sample_context_templates(model, tok, seed=hparams.template_seed)
        self.covariance = covariance or CovarianceStore(
            model, tok, hparams.cov_source, hparams.cov_samples, hparams.cov_seq_len
        )
        self.z_cache = None  # an object with z_for(editor, requests): z shared across runs (bench.zcache)
        # AlphaEdit: per layer, the sum of K K^T of the keys written so far (float64, d_ff x d_ff, CPU)
        self.key_memory: dict[int, torch.Tensor] = {}

    # --- state of the edited layers -------------------------------------------------------------
    def edited_layers(self) -> dict[int, torch.Tensor]:
        """Current W_out (d, d_ff) of every edited layer (a copy)."""
        return {l: self.family.weight_matrix(self.model, l).detach().clone() for l in self.hp.layers}

    def load_layers(self, weights: dict[int, torch.Tensor]) -> None:
        """Set the edited layers' W_out to ``weights`` (e.g. to swap one client's edits in)."""
        for layer, w in weights.items():
            if tuple(w.shape) != (self.d_model, self.d_ff):
                raise ValueError(
                    f"layer {layer}: weight of shape {tuple(w.shape)}, expected {(self.d_model, self.d_ff)}"
                )
            current = self.family.weight_matrix(self.model, layer)
            with torch.no_grad():
                current.copy_(w.to(current.dtype))

    def reset(self) -> None:
        """Back to the base model (and no memory of edited keys)."""
        self.load_layers(self.base_weights)
        self.key_memory = {}

    @contextmanager
    def at_base(self) -> Iterator[MemitEditor]:
        """The base model inside the block, the edited layers and their key memory as they were after
        it (also on error)."""
        current, memory = self.edited_layers(), self.key_memory
        self.reset()
        try:
            yield self
        finally:
            self.load_layers(current)
            self.key_memory = memory

    def weight_shift(self, layer: int) -> torch.Tensor:
        """W_l - W_l(base), float64."""
        return self.family.weight_matrix(self.model, layer).detach().double() - self.base_weights[layer].double()

    def c0(self) -> dict[int, torch.Tensor]:
        """C0 of every edited layer, always measured on the base model (cached after the first call)."""
        layers = list(self.hp.layers)
        if self.covariance.in_memory(layers):
            return self.covariance.get_many(layers)
        with self.at_base():
            return self.covariance.get_many(layers)

    # --- what the editor changes in MEMIT's loop -------------------------------------------------
    @property
    def at_ffn(self) -> bool:
        """PMET: the targets live at L's FFN output, not at its block output."""
        return self.hp.editor == "pmet"

    def read_site(self, requests: list[EditRequest]) -> torch.Tensor:
        """(n, d) where the targets live, on the current model: h_L, or (PMET) L's FFN output."""
        read = ffn_output_at_subject if self.at_ffn else hidden_at_subject
        return read(self.model, self.tok, requests, self.hp.z_layer)

    def spread(self, i: int) -> float:
        """The divisor of the i-th edited layer's residual: the layers left, or (PMET) its square root."""
        left = len(self.hp.layers) - i
        return math.sqrt(left) if self.at_ffn else float(left)

    def moves_site(self, layer: int) -> bool:
        """Whether a shift of ``layer``'s W_out moves the target site to first order: every edited layer
        for h_L; only L itself for L's FFN output."""
        return layer == self.hp.z_layer if self.at_ffn else True

    def optimise_targets(self, requests: list[EditRequest], progress: bool = True) -> ZResult:
        """The targets optimised on the current model (no cache)."""
        fn = optimise_pmet_targets if self.at_ffn else optimise_z
        return fn(self.model, self.tok, requests, self.hp, self.templates, progress=progress)

    # --- MEMIT ----------------------------------------------------------------------------------
    def compute_z(self, requests: list[EditRequest], reference: bool = False, progress: bool = True) -> ZResult:
        if self.z_cache is not None and not reference:
            return self.z_cache.z_for(self, requests, progress=progress)
        if reference and not self.at_ffn:
            return optimise_z_reference(self.model, self.tok, requests, self.hp, self.templates, progress=progress)
        return self.optimise_targets(requests, progress=progress)

    def target_prob(self, requests: list[EditRequest], z: torch.Tensor) -> torch.Tensor:
        """Each request's target probability with its z written in (``target.target_prob_with_z``);
        a PMET target moves h_L by z - FFN_L."""
        if self.at_ffn:
            z = hidden_at_subject(self.model, self.tok, requests, self.hp.z_layer) + (z - self.read_site(requests))
        return target_prob_with_z(self.model, self.tok, requests, z, self.hp, self.templates)

    def layer_inputs(self, requests: list[EditRequest], z: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (n, d_ff) at the i-th edited layer and residuals (z - site) / spread(i), (n, d), both
        read off the current (partly edited) model."""
        keys, current = self._read_layer(requests, i)
        return keys, (z - current.to(z)) / self.spread(i)

    def _read_layer(self, requests: list[EditRequest], i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Template-averaged keys at the i-th edited layer and the target site, on the current model."""
        keys = compute_keys(self.model, self.tok, requests, self.hp.layers[i], self.templates)
        return keys, self.read_site(requests)

    def apply_statistics(
        self, layer: int, rk: torch.Tensor, kk: torch.Tensor, prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """W_layer += (R K^T)(lambda C0 + K K^T)^-1, or AlphaEdit's update; the statistics may be sums
        over clients (CollabEdit); ``prior`` replaces lambda C0 (CollabEdit's dynamic covariance, MEMIT only)."""
        c0 = self.c0()[layer]  # on the base model, before the null space is read from it
        rk, kk = rk.to(self.device), kk.to(self.device)
        if self.hp.editor == "alphaedit":
            if prior is not None:
                raise ValueError("CollabEdit's dynamic covariance applies to MEMIT; AlphaEdit keeps its own key memory")
            projection = self.covariance.null_space_projection(layer, self.hp.nullspace_threshold)
            delta = alphaedit_update(rk, kk, projection, self.key_memory.get(layer), self.hp.alphaedit_l2)
            old = self.key_memory.get(layer)
            self.key_memory[layer] = kk.double().cpu() if old is None else old + kk.double().cpu()
        else:
            prior = None if prior is None else prior.to(self.device)
            delta = solve_update(rk, kk, c0, self.hp.mom2_weight, prior)
        self.family.add_update(self.model, layer, delta)
        return delta

    def edit(
        self, requests: list[EditRequest], z: ZResult | None = None, progress: bool = True, plain_keys: bool = False
    ) -> EditResult:
        """Text-based MEMIT of ``requests`` on the current model (optimising z unless given); records
        each layer's update, keys and correction (``EditResult``), and with ``plain_keys`` the keys
        at the plain prompt too."""
        if not requests:
            raise ValueError("no edit requests given")
        started = time.perf_counter()
        self.c0()  # built (on the base model) or loaded before anything is timed as editing
        seconds = {"covariance": time.perf_counter() - started}
        z = z or self.compute_z(requests, progress=progress)
        seconds["z"] = z.seconds
        result = EditResult(z=z, seconds=seconds)
        started = time.perf_counter()
        written = None  # sum_{j<i} Delta_j k_j over the layers that move the target site, (n, d)
        for i, layer in enumerate(self.hp.layers):
            keys, current = self._read_layer(requests, i)  # on the CPU
            if i == 0:
                start, written = current.double(), torch.zeros_like(current, dtype=torch.float64)
            result.corrections[layer] = (current.double() - start - written).float()
            resid = (z.z - current.to(z.z)) / self.spread(i)
            if plain_keys:
                result.plain_keys[layer] = compute_keys(self.model, self.tok, requests, layer, ContextTemplates.plain())
            delta = self.apply_statistics(layer, *layer_statistics(keys.to(self.device), resid.to(self.device)))
            result.deltas[layer], result.keys[layer], result.resids[layer] = delta.float(), keys, resid.float().cpu()
            if self.moves_site(layer):
                written = written + keys.double() @ delta.double().T.cpu()
        seconds["layers"] = time.perf_counter() - started
        return result


def hparams_for(model, **overrides) -> MEMITHyperParams:
    """The defaults for this model's family (and for this very model when known), with overrides."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return default_hparams(family_for(model).name, model.config, n_layers=model.config.num_hidden_layers, **overrides)


def make_editor(
    model_spec: str, device: str = "cpu", dtype: str = "fp32", templates: ContextTemplates | None = None, **hp_overrides
) -> MemitEditor:
    """Model, tokenizer, the model's MEMIT defaults with ``hp_overrides``, templates and C0 store."""
    configure_threads()
    model, tok = load_model(model_spec, device=device, dtype=dtype)
    return MemitEditor(model, tok, hparams_for(model, **hp_overrides), templates=templates)
