"""natgrad.nn.reparametrize (PRONG, Desjardins et al. 2015): the function is preserved, the
whitened inputs have the expected moments, the Fisher of a whitened model, singular
covariances, data loaders and PRONG+.

Every expected value is computed here without the library's maths: the model's own outputs
before a reparametrization, layer inputs captured with plain forward hooks and their moments
in numpy float64, and the brute-force Fisher of tests/reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import reference as ref
from prong_helpers import DT, MODELS, capture_inputs, lib, mlp, mlp_inputs, rows, sgd_steps, whitened_modules

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


# --------------------------------------------------------------------------------------
# reparametrize: the function is preserved, with training in between, without drift
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bias", [True, False])
def test_reparametrize_preserves_function_over_many_rounds(kind, bias):
    nnn = lib()
    make, inputs = MODELS[kind]
    x = inputs()
    held_out = inputs(seed=7)
    model = nnn.whiten(make(bias=bias))
    for r in range(20):
        before, before_held = model(x).detach(), model(held_out).detach()
        nnn.reparametrize(model, x[torch.randperm(x.shape[0])[: x.shape[0] // 2 + 4]], eps=10.0 ** (-1 - r % 3))
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-10)
        torch.testing.assert_close(model(held_out), before_held, rtol=0, atol=1e-10)
        sgd_steps(model, x, 2, lr=0.01, seed=r)
    assert float(model(held_out).detach().abs().max()) < 20  # the tolerance above is absolute: outputs stayed O(1)
    # no drift: the plain network with the canonical weights still computes the same
    torch.testing.assert_close(nnn.unwhiten(model)(held_out), model(held_out), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_reparametrize_float32(kind):
    nnn = lib()
    make, inputs = MODELS[kind]
    x = inputs(dtype=torch.float32)
    model = nnn.whiten(make(dtype=torch.float32))
    for r in range(20):
        before = model(x).detach()
        nnn.reparametrize(model, x)
        assert model.state_dict()[next(iter(model.state_dict()))].dtype == torch.float32
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-4)
        sgd_steps(model, x, 2, seed=r)


def test_reparametrize_matches_trained_plain_model():
    """After training steps, the plain network with the canonical W = V U, b = d − W μ (taken
    before the reparametrization) computes what the reparametrized network computes."""
    nnn = lib()
    x = mlp_inputs()
    model = nnn.whiten(mlp())
    for r in range(5):
        sgd_steps(model, x, 3, seed=r)
        plain = nnn.unwhiten(model)
        nnn.reparametrize(model, x)
        probe = mlp_inputs(seed=100 + r)
        torch.testing.assert_close(model(probe), plain(probe), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------
# reparametrize: the whitened inputs on the estimation sample
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("eps", [1e-2, 0.5])
def test_whitened_inputs_have_zero_mean_and_covariance_sigma_over_sigma_plus_eps(kind, eps):
    nnn = lib()
    make, inputs = MODELS[kind]
    x = inputs()
    model = nnn.whiten(make())
    sgd_steps(model, x, 3)
    nnn.reparametrize(model, x, eps=eps)  # first round: from U = I, μ = 0
    sgd_steps(model, x, 3)
    captured = capture_inputs(model, x)  # the layers' inputs (unchanged by the next round)
    info = nnn.reparametrize(model, x, eps=eps)
    for name, layer in whitened_modules(model):
        h = rows(layer, captured[name])
        mu = h.mean(0)
        sigma = (h - mu).T @ (h - mu) / h.shape[0]  # population covariance
        n = sigma.shape[0]
        np.testing.assert_allclose(layer.mean.numpy(), mu, rtol=0, atol=1e-12)
        u = layer.whitener.numpy()
        np.testing.assert_allclose(u, u.T, rtol=0, atol=1e-12)  # ZCA: symmetric
        np.testing.assert_allclose(u @ (sigma + eps * np.eye(n)) @ u, np.eye(n), rtol=0, atol=1e-9)
        he = (h - layer.mean.numpy()) @ u.T
        np.testing.assert_allclose(he.mean(0), 0.0, rtol=0, atol=1e-10)
        expected = sigma @ np.linalg.inv(sigma + eps * np.eye(n))
        np.testing.assert_allclose(he.T @ he / h.shape[0], expected, rtol=0, atol=1e-9)
        # the info reports the spectrum of Σ and the sample size
        assert info[name]["samples"] == h.shape[0]
        np.testing.assert_allclose(info[name]["eigenvalues"].numpy(), np.linalg.eigvalsh(sigma), rtol=0, atol=1e-10)


def test_homogeneous_input_factor_is_identity_for_small_eps():
    """E[[h_e; 1][h_e; 1]ᵀ] = I (the input side of the layer's Fisher block, Desjardins et al.)
    when ε is negligible against the spectrum; in general diag λ/(λ + ε) in Σ's eigenbasis."""
    nnn = lib()
    x = mlp_inputs(n=200)
    model = nnn.whiten(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double())
    eps = 1e-9
    captured = capture_inputs(model, x)
    nnn.reparametrize(model, x, eps=eps)
    for name, layer in whitened_modules(model):
        h = rows(layer, captured[name])
        he = (h - layer.mean.numpy()) @ layer.whitener.numpy().T
        hom = np.concatenate([he, np.ones((he.shape[0], 1))], 1)
        a = hom.T @ hom / he.shape[0]
        np.testing.assert_allclose(a, np.eye(a.shape[0]), rtol=0, atol=1e-6)
    # larger ε: diagonal λ/(λ+ε) and zero off-diagonals in the eigenbasis of Σ
    eps = 0.1
    nnn.reparametrize(model, x, eps=eps)
    for name, layer in whitened_modules(model):
        h = rows(layer, captured[name])
        sigma = np.cov(h.T, bias=True)
        lam, vecs = np.linalg.eigh(sigma)
        he = (h - layer.mean.numpy()) @ layer.whitener.numpy().T
        rotated = he @ vecs
        np.testing.assert_allclose(rotated.T @ rotated / h.shape[0], np.diag(lam / (lam + eps)), rtol=0, atol=1e-10)


def test_layer_without_bias_is_whitened_without_centring():
    nnn = lib()
    x = mlp_inputs()
    model = nnn.whiten(mlp(bias=(True, False, True)))
    captured = capture_inputs(model, x)
    eps = 1e-2
    nnn.reparametrize(model, x, eps=eps)
    layer = model[2]
    assert layer.bias is None
    assert torch.equal(layer.mean, torch.zeros(5, dtype=DT))
    h = rows(layer, captured["2"])
    second = h.T @ h / h.shape[0]  # uncentred second moment E[h hᵀ]
    he = h @ layer.whitener.numpy().T
    np.testing.assert_allclose(he.T @ he / h.shape[0], second @ np.linalg.inv(second + eps * np.eye(5)), rtol=0, atol=1e-9)


def test_kfac_input_factor_of_whitened_layers():
    """natgrad.fisher's K-FAC input factor of a whitened Linear is E[[h_e;1][h_e;1]ᵀ] = blockdiag(Σ(Σ+εI)⁻¹, 1),
    far better conditioned than the plain layer's E[[h;1][h;1]ᵀ]."""
    import natgrad

    nnn = lib()
    x, y = mlp_inputs(n=100), torch.randint(0, 3, (100,))
    plain = mlp()
    model = nnn.whiten(plain)
    captured = capture_inputs(model, x)
    eps = 1e-3
    nnn.reparametrize(model, x, eps=eps)
    white_k = natgrad.fisher(model, (x, y), structure="kfac", estimator="exact")
    plain_k = natgrad.fisher(plain, (x, y), structure="kfac", estimator="exact")
    for op, plain_op, (name, layer) in zip(white_k.operators, plain_k.operators, whitened_modules(model)):
        h = rows(layer, captured[name])
        sigma = np.cov(h.T, bias=True)
        n = sigma.shape[0]
        expected = np.eye(n + 1)
        expected[:n, :n] = sigma @ np.linalg.inv(sigma + eps * np.eye(n))
        np.testing.assert_allclose(op.input_factor[0].numpy(), expected, rtol=0, atol=1e-9)
        assert np.linalg.cond(op.input_factor[0].numpy()) < np.linalg.cond(plain_op.input_factor[0].numpy())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_dense_fisher_of_whitened_model(kind):
    """natgrad.fisher(structure='dense') on a whitened model equals the brute-force Fisher
    (autograd, one example and one outcome at a time) in the parameters V, d."""
    import natgrad

    nnn = lib()
    make, inputs = MODELS[kind]
    x = inputs(n=6)
    model = nnn.whiten(make())
    nnn.reparametrize(model, inputs(n=20, seed=3))
    F = natgrad.fisher(model, x, structure="dense", estimator="exact").to_dense()
    expected = ref.fisher_exact(model, x, "categorical")
    torch.testing.assert_close(F, expected, rtol=0, atol=1e-12 * float(expected.abs().max()) + 1e-15)
    # the exact per-layer blocks through the whitened layers' Kronecker adapters
    K = natgrad.fisher(model, x, structure="kron_sum", estimator="exact").to_dense()
    torch.testing.assert_close(K, ref.block_diagonal(expected, model), rtol=0, atol=1e-9 * float(expected.abs().max()))


# --------------------------------------------------------------------------------------
# singular covariances, data loaders, PRONG+
# --------------------------------------------------------------------------------------
def test_singular_covariance_constant_column_and_dead_unit():
    nnn = lib()
    torch.manual_seed(0)
    x = mlp_inputs()
    x[:, 2] = 0.0  # a constant pixel (an MNIST border)
    x[:, 4] = 1.0
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = -1.0  # unit 1 is dead: ReLU(−1) = 0 for every input
    white = nnn.whiten(model)
    before = white(x).detach()
    eps = 1e-2
    info = nnn.reparametrize(white, x, eps=eps)
    for name, layer in whitened_modules(white):
        for t in (layer.weight, layer.bias, layer.mean, layer.whitener):
            assert bool(torch.isfinite(t).all())
        # the null directions get the largest gain ε^(-1/2), no more
        assert info[name]["eigenvalues"][0].abs() < 1e-12
        lam = torch.linalg.eigvalsh(layer.whitener)
        torch.testing.assert_close(lam.max(), torch.tensor(eps ** -0.5, dtype=DT), rtol=1e-12, atol=0)
    torch.testing.assert_close(white(x), before, rtol=0, atol=1e-10)
    torch.testing.assert_close(white[2].mean[1], torch.tensor(0.0, dtype=DT))


def test_dataloader_inputs_match_tensor():
    nnn = lib()
    x = mlp_inputs(n=50)
    y = torch.randint(0, 3, (50,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    a, b = nnn.whiten(mlp()), nnn.whiten(mlp())
    nnn.reparametrize(a, x)
    nnn.reparametrize(b, loader)
    for (_, la), (_, lb) in zip(whitened_modules(a), whitened_modules(b)):
        torch.testing.assert_close(la.mean, lb.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(la.whitener, lb.whitener, rtol=0, atol=1e-10)
    c = nnn.whiten(mlp())
    nnn.reparametrize(c, [x[:20], (x[20:], y[20:])])  # a list of tensors / (x, y) batches
    torch.testing.assert_close(c[0].whitener, a[0].whitener, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_prong_plus_batchnorm(kind):
    nnn = lib()
    make, inputs = MODELS[kind]
    x = inputs()
    model = nnn.whiten(make(), batchnorm=True)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    layers = whitened_modules(model)
    assert len(norms) == len(layers) > 0
    for _, layer in layers:  # each whitened layer is directly followed by its BN
        parent = next(m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 2 and m[0] is layer)
        assert isinstance(parent[1], nn.modules.batchnorm._BatchNorm)
    sgd_steps(model, x, 3)  # train mode: BN uses batch statistics and updates running ones
    def running():
        return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    for r in range(5):
        model.eval()
        before_eval = model(x).detach()
        saved = running()
        model.train()
        before_train = model(x).detach()  # (updates the running statistics: restore them)
        model.load_state_dict({**model.state_dict(), **saved})
        nnn.reparametrize(model, x)  # in train mode
        for k, v in running().items():  # the statistics pass left BN's running statistics alone
            assert torch.equal(v, saved[k])
        model.eval()
        torch.testing.assert_close(model(x), before_eval, rtol=0, atol=1e-10)
        model.train()
        torch.testing.assert_close(model(x), before_train, rtol=0, atol=1e-10)
        sgd_steps(model, x, 2, seed=r)
    alias = nnn.whiten(make(), plus=True)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in alias.modules()) == len(layers)


def test_shared_layer_and_non_plain_subclasses():
    nnn = lib()

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    shared = nn.Linear(4, 4).double()
    model = nn.Sequential(shared, nn.Tanh(), shared, Doubled(4, 2).double())
    x = torch.randn(10, 4, dtype=DT)
    expected = model(x).detach()
    white = nnn.whiten(model)
    assert white[0] is white[2] and isinstance(white[0], nnn.WhitenedLinear)
    assert type(white[3]) is Doubled  # a subclass computing something else is left alone
    info = nnn.reparametrize(white, x)
    assert info["0"]["samples"] == 20  # both calls of the shared layer
    torch.testing.assert_close(white(x), expected, rtol=0, atol=1e-10)
