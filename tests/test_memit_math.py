"""MEMIT's closed form (Eq. 14) against an independent least-squares solve, and its statistics."""

import math

import numpy as np
import pytest
import torch

from fededit_core.memit.dynamic_covariance import dynamic_prior, psd_factor
from fededit_core.memit.update import (
    layer_statistics,
    memit_delta,
    solve_update,
    statistics_from_factors,
    thin_factors,
    update_factors,
)
from strategies.aggregate import sum_factors, sum_statistics


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))


def random_spd(n: int, gen: torch.Generator, cond: float = 50.0) -> torch.Tensor:
    """A symmetric positive definite (n, n) float64 matrix with eigenvalues in [1, cond]."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return (q * eig) @ q.T


def spd_sqrt(c: torch.Tensor) -> torch.Tensor:
    eig, vec = torch.linalg.eigh(c)
    return (vec * eig.sqrt()) @ vec.T


def lstsq_delta(keys, resid, c0, lam):
    """argmin_D |D K - R|_F^2 + lam tr(D C0 D^T) via the stacked system [K^T; sqrt(lam) C0^1/2] D^T = [R^T; 0].

    ``keys`` (n, d_ff) and ``resid`` (n, d) hold one request per row, so K = keys^T and R = resid^T.
    """
    d_ff, d = keys.shape[1], resid.shape[1]
    a = torch.cat([keys, math.sqrt(lam) * spd_sqrt(c0)])
    b = torch.cat([resid, torch.zeros(d_ff, d, dtype=torch.float64)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution.T  # (d, d_ff)


def objective(delta, keys, resid, c0, lam):
    return ((delta @ keys.T - resid.T) ** 2).sum() + lam * torch.trace(delta @ c0 @ delta.T)


@pytest.mark.parametrize(
    "n,d,d_ff,lam",
    [
        (4, 6, 9, 1.0),  # fewer requests than key dimensions (MEMIT's usual case)
        (4, 6, 9, 1e4),  # strong prior
        (30, 6, 9, 0.3),  # more requests than key dimensions
        (1, 3, 5, 1e-3),  # a single request, weak prior
    ],
)
def test_memit_delta_is_the_regularised_least_squares_solution(n, d, d_ff, lam):
    gen = torch.Generator().manual_seed(n * 1000 + d_ff)
    keys = torch.randn(n, d_ff, generator=gen, dtype=torch.float64)
    resid = torch.randn(n, d, generator=gen, dtype=torch.float64)
    c0 = random_spd(d_ff, gen)

    delta = memit_delta(keys, resid, c0, lam)
    assert delta.dtype == torch.float64 and tuple(delta.shape) == (d, d_ff)
    expected = lstsq_delta(keys, resid, c0, lam)
    assert torch.linalg.norm(delta - expected) <= 1e-8 * torch.linalg.norm(expected)

    # first-order optimality: d/dD = 2 (D K - R) K^T + 2 lam D C0 = 0
    grad = 2 * (delta @ keys.T - resid.T) @ keys + 2 * lam * delta @ c0
    scale = 2 * (resid.T @ keys).norm() + 1.0
    assert grad.norm() <= 1e-9 * scale

    # and it is a minimum: any perturbation increases the objective
    best = objective(delta, keys, resid, c0, lam)
    for _ in range(5):
        bumped = delta + 1e-3 * torch.randn(delta.shape, generator=gen, dtype=torch.float64)
        assert objective(bumped, keys, resid, c0, lam) > best


def test_memit_delta_with_a_weak_prior_writes_the_residuals():
    """lam -> 0 with independent keys: D k_i = r_i exactly (the edit lands)."""
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    resid = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    delta = memit_delta(keys, resid, random_spd(8, gen), 1e-9)
    torch.testing.assert_close(keys @ delta.T, resid, rtol=1e-6, atol=1e-6)


def test_memit_delta_accepts_float32_and_computes_in_float64():
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(3, 8, generator=gen)
    resid = torch.randn(3, 5, generator=gen)
    c0 = random_spd(8, gen)
    delta = memit_delta(keys, resid, c0, 2.0)
    assert delta.dtype == torch.float64
    expected = lstsq_delta(keys.double(), resid.double(), c0, 2.0)
    assert torch.linalg.norm(delta - expected) <= 1e-8 * torch.linalg.norm(expected)


def test_layer_statistics_shapes_and_values():
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(4, 7, generator=gen)
    resid = torch.randn(4, 3, generator=gen)
    rk, kk = layer_statistics(keys, resid)
    assert rk.dtype == kk.dtype == torch.float64
    assert tuple(rk.shape) == (3, 7) and tuple(kk.shape) == (7, 7)
    expected_rk = sum(torch.outer(resid[i].double(), keys[i].double()) for i in range(4))
    expected_kk = sum(torch.outer(keys[i].double(), keys[i].double()) for i in range(4))
    torch.testing.assert_close(rk, expected_rk, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kk, expected_kk, rtol=1e-12, atol=1e-12)


def test_layer_statistics_are_additive_over_requests():
    """Stats of all requests == sum of the stats of any partition (what CollabEdit aggregates)."""
    gen = torch.Generator().manual_seed(6)
    keys = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    resid = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    c0 = random_spd(12, gen)
    parts = [slice(0, 3), slice(3, 4), slice(4, 10)]
    rk_all, kk_all = layer_statistics(keys, resid)
    stats = [layer_statistics(keys[p], resid[p]) for p in parts]
    rk_sum = sum(s[0] for s in stats)
    kk_sum = sum(s[1] for s in stats)
    torch.testing.assert_close(rk_sum, rk_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kk_sum, kk_all, rtol=1e-12, atol=1e-12)
    # so solving from the summed statistics is the centralised edit of all requests
    torch.testing.assert_close(
        solve_update(rk_sum, kk_sum, c0, 7.0), memit_delta(keys, resid, c0, 7.0), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("where", ["rk", "kk", "c0"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_solve_update_refuses_non_finite_statistics(where, bad):
    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    resid = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    rk, kk = layer_statistics(keys, resid)
    c0 = random_spd(6, gen)
    args = {"rk": rk.clone(), "kk": kk.clone(), "c0": c0.clone()}
    args[where][1, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        solve_update(args["rk"], args["kk"], args["c0"], 10.0)
    with pytest.raises(ValueError):
        if where == "rk":
            memit_delta(keys, torch.where(torch.arange(4) == 1, bad, resid), c0, 10.0)
        elif where == "kk":
            memit_delta(torch.where(torch.arange(6) == 2, bad, keys), resid, c0, 10.0)
        else:
            memit_delta(keys, resid, args["c0"], 10.0)


def test_update_factors_multiply_to_the_memit_update():
    """A = (lambda C0 + K K^T)^-1 K and R give Delta = R A^T, the closed form of Eq. 14."""
    torch.manual_seed(0)
    keys, resid = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    c0 = torch.eye(12, dtype=torch.float64) + 0.1 * torch.ones(12, 12, dtype=torch.float64)
    a, r = update_factors(keys, resid, c0, 3.0)
    assert tuple(a.shape) == (12, 5) and tuple(r.shape) == (4, 5)
    torch.testing.assert_close(r @ a.T, memit_delta(keys, resid, c0, 3.0))


@pytest.mark.parametrize("n,d,d_ff", [(4, 6, 9), (12, 6, 9), (1, 3, 5)])
def test_thin_factors_carry_both_statistics_in_rank_columns(n, d, d_ff):
    gen = torch.Generator().manual_seed(n)
    keys = torch.randn(n, d_ff, generator=gen, dtype=torch.float64)
    resid = torch.randn(n, d, generator=gen, dtype=torch.float64)
    kf, rf = thin_factors(keys.T.numpy(), resid.T.numpy())
    assert kf.shape == (d_ff, min(n, d_ff)) and rf.shape == (d, min(n, d_ff))
    rk, kk = layer_statistics(keys, resid)
    rk_f, kk_f = statistics_from_factors(kf, rf)
    torch.testing.assert_close(rk_f, rk, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kk_f, kk, rtol=1e-10, atol=1e-10)


def test_thin_factors_drop_repeated_keys_and_add_the_repeats_residuals():
    """A request edited twice has one key: the factor has one column for it, whose residual is the
    sum of both (what R K^T holds)."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    keys = torch.cat([keys, keys[:1]])  # request 0 again
    resid = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    kf, rf = thin_factors(keys.T.numpy(), resid.T.numpy())
    assert kf.shape[1] == 3
    rk, kk = layer_statistics(keys, resid)
    torch.testing.assert_close(statistics_from_factors(kf, rf), (rk, kk), rtol=1e-10, atol=1e-10)


