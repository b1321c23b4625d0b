"""The FisherMatrix interface, for every structure and estimator: F @ v, mv, solve,
natural_gradient, diagonal, trace, to_dense, blocks, size, dtype.

Solve tolerances are derived from the library's conjugate-gradient tolerance τ = H.CG_TOL
(relative residual ||b - (F + dI) x|| <= τ ||b||): the error is then at most
τ ||b|| / d since λ_min(F + dI) >= d. A direct solve (dense, diagonal, Kronecker) has a
backward error of a few eps, i.e. a forward error of ~eps·cond(F + dI)·||x||; both
bounds get a factor 10 of slack.
"""

import pytest
import torch
from torch import nn

import helpers as H
import reference as ref

EPS = torch.finfo(torch.float64).eps
DAMPINGS = (1e-3, 0.5)


def build(model_name, estimator, structure):
    model = H.mlp(0) if model_name == "mlp" else H.cnn(0)
    x, y = H.make_data(model, "categorical", 6 if model_name == "mlp" else 3)
    data = (x, y) if estimator == "empirical" else x
    torch.manual_seed(123)
    kw = dict(samples=3) if estimator == "mc" else {}
    F = H.lib().fisher(model, data, likelihood="categorical", estimator=estimator,
                       structure=structure, **kw)
    return model, F


def solve_bound(M, d, b, x_ref):
    lam_max = float(torch.linalg.eigvalsh(M).max())
    cond = (lam_max + d) / d
    return 10 * H.CG_TOL * float(b.norm()) / d + 10 * EPS * cond * float(x_ref.norm()) * M.shape[0]


