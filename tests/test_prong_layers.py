"""natgrad.nn: whitened layers, whiten/unwhiten, reparametrize (PRONG, Desjardins et al. 2015).

Every expected value is computed here without the library's maths: the model's own outputs
before a reparametrization, layer inputs captured with plain forward hooks and their moments
in numpy float64, the layer formula V U (h − μ) + d written out with explicit padding, and the
brute-force Fisher of tests/reference.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import reference as ref

DT = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


def lib():
    import natgrad.nn as nnn

    return nnn


# --------------------------------------------------------------------------------------
# models and data: correlated, off-centre inputs so that whitening is far from the identity
# --------------------------------------------------------------------------------------
def mlp(seed=0, bias=True, dtype=DT):
    torch.manual_seed(seed)
    b = (bias, bias, bias) if isinstance(bias, bool) else bias
    return nn.Sequential(
        nn.Linear(6, 5, bias=b[0]), nn.Tanh(), nn.Linear(5, 4, bias=b[1]), nn.ReLU(), nn.Linear(4, 3, bias=b[2])
    ).to(dtype)


def cnn(seed=0, bias=True, dtype=DT):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=bias),
        nn.Tanh(),
        nn.Conv2d(4, 3, 3, stride=2, dilation=2, padding=2, bias=bias),
        nn.ReLU(),
        nn.Conv2d(3, 3, 2, padding="same", bias=bias),  # even kernel: asymmetric 'same' padding
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3, bias=bias),
    ).to(dtype)


def mlp_inputs(n=64, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 6, generator=g, dtype=DT)
    x = torch.randn(n, 6, generator=g, dtype=DT) @ mix + torch.linspace(-2, 3, 6, dtype=DT)
    return x.to(dtype)


def cnn_inputs(n=16, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(2, 2, generator=g, dtype=DT)
    x = torch.einsum("nchw,cd->ndhw", torch.randn(n, 2, 7, 7, generator=g, dtype=DT), mix)
    return (x + torch.tensor([1.5, -0.5], dtype=DT)[:, None, None]).to(dtype)


MODELS = {"mlp": (mlp, mlp_inputs), "cnn": (cnn, cnn_inputs)}


def whitened_modules(model):
    nnn = lib()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nnn.WhitenedLinear, nnn.WhitenedConv2d))]


def capture_inputs(model, x):
    """{name: the input tensor of every whitened layer} from one plain forward pass."""
    seen, handles = {}, []
    for name, m in whitened_modules(model):
        handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].detach().clone())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def rows(layer, h):
    """The layer's input samples as a numpy [rows, in] array (conv: every position a row)."""
    nnn = lib()
    if isinstance(layer, nnn.WhitenedConv2d):
        h = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    return h.reshape(-1, h.shape[-1]).double().numpy()


