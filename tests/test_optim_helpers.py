"""Shared pieces of the natgrad.optim test files, plus tests of those pieces themselves.

Everything that serves as an *expected* value here is computed without natgrad: losses,
gradients and factors come from torch.autograd and tests/reference.py (brute force, one
example at a time, float64); K-FAC/EKFAC directions are written plainly from the formulas
of docs/math.md and the issue (π heuristic, exact eigenbasis damping, EKFAC scales).

The other test_optim_* files import from this module; its own tests check the reference
directions against each other (matrix formulas vs dense Kronecker solves), so that an error
in the expected values cannot silently agree with an error in the library.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import helpers as H
import reference as ref

DT = torch.float64


# --------------------------------------------------------------------------------------
# machine hygiene: the suite shares 2 cores; tiny tensors gain nothing from threads
# --------------------------------------------------------------------------------------
def optim():
    import natgrad.optim

    return natgrad.optim


# --------------------------------------------------------------------------------------
# models, data, losses
# --------------------------------------------------------------------------------------
def mlp(seed=0, sizes=(5, 4, 3), dtype=DT):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
    return nn.Sequential(*layers).to(dtype)


def nll(out, y, likelihood="categorical"):
    """The mean negative log-likelihood of the batch (what opt.backward expects)."""
    n = out.shape[0]
    if likelihood == "categorical":
        return TF.cross_entropy(out, y)
    if likelihood == "gaussian":
        return 0.5 * ((out - y) ** 2).sum() / n
    if likelihood == "bernoulli":
        return TF.binary_cross_entropy_with_logits(out, y, reduction="sum") / n
    raise ValueError(likelihood)


def data(model, n, seed=1, likelihood="categorical"):
    return H.make_data(model, likelihood, n, seed)


def grad_of(model, x, y, likelihood="categorical"):
    """∇L of the mean NLL, flat in named_parameters order (plain autograd)."""
    params = [p for _, p in ref.trainable(model)]
    loss = nll(model(x), y, likelihood)
    return ref.flat_grad(loss, params).detach()


def loss_of(model, x, y, likelihood="categorical"):
    with torch.no_grad():
        return float(nll(model(x), y, likelihood))


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for _, p in ref.trainable(model)]).clone()


def train_step(opt, model, x, y, likelihood="categorical", closure=False):
    """The documented loop: zero_grad, forward, opt.backward(loss, out), step."""
    opt.zero_grad()
    out = model(x)
    loss = nll(out, y, likelihood)
    opt.backward(loss, out)
    if closure:
        return opt.step(lambda: nll(model(x), y, likelihood))
    return opt.step()


def step_change(opt, model, x, y, likelihood="categorical", closure=False):
    """θ_before − θ_after of one documented training step."""
    before = flat_params(model)
    train_step(opt, model, x, y, likelihood, closure)
    return before - flat_params(model)


def layer_of(model, name):
    return dict(model.named_modules())[name]


# --------------------------------------------------------------------------------------
# reference K-FAC pieces (no natgrad)
# --------------------------------------------------------------------------------------
def layer_slices(model):
    """[(layer name, module, slice of the flat vector)] for the Linear/Conv2d layers."""
    modules = dict(model.named_modules())
    return [(name, modules[name], sl) for name, _, sl in ref.module_slices(model)]


def to_groups(layer, flat_layer):
    """The joint matrices [W_g | b_g] ([out_g, d(+1)]) of one layer's flat slice."""
    groups, out_g, _, _ = ref.layer_geometry(layer)
    return [flat_layer[torch.tensor(ids)].reshape(out_g, -1) for ids in ref.layer_index_map(layer)]


def from_groups(layer, mats, size):
    out = torch.zeros(size, dtype=DT)
    for ids, m in zip(ref.layer_index_map(layer), mats):
        out[torch.tensor(ids)] = m.reshape(-1)
    return out


def pi_heuristic(A, G):
    return math.sqrt((float(torch.trace(A)) / A.shape[0]) / (float(torch.trace(G)) / G.shape[0]))