@pytest.mark.parametrize("structure", H.STRUCTURES)
@pytest.mark.parametrize("estimator", H.ESTIMATORS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_interface(model_name, estimator, structure):
    natgrad = H.lib()
    model, F = build(model_name, estimator, structure)
    P = ref.num_params(model)
    M = F.to_dense()
    assert M.shape == (P, P) and M.dtype == torch.float64
    assert F.size == P and F.dtype == torch.float64 and F.device == torch.device("cpu")
    # symmetric positive semi-definite
    H.assert_rel_close(M, M.T, 1e-12, "symmetry")
    eig = torch.linalg.eigvalsh(M)
    assert float(eig.min()) >= -1e-10 * float(eig.max()), f"not PSD: {float(eig.min())}"
    assert float(eig.max()) > 0

    g = torch.Generator().manual_seed(7)
    v = torch.randn(P, generator=g, dtype=H.DT)
    Mv = M @ v
    # F @ v and F.mv(v) are the same fixed matrix as to_dense(), on every call
    for _ in range(2):
        H.assert_rel_close(F @ v, Mv, 1e-10, "F @ v")
        H.assert_rel_close(F.mv(v), Mv, 1e-10, "F.mv(v)")
    H.assert_rel_close(F.diagonal(), torch.diagonal(M), 1e-10, "diagonal")
    assert abs(float(F.trace()) - float(F.diagonal().sum())) <= 1e-12 * float(M.diagonal().sum())
    assert abs(float(F.trace()) - float(torch.trace(M))) <= 1e-10 * float(torch.trace(M))

    eye = torch.eye(P, dtype=H.DT)
    for d in DAMPINGS:
        # solve(F v + d v, d) recovers v
        b = F @ v + d * v
        xs = F.solve(b, damping=d)
        assert xs.shape == (P,)
        bound = solve_bound(M, d, b, v)
        err = float((xs - v).norm())
        assert err <= bound, f"solve(Fv + dv, d={d}) off by {err:.3e} > {bound:.3e}"
        # natural_gradient == solve == dense solve of (to_dense() + d I)
        grad = torch.randn(P, generator=g, dtype=H.DT)
        x_ref = torch.linalg.solve(M + d * eye, grad)
        bound = solve_bound(M, d, grad, x_ref)
        x_solve = F.solve(grad, d)
        x_ng = natgrad.natural_gradient(F, grad, d)
        for name, xx in (("solve", x_solve), ("natural_gradient", x_ng)):
            err = float((xx - x_ref).norm())
            assert err <= bound, f"{name} d={d}: |x - (M + dI)^-1 g| = {err:.3e} > {bound:.3e}"
        assert float((x_ng - x_solve).norm()) <= 2 * bound


@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_blocks_partition_the_vector(structure):
    model, F = build("cnn", "exact", structure)
    blocks = F.blocks
    assert isinstance(blocks, tuple) and len(blocks) == 3
    expected = ref.module_slices(model)
    assert blocks[0].start == 0 and blocks[-1].stop == ref.num_params(model)
    for a, b in zip(blocks, blocks[1:]):
        assert a.stop == b.start
    for blk, (name, params, sl) in zip(blocks, expected):
        assert blk.name == name and blk.slice == sl
        assert list(blk.params) in (params, [p.rpartition(".")[2] for p in params])


@pytest.mark.parametrize("structure", ["block_diagonal", "diagonal", "kron_sum", "kfac", "ekfac"])
def test_block_structures_are_zero_off_blocks(structure):
    model, F = build("mlp", "exact", structure)
    M = F.to_dense()
    mask = ref.block_mask(model) if structure != "diagonal" else ref.diag_mask(model)
    assert float((M * (1 - mask)).abs().max()) == 0.0
    # each block of F @ v only involves the block of v
    v = torch.zeros(M.shape[0], dtype=H.DT)
    blk = F.blocks[0]
    v[blk.slice] = 1.0
    out = F @ v
    assert float(out[blk.stop:].abs().max()) == 0.0


def test_solve_accepts_damping_keyword_and_positional():
    model, F = build("mlp", "exact", "dense")
    v = torch.ones(ref.num_params(model), dtype=H.DT)
    H.assert_rel_close(F.solve(v, 0.1), F.solve(v, damping=0.1), 1e-12, "positional/keyword")


@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_zero_damping_on_invertible_fisher(structure):
    """damping = 0 is allowed when the matrix is invertible (docs/math.md, Damping): Gaussian
    likelihood, N = 30 > P/C, so every structure here is positive definite."""
    model = H.mlp(80)
    x, _ = H.make_data(model, "gaussian", 30)
    F = H.lib().fisher(model, x, likelihood="gaussian", structure=structure)
    M = F.to_dense()
    eig = torch.linalg.eigvalsh(M)
    assert float(eig.min()) > 1e-6 * float(eig.max())
    g = torch.randn(F.size, generator=torch.Generator().manual_seed(1), dtype=H.DT)
    x_ref = torch.linalg.solve(M, g)
    bound = solve_bound(M, 0.0 + float(eig.min()), g, x_ref)  # λ_min plays the role of d
    assert float((F.solve(g, 0.0) - x_ref).norm()) <= bound


@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_zero_damping_on_singular_fisher_raises(structure):
    """A singular matrix with damping = 0 raises ValueError instead of returning inf/nan."""
    natgrad = H.lib()
    if structure in H.KRON_STRUCTURES:
        model = H.mlp(81)  # N = 1: G of the last layer has the all-ones null vector
        x, _ = H.make_data(model, "categorical", 1)
    else:
        model = H.unused_net(81)  # the unused Linear has zero rows and columns
        x, _ = H.make_data(model, "categorical", 3)
    F = natgrad.fisher(model, x, structure=structure)
    with pytest.raises(ValueError):
        F.solve(torch.ones(F.size, dtype=H.DT), damping=0.0)


def test_zero_damping_on_rounding_level_ekfac_scales_raises():
    """Two examples: EKFAC's scales in the null directions are rounding noise (tiny but > 0 in
    float64), not pivots: a solve with damping 0 raises instead of returning ~1e60 entries."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(H.DT)
    x, y = torch.randn(2, 4, dtype=H.DT), torch.randint(0, 3, (2,))
    F = H.lib().fisher(model, (x, y), structure="ekfac")
    scales = torch.cat([b.scales.reshape(-1) for b in F.operators])
    assert float(scales.min()) < 1e-25 * float(scales.max())  # rank-deficient: near-zero scales
    with pytest.raises(ValueError, match="singular"):
        F.solve(torch.ones(F.size, dtype=H.DT), damping=0.0)
    assert torch.isfinite(F.solve(torch.ones(F.size, dtype=H.DT), damping=1e-3)).all()


def test_zero_damping_on_an_invertible_float32_kfac_solves():
    """The rounding floor of λ_G λ_A is (O + D)·u·max, not O·D·u·max: a float32 K-FAC block whose
    smallest scale is 1.3e-4 of the largest (between the two floors for 64×65) is invertible."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    F = H.lib().fisher(model, torch.randn(1000, 64), likelihood="gaussian", structure="kfac")
    values_a, _, values_g, _ = F.operators[0].eigen
    ratio = float((values_g.min() * values_a.min()) / (values_g.max() * values_a.max()))
    eps = torch.finfo(torch.float32).eps
    assert (64 + 65) * eps < ratio < 64 * 65 * eps
    v = torch.randn(F.size)
    x = F.solve(v, 0.0)
    H.assert_rel_close(F @ x, v, 1e-2, "F (F⁻¹ v) in float32, cond ~1e4")


@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_several_vectors_at_once(structure):
    """F @ V and F.solve(V, d) for V [P, m] act column by column (FisherMatrix docstring)."""
    model, F = build("cnn", "exact", structure)
    M = F.to_dense()
    V = torch.randn(F.size, 3, generator=torch.Generator().manual_seed(2), dtype=H.DT)
    H.assert_rel_close(F @ V, M @ V, 1e-10, "F @ V")
    d = 0.1
    X = F.solve(V, d)
    assert X.shape == V.shape
    for j in range(3):
        x_ref = torch.linalg.solve(M + d * torch.eye(F.size, dtype=H.DT), V[:, j])
        assert float((X[:, j] - x_ref).norm()) <= solve_bound(M, d, V[:, j], x_ref)