def test_thin_factors_of_no_requests_are_empty_and_of_zero_keys_too():
    kf, rf = thin_factors(np.zeros((9, 0)), np.zeros((6, 0)))
    assert kf.shape == (9, 0) and rf.shape == (6, 0)
    kf, rf = thin_factors(np.zeros((9, 2)), np.ones((6, 2)))
    assert kf.shape == (9, 0) and rf.shape == (6, 0)
    with pytest.raises(ValueError, match="one column per request"):
        thin_factors(np.zeros((9, 2)), np.zeros((6, 3)))


def test_summed_factors_are_a_factor_of_the_summed_statistics_with_no_client_columns():
    gen = torch.Generator().manual_seed(1)
    parts, dense = [], []
    for n in (3, 0, 5):
        keys = torch.randn(n, 9, generator=gen, dtype=torch.float64)
        resid = torch.randn(n, 6, generator=gen, dtype=torch.float64)
        kf, rf = thin_factors(keys.T.numpy(), resid.T.numpy())
        parts.append({"kf": kf.astype(np.float32), "rf": rf.astype(np.float32)})
        dense.append({k: v.numpy() for k, v in zip(("rk", "kk"), layer_statistics(keys, resid))})
    summed = sum_factors(parts)
    assert summed["kf"].shape == (9, 8) and summed["rf"].shape == (6, 8)
    rk, kk = statistics_from_factors(summed["kf"], summed["rf"])
    sums = sum_statistics(dense)
    np.testing.assert_allclose(rk.numpy(), sums["rk"], rtol=1e-5, atol=1e-5 * np.abs(sums["rk"]).max())
    np.testing.assert_allclose(kk.numpy(), sums["kk"], rtol=1e-5, atol=1e-5 * np.abs(sums["kk"]).max())
    # the returned columns are the sums' principal directions, not any client's own columns
    first = parts[0]["kf"] / np.linalg.norm(parts[0]["kf"], axis=0)
    back = summed["kf"] / np.linalg.norm(summed["kf"], axis=0)
    assert np.abs(first.T @ back).max() < 0.999


def test_psd_factor_and_the_dynamic_covariance_prior():
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    kk = (keys.T @ keys).numpy()
    f = psd_factor(kk)
    assert f.shape == (7, 3)
    np.testing.assert_allclose(f @ f.T, kk, atol=1e-10)
    assert psd_factor(np.zeros((4, 4))).shape == (4, 0)
    c0 = random_spd(7, gen)
    memory = torch.from_numpy(f)
    expected = 2.0 * (0.5 * c0 + 3.0 * torch.from_numpy(kk))
    torch.testing.assert_close(dynamic_prior(c0, memory, 2.0, 0.5, 3.0), expected)
    torch.testing.assert_close(dynamic_prior(c0, None, 2.0, 1.0, 3.0), 2.0 * c0)  # no earlier keys yet
    torch.testing.assert_close(dynamic_prior(c0, memory, 2.0, 1.0, 0.0), 2.0 * c0)  # beta1 0: plain MEMIT