def sgd_steps(model, x, steps, lr=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        y = torch.randint(0, 3, (x.shape[0],), generator=g)
        opt.zero_grad()
        TF.cross_entropy(model(x), y).backward()
        opt.step()


# --------------------------------------------------------------------------------------
# whiten / unwhiten
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bias", [True, False])
def test_whiten_keeps_function_and_parameters(kind, bias):
    nnn = lib()
    make, inputs = MODELS[kind]
    model, x = make(bias=bias), inputs()
    expected = model(x).detach()
    white = nnn.whiten(model)
    assert white is not model and all(type(m) is not nn.Linear and type(m) is not nn.Conv2d for m in white.modules())
    layers = whitened_modules(white)
    assert len(layers) == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    for _, layer in layers:
        n = layer.whitener.shape[0]
        assert torch.equal(layer.whitener, torch.eye(n, dtype=DT)) and torch.equal(layer.mean, torch.zeros(n, dtype=DT))
        assert (layer.bias is not None) == bias
    assert sum(p.numel() for p in white.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(white(x), expected, rtol=0, atol=1e-12)
    # the original is untouched (a deep copy was converted)
    assert all(not isinstance(m, (nnn.WhitenedLinear, nnn.WhitenedConv2d)) for m in model.modules())


def test_whiten_inplace_and_idempotent():
    nnn = lib()
    model = mlp()
    same = nnn.whiten(model, inplace=True)
    assert same is model and isinstance(model[0], nnn.WhitenedLinear)
    again = nnn.whiten(model, inplace=True)
    assert again is model and len(whitened_modules(model)) == 3
    # a bare layer cannot be converted in place: the new layer is returned
    layer = nn.Linear(3, 2).double()
    new = nnn.whiten(layer, inplace=True)
    assert isinstance(new, nnn.WhitenedLinear)
    x = torch.randn(4, 3, dtype=DT)
    torch.testing.assert_close(new(x), layer(x), rtol=0, atol=1e-14)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bias", [True, False])
def test_unwhiten_round_trip(kind, bias):
    nnn = lib()
    make, inputs = MODELS[kind]
    x = inputs()
    white = nnn.whiten(make(bias=bias))
    nnn.reparametrize(white, x)  # non-trivial μ, U
    sgd_steps(white, x, 3)
    expected = white(x).detach()
    plain = nnn.unwhiten(white)
    assert not whitened_modules(plain)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in white.parameters())
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-12)
    # W = V U and b = d − W μ (summed over taps), written out independently
    for (name, layer), module in zip(whitened_modules(white), [m for m in plain.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]):
        v, u, mu = layer.weight.detach(), layer.whitener, layer.mean
        w = v @ u if v.dim() == 2 else torch.einsum("oikl,ij->ojkl", v, u)
        torch.testing.assert_close(module.weight.detach(), w, rtol=0, atol=1e-13)
        if bias:
            tap = w if w.dim() == 2 else w.sum((2, 3))
            torch.testing.assert_close(module.bias.detach(), layer.bias.detach() - tap @ mu, rtol=0, atol=1e-13)
    # and back again
    rewhite = nnn.whiten(plain)
    torch.testing.assert_close(rewhite(x), expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------
# the layer formulas, written out (explicit zero padding, then centring, then U per pixel)
# --------------------------------------------------------------------------------------
def random_whitening(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=DT)
    u = a @ a.T / n + 0.5 * torch.eye(n, dtype=DT)
    return torch.randn(n, generator=g, dtype=DT), u


def test_whitened_linear_formula():
    nnn = lib()
    torch.manual_seed(0)
    layer = nnn.WhitenedLinear(5, 3, dtype=DT)
    mu, u = random_whitening(5, 1)
    layer.mean.copy_(mu)
    layer.whitener.copy_(u)
    v, d = layer.weight.detach(), layer.bias.detach()
    for n in (2, 50):  # both evaluation orders (h_e first for small batches, folded V U for large)
        x = torch.randn(n, 5, dtype=DT)
        expected = torch.stack([v @ (u @ (xi - mu)) + d for xi in x])
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    x3 = torch.randn(4, 6, 5, dtype=DT)  # extra leading dimensions, like nn.Linear
    torch.testing.assert_close(layer(x3), torch.einsum("oi,ij,ntj->nto", v, u, x3 - mu) + d, rtol=0, atol=1e-12)


@pytest.mark.parametrize("padding,stride,dilation,kernel", [
    (1, 1, 1, 3), (2, 2, 2, 3), ((0, 2), (2, 1), 1, 3), ("same", 1, 2, 2), ("valid", 1, 1, 3), (0, 3, 1, (2, 3)),
])
def test_whitened_conv_formula_at_borders(padding, stride, dilation, kernel):
    nnn = lib()
    torch.manual_seed(0)
    layer = nnn.WhitenedConv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation, dtype=DT)
    mu, u = random_whitening(3, 2)
    layer.mean.copy_(mu)
    layer.whitener.copy_(u)
    x = torch.randn(2, 3, 8, 9, dtype=DT)
    reference = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation, dtype=DT)
    pads = reference._reversed_padding_repeated_twice
    xp = TF.pad(x, pads) - mu[:, None, None]  # pad with zeros first, then centre everything
    xe = torch.einsum("ij,njhw->nihw", u, xp)  # U on the channels of every pixel
    expected = TF.conv2d(xe, layer.weight.detach(), layer.bias.detach(), reference.stride, 0, reference.dilation)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    # the ordinary layer with W = V U, b = d − Σ_taps W μ computes the same with its own padding
    torch.testing.assert_close(layer.to_conv()(x), expected, rtol=0, atol=1e-12)


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


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
def test_bad_arguments():
    nnn = lib()
    x = mlp_inputs()
    model = nnn.whiten(mlp())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for eps in (0, 0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            nnn.reparametrize(model, x, eps=eps)
    with pytest.raises(TypeError, match="eps"):
        nnn.reparametrize(model, x, eps="0.1")
    with pytest.raises(ValueError, match="no inputs"):
        nnn.reparametrize(model, x[:0])
    with pytest.raises(ValueError, match="no inputs"):
        nnn.reparametrize(model, [])
    with pytest.raises(TypeError):
        nnn.reparametrize(model, 3.0)
    with pytest.raises(ValueError, match="whiten"):
        nnn.reparametrize(mlp(), x)  # no whitened layer
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        nnn.reparametrize(model, bad)
    for k, v in model.state_dict().items():  # failures left the model untouched
        assert torch.equal(v, state[k])
    with pytest.raises(TypeError):
        nnn.whiten("model")
    with pytest.raises(TypeError):
        nnn.unwhiten(None)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        nnn.whiten(nn.Sequential(nn.Tanh()))


def test_unsupported_convolutions():
    nnn = lib()
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten())
    with pytest.raises(NotImplementedError, match=r"'0'.*groups=2"):
        nnn.whiten(grouped)
    reflect = nn.Sequential(nn.Linear(3, 3), nn.Unflatten(1, (3, 1, 1)), nn.Conv2d(3, 2, 1, padding=1, padding_mode="reflect"))
    with pytest.raises(NotImplementedError, match=r"'2'.*reflect"):
        nnn.whiten(reflect)
    with pytest.raises(NotImplementedError):
        nnn.WhitenedConv2d(4, 4, 3, groups=4)
