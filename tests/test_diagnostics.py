"""natgrad.diagnostics.condition_numbers against a brute-force float64 reference.

The reference builds every matrix by hand from per-example quantities: the layer inputs
captured with forward hooks (``[h; 1]``, or ``[U (h − μ); 1]`` for a whitened layer, or the
im2col patches of a convolution), the output Jacobians ``J_n = ∂ logits / ∂ a`` by autograd one
example and one class at a time, and the categorical output Fisher ``diag(p) − p pᵀ``:
``A = mean ā āᵀ``, ``G = mean Jᵀ D J``, ``F = mean (Jᵀ D J) ⊗ ā āᵀ`` (the condition number does
not depend on the order of the parameters). Condition numbers from ``torch.linalg.cond`` and
``eigvalsh``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import natgrad
from natgrad.diagnostics import condition_number, condition_numbers

DT = torch.float64


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def inputs(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(5, 5, generator=g, dtype=DT)
    return torch.randn(n, 5, generator=g, dtype=DT) @ mix + torch.linspace(-1, 2, 5, dtype=DT)


def layer_vectors(layer, h):
    """ā per row: [h; 1], or [U (h − μ); 1] for a whitened layer."""
    if isinstance(layer, natgrad.nn.WhitenedLinear):
        h = (h - layer.mean) @ layer.whitener.T
    return torch.cat([h, torch.ones(h.shape[0], 1, dtype=DT)], 1)


def brute_force(model, x):
    """{layer name: (A, G, F)} of the exact categorical Fisher, example by example."""
    names = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, natgrad.nn.WhitenedLinear))]
    modules = dict(model.named_modules())
    result = {name: [0, 0, 0] for name in names}
    for n in range(x.shape[0]):
        seen = {}
        handles = [modules[name].register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, (args[0].detach(), out))) for name in names]
        logits = model(x[n:n + 1])[0]
        for h in handles:
            h.remove()
        p = torch.softmax(logits, 0).detach()
        d = torch.diag(p) - torch.outer(p, p)
        for name in names:
            h, out = seen[name]
            jac = torch.stack([torch.autograd.grad(logits[k], out, retain_graph=True)[0][0] for k in range(3)])
            g = jac.T @ d @ jac
            a = layer_vectors(modules[name], h)[0]
            aa = torch.outer(a, a)
            for i, m in enumerate((aa, g, torch.kron(g, aa))):
                result[name][i] = result[name][i] + m / x.shape[0]
    return result


def cond(m, damping=0.0):
    lam = torch.linalg.eigvalsh(m)
    return float((lam[-1] + damping) / (lam[0] + damping))


def test_plain_mlp_against_brute_force():
    model, x = mlp(), inputs()
    got = condition_numbers(model, x, exact=True)
    ref = brute_force(model, x)
    a, g, f = ref["0"]
    assert got["0"]["input_factor"] == pytest.approx(float(torch.linalg.cond(a)), rel=1e-8)
    assert got["0"]["output_factor"] == pytest.approx(float(torch.linalg.cond(g)), rel=1e-8)
    assert got["0"]["kfac_block"] == pytest.approx(cond(a) * cond(g), rel=1e-8)
    assert got["0"]["exact_block"] == pytest.approx(float(torch.linalg.cond(f)), rel=1e-7)
    # the last layer's output factor is singular (softmax ignores a common shift of the logits)
    a, g, f = ref["2"]
    assert got["2"]["input_factor"] == pytest.approx(float(torch.linalg.cond(a)), rel=1e-8)
    assert torch.linalg.eigvalsh(g)[0].abs() < 1e-14
    assert got["2"]["output_factor"] == got["2"]["kfac_block"] == got["2"]["exact_block"] == math.inf
    # with damping δ: (λ_max + δ) / (λ_min + δ) of each matrix; eigenvalues of G ⊗ A are products
    delta = 1e-3
    damped = condition_numbers(model, x, damping=delta, exact=True)
    lam_a, lam_g = torch.linalg.eigvalsh(a), torch.linalg.eigvalsh(g).clamp(min=0)
    assert damped["2"]["input_factor"] == pytest.approx(cond(a, delta), rel=1e-8)
    assert damped["2"]["kfac_block"] == pytest.approx(
        float((lam_a[-1] * lam_g[-1] + delta) / (lam_a[0] * lam_g[0] + delta)), rel=1e-8)
    lam_f = torch.linalg.eigvalsh(f).clamp(min=0)
    assert damped["2"]["exact_block"] == pytest.approx(float((lam_f[-1] + delta) / (lam_f[0] + delta)), rel=1e-6)


def test_whitened_layers_input_factor_is_identity_up_to_eps():
    """After reparametrize on the same inputs, A = E[[h_e; 1][h_e; 1]ᵀ] = diag(Σ(Σ + εI)⁻¹, 1) in
    Σ's eigenbasis: its eigenvalues are λ/(λ + ε) and 1, so cond(A) = (λ_min + ε)/λ_min."""
    x = inputs(n=200)
    model = natgrad.nn.whiten(mlp())
    plain = condition_numbers(model, x)  # U = I, μ = 0: the plain layer's factor
    eps = 1e-2
    captured = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, args[0].detach()))
               for name, m in model.named_modules() if isinstance(m, natgrad.nn.WhitenedLinear)]
    model(x)
    for h in handles:
        h.remove()
    natgrad.nn.reparametrize(model, x, eps=eps)
    got = condition_numbers(model, x, exact=True)
    ref = brute_force(model, x)
    for name, h in captured.items():
        sigma = torch.cov(h.T, correction=0)
        lam_min = float(torch.linalg.eigvalsh(sigma)[0])
        expected = (lam_min + eps) / lam_min
        assert got[name]["input_factor"] == pytest.approx(expected, rel=1e-8)
        assert 1.0 <= got[name]["input_factor"] <= 1.0 + eps / lam_min + 1e-8
        assert got[name]["input_factor"] < plain[name]["input_factor"]
        assert got[name]["input_factor"] == pytest.approx(float(torch.linalg.cond(ref[name][0])), rel=1e-8)
    a, g, f = ref["0"]
    assert got["0"]["exact_block"] == pytest.approx(float(torch.linalg.cond(f)), rel=1e-7)