def factored_direction(model, grad, factors, damping):
    """Per layer and group: (G + √λ/π I)⁻¹ M (A + π√λ I)⁻¹, π = √((tr A/dim A)/(tr G/dim G)).
    ``damping`` a number or {layer name: λ'}."""
    out = torch.zeros_like(grad)
    for name, layer, sl in layer_slices(model):
        lam = damping[name] if isinstance(damping, dict) else damping
        mats = []
        for M, (A, G) in zip(to_groups(layer, grad[sl]), factors[name]):
            pi = pi_heuristic(A, G)
            Ad = A + pi * math.sqrt(lam) * torch.eye(A.shape[0], dtype=DT)
            Gd = G + math.sqrt(lam) / pi * torch.eye(G.shape[0], dtype=DT)
            mats.append(torch.linalg.solve(Gd, M) @ torch.linalg.inv(Ad))
        out[sl] = from_groups(layer, mats, sl.stop - sl.start)
    return out


def factored_direction_dense(model, grad, factors, damping):
    """The same direction as a dense solve with ((G + √λ/π I) ⊗ (A + π√λ I)) in the
    row-major joint order — an independent second path for the tests of this module."""
    out = torch.zeros_like(grad)
    for name, layer, sl in layer_slices(model):
        mats = []
        for M, (A, G) in zip(to_groups(layer, grad[sl]), factors[name]):
            pi = pi_heuristic(A, G)
            K = torch.kron(G + math.sqrt(damping) / pi * torch.eye(G.shape[0], dtype=DT),
                           A + pi * math.sqrt(damping) * torch.eye(A.shape[0], dtype=DT))
            mats.append(torch.linalg.solve(K, M.reshape(-1)).reshape(M.shape))
        out[sl] = from_groups(layer, mats, sl.stop - sl.start)
    return out


def eigen_direction(model, grad, factors, damping):
    """Exact damping: (G ⊗ A + λ I)⁻¹ vec(M) by a dense solve per layer and group."""
    out = torch.zeros_like(grad)
    for name, layer, sl in layer_slices(model):
        mats = []
        for M, (A, G) in zip(to_groups(layer, grad[sl]), factors[name]):
            K = torch.kron(G, A) + damping * torch.eye(A.shape[0] * G.shape[0], dtype=DT)
            mats.append(torch.linalg.solve(K, M.reshape(-1)).reshape(M.shape))
        out[sl] = from_groups(layer, mats, sl.stop - sl.start)
    return out


def ekfac_scales(model, x, y, likelihood, estimator, bases):
    """s = (1/N) Σ_{n,k} (Q_Gᵀ Γ_nk Q_A)² for the batch (x, y), in the given bases
    {layer: [(Q_A, Q_G) per group]} (the per-example Γ_nk from tests/reference.py)."""
    samples, layers = ref.layer_samples(model, x, y, likelihood, estimator)
    out = {}
    for name, m in layers:
        per_group = []
        for g, (QA, QG) in enumerate(bases[name]):
            s = 0
            for smp in samples[name]:
                gam = ref.per_example_gamma(smp, m, g)
                s = s + (QG.T @ gam @ QA).pow(2).sum(0)
            per_group.append(s / x.shape[0])
        out[name] = per_group
    return out


def bases_of(factors):
    return {name: [(torch.linalg.eigh(A)[1], torch.linalg.eigh(G)[1]) for A, G in pairs]
            for name, pairs in factors.items()}


def ekfac_direction(model, grad, bases, scales, damping):
    """Q_G [(Q_Gᵀ M Q_A) / (s + λ)] Q_Aᵀ per layer and group."""
    out = torch.zeros_like(grad)
    for name, layer, sl in layer_slices(model):
        mats = []
        for M, (QA, QG), s in zip(to_groups(layer, grad[sl]), bases[name], scales[name]):
            mats.append(QG @ ((QG.T @ M @ QA) / (s + damping)) @ QA.T)
        out[sl] = from_groups(layer, mats, sl.stop - sl.start)
    return out


MODELS = {"mlp": lambda: mlp(0), "cnn": lambda: H.cnn(0)}  # the K-FAC layer types: Linear, Conv2d


def mlp_batches(n, size=6, seed=10):
    """``n`` batches of ``size`` for the default mlp, seeds ``seed``, ``seed`` + 1, ..."""
    model = mlp(2)
    return [data(model, size, seed=seed + i) for i in range(n)]


