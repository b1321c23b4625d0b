"""natgrad.nn: whitened layers and whiten/unwhiten (PRONG, Desjardins et al. 2015); the
reparametrization is tested in test_prong_reparametrize.py.

Every expected value is computed here without the library's maths: the model's own outputs
before a conversion and the layer formula V U (h − μ) + d written out with explicit padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from prong_helpers import DT, MODELS, lib, mlp, mlp_inputs, sgd_steps, whitened_modules

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


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
