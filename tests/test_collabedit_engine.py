"""CollabEdit on the engine: summing clients' R K^T and K K^T per layer equals one global edit (MEMIT,
AlphaEdit, PMET)."""

from __future__ import annotations

import copy

import pytest
import torch

from fededit_core.data.requests import EditRequest
from fededit_core.memit.editor import MemitEditor
from fededit_core.memit.hparams import MEMITHyperParams
from fededit_core.memit.target import ZResult
from fededit_core.memit.templates import ContextTemplates
from fededit_core.memit.update import layer_statistics, statistics_from_factors, thin_factors
from strategies.aggregate import sum_factors, sum_statistics
from tests.tiny import tiny_model_and_tokenizer

TEMPLATES = ContextTemplates(groups=(("{}",), ("Hello. {}", "Yes. {}")))
REQUESTS = [
    EditRequest(case_id="a", subject="Anna", prompt="{} lives in", target_new="Rome"),
    EditRequest(case_id="b", subject="Boris", prompt="{} works for", target_new="Acme"),
    EditRequest(case_id="c", subject="Cleo", prompt="The home of {} is", target_new="Oslo"),
    EditRequest(case_id="d", subject="Dan", prompt="{} plays", target_new="chess"),
]


def _editor(model, tok, corpus, editor: str = "memit"):
    from fededit_core.memit.covariance import CovarianceStore

    hp = MEMITHyperParams(
        layers=(1, 2),
        mom2_weight=10.0,
        v_steps=4,
        cov_source=str(corpus),
        cov_samples=8,
        cov_seq_len=16,
        editor=editor,
        nullspace_threshold=1.0,
    )
    store = CovarianceStore(model, tok, hp.cov_source, hp.cov_samples, hp.cov_seq_len)
    return MemitEditor(model, tok, hp, templates=TEMPLATES, covariance=store)


@pytest.mark.parametrize("editor", ["memit", "alphaedit", "pmet"])
def test_summed_statistics_equal_the_global_edit(tmp_path, monkeypatch, editor):
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    model, tok = tiny_model_and_tokenizer("llama", seed=3)
    central = _editor(model, tok, corpus, editor)
    z = central.compute_z(REQUESTS, progress=False)

    # the federation: two clients holding identical copies of the shared model
    clients = [_editor(copy.deepcopy(model), tok, corpus, editor) for _ in range(2)]
    parts = [REQUESTS[:2], REQUESTS[2:]]
    z_parts = [z.z[:2], z.z[2:]]
    for i, layer in enumerate(central.hp.layers):
        stats = []
        for client, requests, z_part in zip(clients, parts, z_parts):
            keys, resid = client.layer_inputs(requests, z_part, i)
            stats.append(layer_statistics(keys, resid))
        rk, kk = (sum(s[j] for s in stats) for j in (0, 1))  # what the server returns
        for client in clients:
            client.apply_statistics(layer, rk, kk)

    central.edit(REQUESTS, z=ZResult(z.z, z.h))
    for layer in central.hp.layers:
        global_edit = central.weight_shift(layer)
        assert global_edit.abs().max() > 1e-4  # the edit is not trivial
        for client in clients:
            # equal up to float32 rounding of the stored weights
            torch.testing.assert_close(
                client.weight_shift(layer), global_edit, rtol=1e-4, atol=1e-5 * float(global_edit.abs().max())
            )
    # and the two clients end with the same model
    torch.testing.assert_close(clients[0].edited_layers()[2], clients[1].edited_layers()[2])


def _merge(clients, parts, z_parts, lowrank: bool) -> None:
    """CollabEdit's layer loop in float64, the statistics dense or as thin factors (what travels)."""
    for i, layer in enumerate(clients[0].hp.layers):
        uploads = []
        for client, requests, z_part in zip(clients, parts, z_parts):
            keys, resid = client.layer_inputs(requests, z_part, i)
            if lowrank:
                kf, rf = thin_factors(keys.double().T.numpy(), resid.double().T.numpy())
                uploads.append({"kf": kf, "rf": rf})
            else:
                uploads.append(dict(zip(("rk", "kk"), (s.numpy() for s in layer_statistics(keys, resid)))))
        if lowrank:
            merged = sum_factors(uploads)
            rk, kk = statistics_from_factors(merged["kf"], merged["rf"])
        else:
            rk, kk = (torch.from_numpy(a) for a in sum_statistics(uploads).values())
        for client in clients:
            client.apply_statistics(layer, rk, kk)


def _thin_equals_dense(model, make_editor, requests) -> None:
    """Two clients merge the same requests through dense statistics and through thin factors: the
    edited layers agree to 1e-6 of the update's norm."""
    z = make_editor(model).compute_z(requests, progress=False).z
    half = len(requests) // 2
    parts, z_parts = [requests[:half], requests[half:]], [z[:half], z[half:]]
    shifts = {}
    for lowrank in (False, True):
        clients = [make_editor(copy.deepcopy(model)) for _ in range(2)]
        _merge(clients, parts, z_parts, lowrank)
        shifts[lowrank] = {l: clients[0].weight_shift(l).double() for l in clients[0].hp.layers}
        for layer in clients[0].hp.layers:  # both clients hold the same model
            torch.testing.assert_close(clients[1].weight_shift(layer), clients[0].weight_shift(layer))
    for layer, dense in shifts[False].items():
        assert dense.norm() > 1e-3
        assert (shifts[True][layer] - dense).norm() <= 1e-6 * dense.norm()


def test_thin_factors_merge_what_dense_statistics_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    model, tok = tiny_model_and_tokenizer("llama", seed=3)
    _thin_equals_dense(model, lambda m: _editor(m, tok, corpus), REQUESTS)


@pytest.mark.slow
def test_thin_factors_merge_what_dense_statistics_merge_on_smollm2():
    from fededit_core.data.builtin import DEMO_EDITS
    from fededit_core.data.loaders import load_requests
    from fededit_core.memit.editor import hparams_for
    from fededit_core.model.loading import configure_threads, load_model

    configure_threads()
    model, tok = load_model("smollm2-135m")
    hp = hparams_for(model)
    _thin_equals_dense(model, lambda m: MemitEditor(m, tok, hp), load_requests(DEMO_EDITS, n=4))