def plain(**kw):
    """StepPolicy of the bare direction: no rescaling, no momentum (the step is lr·Δ)."""
    return optim().StepPolicy(rescale="none", momentum=0.0, **kw)


def assert_factors_equal(actual, expected, what, rtol=1e-10):
    """{layer: [(A_g, G_g)]} of the optimizer against a reference's, group by group."""
    assert actual.keys() == expected.keys()
    for name in expected:
        assert len(actual[name]) == len(expected[name])
        for g, ((A, G), (Ae, Ge)) in enumerate(zip(actual[name], expected[name])):
            H.assert_rel_close(A, Ae, rtol, f"{what}: A of {name} group {g}")
            H.assert_rel_close(G, Ge, rtol, f"{what}: G of {name} group {g}")


def opt_factors(opt, model):
    """The optimizer's A, G per layer, as {layer: [(A_g, G_g)]} (state of the weight)."""
    out = {}
    for name, layer, _ in layer_slices(model):
        st = opt.state[layer.weight]
        A, G = st["A"], st["G"]
        out[name] = [(A[g].to(DT), G[g].to(DT)) for g in range(A.shape[0])]
    return out


def fisher_quadratic(F, grad, d, damping):
    """½ dᵀ(F + λ I)d + ∇ᵀd."""
    return float(0.5 * d @ (F @ d) + 0.5 * damping * d @ d + grad @ d)


# --------------------------------------------------------------------------------------
# state_dict comparison
# --------------------------------------------------------------------------------------
def roundtrip(obj):
    """torch.save / torch.load through memory: what a checkpoint on disk does."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def assert_same(a, b, path="state"):
    """Deep, bitwise equality of nested dicts/lists/tensors/numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: length differs"
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{path}: {a!r} != {b!r}"


# --------------------------------------------------------------------------------------
# tests of the reference pieces themselves
# --------------------------------------------------------------------------------------
def _random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, d + 2, generator=g, dtype=DT)
    return X @ X.T / d


@pytest.mark.parametrize("make", [lambda: mlp(3), lambda: H.cnn_exotic(4)], ids=["mlp", "cnn_groups"])
def test_factored_direction_matrix_form_equals_dense_kron_solve(make):
    model = make()
    P = ref.num_params(model)
    grad = torch.randn(P, generator=torch.Generator().manual_seed(5), dtype=DT)
    factors = {}
    for i, (name, layer, _) in enumerate(layer_slices(model)):
        groups, out_g, d, has_bias = ref.layer_geometry(layer)
        factors[name] = [(_random_spd(d + has_bias, 10 * i + g), _random_spd(out_g, 10 * i + g + 5))
                         for g in range(groups)]
    a = factored_direction(model, grad, factors, 0.3)
    b = factored_direction_dense(model, grad, factors, 0.3)
    H.assert_rel_close(a, b, 1e-11, "matrix form vs dense Kronecker solve")
    # ... and the eigen-damped direction agrees with the dense K-FAC matrix of reference.py
    Kd = ref.kfac_dense(model, factors)
    H.assert_rel_close(eigen_direction(model, grad, factors, 0.3),
                       torch.linalg.solve(Kd + 0.3 * torch.eye(P, dtype=DT), grad), 1e-11,
                       "eigen direction vs reference.kfac_dense solve")


def test_ekfac_direction_equals_reference_dense_ekfac_solve():
    model = mlp(4)
    x, y = data(model, 9)
    E, factors = ref.ekfac_dense(model, x, y, "categorical", "exact")
    bases = bases_of(factors)
    scales = ekfac_scales(model, x, y, "categorical", "exact", bases)
    grad = grad_of(model, x, y)
    lam = 0.05
    expected = torch.linalg.solve(E + lam * torch.eye(E.shape[0], dtype=DT), grad)
    H.assert_rel_close(ekfac_direction(model, grad, bases, scales, lam), expected, 1e-10, "EKFAC direction")


def test_quadratic_helper_is_the_model_value():
    F = _random_spd(4, 1)
    g = torch.randn(4, dtype=DT)
    d = torch.randn(4, dtype=DT)
    expected = float(0.5 * d @ (F + 0.2 * torch.eye(4, dtype=DT)) @ d + g @ d)
    assert abs(fisher_quadratic(F, g, d, 0.2) - expected) <= 1e-12 * abs(expected)