def test_constant_input_gives_inf_never_nan():
    x = inputs()
    x[:, 2] = 0.7  # a constant pixel: [h; 1] is rank deficient
    model = mlp()
    got = condition_numbers(model, x)
    assert got["0"]["input_factor"] == math.inf and got["0"]["kfac_block"] == math.inf
    delta = 1e-4
    damped = condition_numbers(model, x, damping=delta)
    a = brute_force(model, x)["0"][0]
    lam = torch.linalg.eigvalsh(a)
    assert damped["0"]["input_factor"] == pytest.approx(float(lam[-1] + delta) / delta, rel=1e-6)
    white = natgrad.nn.whiten(model)
    natgrad.nn.reparametrize(white, x)
    got = condition_numbers(white, x)
    assert got["0"]["input_factor"] == math.inf  # the constant coordinate is whitened to 0
    assert not any(math.isnan(v) for layer in got.values() for v in layer.values())


def test_convolution_input_factor_is_the_patch_factor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(DT)
    x = torch.randn(10, 2, 4, 4, dtype=DT) + torch.tensor([1.0, -2.0], dtype=DT)[:, None, None]
    patches = TF.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)  # every position a row
    hom = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=DT)], 1)
    a = hom.T @ hom / hom.shape[0]
    got = condition_numbers(model, x)
    assert got["0"]["input_factor"] == pytest.approx(float(torch.linalg.cond(a)), rel=1e-8)


def test_condition_number_conventions_and_errors():
    assert condition_number(torch.diag(torch.tensor([4.0, 1.0], dtype=DT))) == 4.0
    assert condition_number(torch.diag(torch.tensor([4.0, 0.0], dtype=DT))) == math.inf
    assert condition_number(torch.zeros(3, 3)) == math.inf
    assert condition_number(torch.zeros(3, 3), damping=0.5) == 1.0
    assert condition_number(torch.diag(torch.tensor([4.0, 0.0], dtype=DT)), damping=1.0) == 5.0
    # rounding-level negative or tiny eigenvalues of a singular float32 matrix count as 0
    v = torch.randn(6, 3)
    assert condition_number(v @ v.T) == math.inf
    # a batch of blocks: the extreme eigenvalues over the blocks
    assert condition_number(torch.stack([torch.eye(2) * 3, torch.eye(2)])) == 3.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping"):
            condition_number(torch.eye(2), damping=bad)
    with pytest.raises(TypeError, match="damping"):
        condition_number(torch.eye(2), damping="0")
    with pytest.raises(ValueError, match="square"):
        condition_number(torch.ones(2, 3))
    with pytest.raises(ValueError, match="finite"):
        condition_number(torch.full((2, 2), float("nan")))
    with pytest.raises(TypeError, match="Module"):
        condition_numbers("model", torch.zeros(2, 5))
    with pytest.raises(TypeError, match="exact"):
        condition_numbers(mlp(), inputs(), exact="yes")
