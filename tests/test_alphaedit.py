"""AlphaEdit: the update lies in C0's null space, is solved against the keys written before, is
linear in the statistics (so CollabEdit's sums give the global edit), and its memory of written keys
follows a participant through the federation and its checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from fededit_core.memit.hparams import MEMITHyperParams
from fededit_core.memit.nullspace import alphaedit_update, null_space_basis
from fededit_core.memit.update import layer_statistics, solve_update, statistics_from_factors
from strategies.federation import run_federation
from strategies.session import FederationError
from strategies.settings import RunSettings
from tests.federation_kit import DirectTransport, client_specs, isolated_tiny_world
from tests.test_collabedit_engine import REQUESTS, TEMPLATES
from tests.tiny import tiny_model_and_tokenizer


def spectrum_c0(d_ff: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A C0 with half its eigenvalues far below the threshold 2e-2 and half far above; its eigenvectors."""
    q, _ = torch.linalg.qr(torch.randn(d_ff, d_ff, generator=gen, dtype=torch.float64))
    values = torch.cat([torch.full((d_ff // 2,), 1e-4), torch.linspace(0.5, 2.0, d_ff - d_ff // 2)]).double()
    return q @ torch.diag(values) @ q.T, q


def test_the_update_leaves_c0s_principal_keys_alone():
    gen = torch.Generator().manual_seed(0)
    c0, q = spectrum_c0(16, gen)
    basis = null_space_basis(c0, 2e-2)
    assert basis.shape == (16, 8)
    keys, resid = torch.randn(3, 16, generator=gen), torch.randn(3, 6, generator=gen)
    delta = alphaedit_update(*layer_statistics(keys, resid), basis @ basis.T, None, l2=10.0)
    kept = q[:, 8:]  # the principal directions: what the model already knows
    assert (delta @ kept).norm() < 1e-10 * delta.norm()
    assert delta.norm() > 1e-3


def test_without_a_null_space_it_is_ridge_regression_on_the_keys():
    gen = torch.Generator().manual_seed(1)
    c0, _ = spectrum_c0(12, gen)
    basis = null_space_basis(c0, 1e3)  # every direction: P = I
    keys, resid = torch.randn(4, 12, generator=gen), torch.randn(4, 5, generator=gen)
    rk, kk = layer_statistics(keys, resid)
    expected = solve_update(rk, kk, torch.eye(12, dtype=torch.float64), 10.0)  # R K^T (10 I + K K^T)^-1
    torch.testing.assert_close(
        alphaedit_update(rk, kk, basis @ basis.T, None, l2=10.0), expected, rtol=1e-9, atol=1e-12
    )


def test_the_memory_of_written_keys_protects_them_from_later_edits():
    gen = torch.Generator().manual_seed(2)
    c0, _ = spectrum_c0(24, gen)
    basis = null_space_basis(c0, 2e-2)
    p = basis @ basis.T
    old = torch.randn(6, 24, generator=gen).double() @ p  # keys written before, inside the null space
    keys, resid = torch.randn(3, 24, generator=gen), torch.randn(3, 8, generator=gen)
    rk, kk = layer_statistics(keys, resid)
    free = alphaedit_update(rk, kk, p, None, l2=1.0)
    held = alphaedit_update(rk, kk, p, old.T @ old, l2=1.0)
    assert (held @ old.T).norm() < 0.5 * (free @ old.T).norm()


def test_summed_statistics_give_the_update_of_the_union():
    gen = torch.Generator().manual_seed(3)
    c0, _ = spectrum_c0(20, gen)
    basis, memory = null_space_basis(c0, 2e-2), torch.eye(20, dtype=torch.float64) * 0.3
    keys, resid = torch.randn(6, 20, generator=gen), torch.randn(6, 7, generator=gen)
    parts = [layer_statistics(keys[:2], resid[:2]), layer_statistics(keys[2:], resid[2:])]
    summed = alphaedit_update(parts[0][0] + parts[1][0], parts[0][1] + parts[1][1], basis @ basis.T, memory, l2=10.0)
    union = alphaedit_update(*layer_statistics(keys, resid), basis @ basis.T, memory, l2=10.0)
    torch.testing.assert_close(summed, union, rtol=1e-9, atol=1e-12)


def _editor(model, tok, corpus, **hp):
    from fededit_core.memit.covariance import CovarianceStore
    from fededit_core.memit.editor import MemitEditor

    hp = MEMITHyperParams(
        layers=(1, 2), v_steps=4, cov_source=str(corpus), cov_samples=8, cov_seq_len=16, editor="alphaedit", **hp
    )
    store = CovarianceStore(model, tok, hp.cov_source, hp.cov_samples, hp.cov_seq_len)
    return MemitEditor(model, tok, hp, templates=TEMPLATES, covariance=store)


def test_the_editor_projects_every_layer_and_remembers_the_keys_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog near the river bank.\n" * 40)
    model, tok = tiny_model_and_tokenizer("llama", seed=3)
    c0 = _editor(model, tok, corpus).c0()  # the tiny model's C0 is small: a threshold at its median eigenvalue
    threshold = min(float(torch.linalg.eigvalsh(c).median()) for c in c0.values())
    editor = _editor(model, tok, corpus, nullspace_threshold=threshold)
    first = editor.edit(REQUESTS[:2], progress=False)
    for layer in editor.hp.layers:
        basis = editor.covariance.null_space(layer, threshold)
        assert 0 < basis.shape[1] < editor.d_ff  # a real constraint on this C0
        shift = editor.weight_shift(layer)
        assert shift.norm() > 1e-6
        # its rows lie in the null space, up to the float32 rounding of the stored weights
        assert (shift - shift @ basis @ basis.T).norm() < 1e-4 * shift.norm()
        keys = first.keys[layer].double()
        torch.testing.assert_close(editor.key_memory[layer], keys.T @ keys)  # the keys as used
    again = _editor(model, tok, corpus, nullspace_threshold=threshold)  # the cached basis, read back
    torch.testing.assert_close(again.covariance.null_space(1, threshold), editor.covariance.null_space(1, threshold))
    editor.edit(REQUESTS[2:], progress=False)
    second = {l: first.keys[l].double().T @ first.keys[l].double() for l in editor.hp.layers}
    assert all((editor.key_memory[l] - second[l]).norm() > 0 for l in editor.hp.layers)  # both edits now
    editor.reset()
    assert editor.key_memory == {}


def test_a_federation_of_alphaedit_clients_merges_the_global_edit(tmp_path, monkeypatch):
    """Two clients, two slots: each slot's summed statistics give the AlphaEdit update solved against
    both clients' earlier keys, the same at every client as a global edit would."""
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog near the river bank.\n" * 40)
    model, tok = tiny_model_and_tokenizer("llama", seed=3)
    central = _editor(model, tok, corpus)
    clients = [_editor(copy.deepcopy(model), tok, corpus) for _ in range(2)]
    z = central.compute_z(REQUESTS, progress=False)
    for slot in (0, 1):
        parts = [[2 * slot], [2 * slot + 1]]  # one request per client and slot
        for i, layer in enumerate(central.hp.layers):
            stats = [
                layer_statistics(*c.layer_inputs([REQUESTS[j] for j in rows], z.z[rows], i))
                for c, rows in zip(clients, parts)
            ]
            for c in clients:
                c.apply_statistics(layer, stats[0][0] + stats[1][0], stats[0][1] + stats[1][1])
        rows = [2 * slot, 2 * slot + 1]
        from fededit_core.memit.target import ZResult

        central.edit([REQUESTS[j] for j in rows], z=ZResult(z.z[rows], z.h[rows]), progress=False)
    for layer in central.hp.layers:
        shift = central.weight_shift(layer)
        for c in clients:
            torch.testing.assert_close(c.weight_shift(layer), shift, rtol=1e-4, atol=1e-5 * float(shift.abs().max()))
            torch.testing.assert_close(c.key_memory[layer], central.key_memory[layer], rtol=1e-6, atol=1e-8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with isolated_tiny_world(tmp_path_factory, "alphaedit") as world:
        yield {**world, "hparams": {**world["hparams"], "editor": "alphaedit", "nullspace_threshold": 1.0}}


def test_collabedit_with_alphaedit_clients_keeps_their_key_memory_across_a_restart(world, tmp_path):
    specs = client_specs(world, tmp_path, "ae")
    transport = DirectTransport(specs)
    settings = RunSettings(
        run="ae", strategy="collabedit", num_slots=2, centralised=False, store_path=tmp_path / "s.sqlite"
    )
    run_federation(transport, list(specs), settings, {}, progress=False)
    editor = transport.worker.editor(specs["client-0"])
    last = len(editor.hp.layers) - 1
    layer = editor.hp.layers[last]
    sums = [
        statistics_from_factors(ins.arrays["kf"], ins.arrays["rf"])
        for c, ins, _ in transport.log
        if c == "client-0" and ins.op == "collab" and ins.args.get("apply") == last
    ]
    assert len(sums) == 2
    projection = editor.covariance.null_space_projection(layer, 1.0)
    first = alphaedit_update(*sums[0], projection, None, editor.hp.alphaedit_l2)
    second = alphaedit_update(*sums[1], projection, sums[0][1], editor.hp.alphaedit_l2)
    participants = [transport.worker.participant(s) for s in specs.values()]
    expected = editor.base_weights[layer].double() + first + second
    for p in participants:
        assert (p.layers[layer].double() - expected).norm() <= 1e-4 * (first + second).norm()
        torch.testing.assert_close(p.edited_keys[layer], sums[0][1] + sums[1][1], rtol=1e-6, atol=1e-8)
    transport.worker.forget("ae")  # a restarted client reads its memory back from the checkpoint
    restored = transport.worker.participant(specs["client-1"]).edited_keys[layer]
    torch.testing.assert_close(restored, sums[0][1] + sums[1][1], rtol=1e-6, atol=1e-6)


def test_fededit_receivers_re_edit_through_alphaedit_and_remember_the_absorbed_keys(world, tmp_path):
    specs = client_specs(world, tmp_path, "fe")
    transport = DirectTransport(specs)
    settings = RunSettings(run="fe", strategy="fededit", num_slots=2, alpha=0.0, store_path=tmp_path / "f.sqlite")
    report = run_federation(transport, list(specs), settings, {}, progress=False)
    assert all(c["applied"] > 0 for c in report["clients"])  # every client re-edited the other's MKVs
    editor = transport.worker.editor(specs["client-0"])
    for spec in specs.values():
        participant = transport.worker.participant(spec)
        own = participant.own.keys.double()  # (n, layers, d_ff): the keys of its own MKVs
        for i, layer in enumerate(editor.hp.layers):
            own_only = own[:, i].T @ own[:, i]
            # more than its own keys: the absorbed MKVs' keys joined the memory
            assert torch.trace(participant.edited_keys[layer]) > torch.trace(own_only) * 1.01


def test_settings_refuse_what_alphaedit_cannot_do():
    with pytest.raises(FederationError, match="needs editor = 'memit'"):
        RunSettings(run="x", strategy="editavg-factors", editor="alphaedit")
    with pytest.raises(FederationError, match="dynamic covariance"):
        RunSettings(run="x", strategy="collabedit", editor="alphaedit", collab_beta1=1.0)
    assert RunSettings.from_run_config({"editor": "alphaedit"}, run_id=1).memit_overrides()["editor"] == "alphaedit"
