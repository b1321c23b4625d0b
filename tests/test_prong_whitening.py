"""natgrad.nn.whitening: the statistics and eigendecomposition of a reparametrization.

Float32 models are whitened in float32 when it is accurate enough and in float64 otherwise;
constant features are deflated exactly; the sums can be reduced over data shards. Expected
values are computed here in numpy float64 from the inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import natgrad.nn as nnn
from natgrad.nn import whitening as W


def correlated(n=300, d=12, seed=0, dtype=torch.float32, scale=1.0, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix * scale + offset
    return x.to(dtype)


def mlp(d=12, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 10), nn.Tanh(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def zca(cov, eps):
    lam, q = np.linalg.eigh(cov)
    return (q / np.sqrt(np.clip(lam, 0, None) + eps)) @ q.T


def test_float32_model_is_whitened_in_float32_to_eps_over_10():
    x = correlated()
    model = nnn.whiten(mlp())
    before = model(x).detach()
    eps = 1e-2
    info = nnn.reparametrize(model, x, eps=eps)
    assert info["0"]["whitening"].dtype == torch.float32
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    h = x.double().numpy()
    sigma = np.cov(h.T, bias=True)
    lam = np.linalg.eigvalsh(sigma)
    # eigenvalues within ε/10, hence U within a few % of the float64 ZCA whitener
    np.testing.assert_allclose(info["0"]["eigenvalues"].numpy(), lam, rtol=0, atol=eps / 10)
    u = model[0].whitener.double().numpy()
    np.testing.assert_allclose(u, zca(sigma, eps), rtol=0, atol=0.05 * eps ** -0.5)
    np.testing.assert_allclose(model[0].mean.double().numpy(), h.mean(0), rtol=0, atol=1e-5)


def test_float64_model_stays_float64():
    x = correlated(dtype=torch.float64)
    model = nnn.whiten(mlp(dtype=torch.float64))
    info = nnn.reparametrize(model, x)
    assert all(i["whitening"].dtype == torch.float64 for i in info.values())


def test_badly_scaled_float32_inputs_fall_back_to_float64():
    """λ_max/ε far beyond what float32 resolves: float64 statistics (the shift 0 is also far
    from the mean, so the float32 sums would cancel) and eigendecomposition."""
    x = correlated(scale=300.0, offset=2000.0)
    model = nnn.whiten(mlp())
    before = model(x).detach()
    info = nnn.reparametrize(model, x, eps=1e-2)
    assert info["0"]["whitening"].dtype == torch.float64
    out = model(x)
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, before, rtol=1e-4, atol=1e-4)
    sigma = np.cov(x.double().numpy().T, bias=True)
    np.testing.assert_allclose(info["0"]["eigenvalues"].numpy(), np.linalg.eigvalsh(sigma), rtol=1e-5, atol=1e-3)


def test_float32_eigh_failure_or_nan_retries_in_float64(monkeypatch):
    x = correlated()
    original = torch.linalg.eigh
    for failure in ("raise", "nan"):
        calls = []

        def eigh(a, *args, failure=failure, **kwargs):
            calls.append(a.dtype)
            if a.dtype == torch.float32:
                if failure == "raise":
                    raise torch.linalg.LinAlgError("simulated convergence failure")
                lam, vecs = original(a, *args, **kwargs)
                return lam, torch.full_like(vecs, float("nan"))
            return original(a, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, "eigh", eigh)
        model = nnn.whiten(mlp())
        before = model(x).detach()
        info = nnn.reparametrize(model, x)
        assert torch.float32 in calls and torch.float64 in calls
        assert all(i["whitening"].dtype == torch.float64 for i in info.values())
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        monkeypatch.setattr(torch.linalg, "eigh", original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_features_and_dead_units_are_deflated_exactly(dtype):
    """Constant inputs (MNIST borders, here off zero so that the first shift is off too) and a
    dead ReLU unit: their rows of Σ are exactly 0, gain ε^(-1/2), no coupling, no NaN."""
    x = correlated(dtype=dtype)
    x[:, 3] = -0.4242
    x[:, 7] = 2.5
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[0].bias[2] = -1.0  # dead unit
    model = nnn.whiten(model)
    eps = 1e-2
    for _ in range(3):  # the first round from μ = 0, then around the estimated μ
        before = model(x).detach()
        info = nnn.reparametrize(model, x, eps=eps)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-10 if dtype == torch.float64 else 1e-5)
    for name, index in (("0", [3, 7]), ("2", [2])):
        layer = model[int(name)]
        u = layer.whitener.double()
        for i in index:
            expected = torch.zeros(u.shape[0], dtype=torch.float64)
            expected[i] = eps ** -0.5
            assert torch.equal(u[i], expected.to(u.dtype).double()) and torch.equal(u[:, i], u[i])
        assert info[name]["whitening"].active.numel() == u.shape[0] - len(index)
        assert bool((info[name]["eigenvalues"][: len(index)] == 0).all())
        for t in (layer.weight, layer.bias, layer.mean, layer.whitener):
            assert bool(torch.isfinite(t).all())
    assert float(model[0].mean[3]) == pytest.approx(-0.4242, abs=1e-6)


def test_deflated_whitening_matches_the_full_eigendecomposition():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 9, generator=g, dtype=torch.float64)
    a[:, [1, 5]] = 0.0
    cov = a.T @ a / 40
    mean = torch.randn(9, generator=g, dtype=torch.float64)
    eps = 0.05
    white = W.whitening_from_moments(mean, cov, eps)
    assert white.active.tolist() == [0, 2, 3, 4, 6, 7, 8]
    u = zca(cov.numpy(), eps)
    np.testing.assert_allclose(white.whitener().numpy(), u, rtol=0, atol=1e-12)
    np.testing.assert_allclose(white.spectrum.numpy(), np.clip(np.linalg.eigvalsh(cov.numpy()), 0, None), atol=1e-12)
    for rows in (3, 20):  # both orders of the products
        m = torch.randn(rows, 9, generator=g, dtype=torch.float64)
        np.testing.assert_allclose(white.times_inverse(m).numpy(), m.numpy() @ np.linalg.inv(u), rtol=0, atol=1e-11)
    conv = torch.randn(4, 9, 3, 3, generator=g, dtype=torch.float64)
    expected = np.einsum("oikl,ij->ojkl", conv.numpy(), np.linalg.inv(u))
    np.testing.assert_allclose(white.times_inverse(conv).numpy(), expected, rtol=0, atol=1e-11)
    everything = W.whitening_from_moments(mean, torch.zeros(9, 9, dtype=torch.float64), eps)
    assert everything.active.numel() == 0 and everything.condition == 1.0
    torch.testing.assert_close(everything.whitener(), torch.eye(9, dtype=torch.float64) * eps ** -0.5)


def test_one_shot_iterator_is_summed_in_float64_and_matches_the_tensor():
    x = correlated()
    a, b = nnn.whiten(mlp()), nnn.whiten(mlp())
    info_a = nnn.reparametrize(a, x)
    info_b = nnn.reparametrize(b, iter([x[:100], x[100:]]))
    assert info_b["0"]["whitening"].dtype == torch.float64
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-4)
    torch.testing.assert_close(info_b["0"]["eigenvalues"], info_a["0"]["eigenvalues"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sums_of_shards_add_up(dtype):
    """What a data-parallel reduction relies on: the layer sums of two shards, summed (count, s1,
    s2) and min/max-ed (low, high), are the sums of the whole sample; so are the moments."""
    x = correlated(dtype=dtype)
    x[:, 4] = 1.0
    model = nnn.whiten(mlp(dtype=dtype))
    nnn.reparametrize(model, x[:50])  # a shift (μ) that is not 0
    layers = nnn.whitened_layers(model)
    whole, n = W.layer_sums(model, layers, x, dtype)
    first, n1 = W.layer_sums(model, layers, x[:120], dtype)
    second, n2 = W.layer_sums(model, layers, x[120:], dtype)
    assert n == n1 + n2 == x.shape[0]
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
    for name, s in whole.items():
        p, q = first[name], second[name]
        assert torch.equal(p.shift, s.shift) and torch.equal(q.shift, s.shift)
        assert p.count + q.count == s.count
        torch.testing.assert_close(p.s1 + q.s1, s.s1, **tol)
        torch.testing.assert_close(p.s2 + q.s2, s.s2, **tol)
        assert torch.equal(torch.minimum(p.low, q.low), s.low) and torch.equal(torch.maximum(p.high, q.high), s.high)
        p.s1 += q.s1
        p.s2 += q.s2
        p.count += q.count
        p.low, p.high = torch.minimum(p.low, q.low), torch.maximum(p.high, q.high)
        for got, expected in zip(p.moments(), s.moments()):
            torch.testing.assert_close(got, expected, **tol)


def test_float32_eigendecomposition_is_checked():
    """From float32 moments: float32 when its error estimate √k·u·λ_max is within ε/10, float64
    when λ_max/ε is too large or Σ has an eigenvalue below −ε/10 (rounding beyond the estimate)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 6, generator=g, dtype=torch.float64)
    cov = a.T @ a / 50
    mean = torch.zeros(6, dtype=torch.float32)
    assert W.whitening_from_moments(mean, cov.float(), 1e-2).dtype == torch.float32
    assert W.whitening_from_moments(mean, (cov * 1e5).float(), 1e-2).dtype == torch.float64
    indefinite = cov - 0.5 * torch.eye(6, dtype=torch.float64) * float(torch.linalg.eigvalsh(cov)[0] + 1)
    white = W.whitening_from_moments(mean, indefinite.float(), 1e-2)
    assert white.dtype == torch.float64 and bool((white.eigenvalues >= 0).all())
    with pytest.raises(ValueError, match="not finite"):
        W.whitening_from_moments(mean, torch.full((6, 6), float("nan")), 1e-2)
