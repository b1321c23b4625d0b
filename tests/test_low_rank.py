"""LowRankFisher (F = UᵀU/N kept as the rows U, solves by the Woodbury identity) against the
plain float64 matrix UᵀU/N, and NGD's choice between it and the P×P matrix.

A direct solve has a forward error of ~eps·cond(F + dI)·||x||: rows are standard normal, so
cond ≤ (λ_max + d)/d stays below ~1e4 here and 1e-9 relative leaves a wide margin.
"""

from __future__ import annotations

import pytest
import torch

import helpers as H
import reference as ref
from test_optim_helpers import DT, data, grad_of, mlp, optim, step_change

RNG = torch.Generator().manual_seed(5)  # any rows will do: every check is against UᵀU/N itself


def _low_rank(m, p, n):
    from natgrad.layout import Block
    from natgrad.representations.low_rank import ExplicitRows, LowRankFisher

    rows = torch.randn(m, p, generator=RNG, dtype=DT)
    blocks = (Block("layer", ("weight",), 0, p),)
    return LowRankFisher(blocks, [ExplicitRows(rows)], n), rows.T @ rows / n


def _factored_and_explicit(m, n):
    """A Linear(3, 4) with bias kept factored (rows g_m ā_mᵀ) next to an explicit block of 5
    columns; the reference rows are written out plainly: weight row-major g_m h_mᵀ, then g_m."""
    from natgrad.layers import adapter_for
    from natgrad.layout import Block
    from natgrad.representations.low_rank import ExplicitRows, FactoredRows, LowRankFisher

    g = torch.randn(m, 4, generator=RNG, dtype=DT)
    h = torch.randn(m, 3, generator=RNG, dtype=DT)
    other = torch.randn(m, 5, generator=RNG, dtype=DT)
    linear = torch.nn.Linear(3, 4).to(DT)
    factored = FactoredRows(adapter_for(linear, "lin"), g, torch.cat([h, torch.ones(m, 1, dtype=DT)], dim=1))
    blocks = (Block("lin", ("weight", "bias"), 0, 16), Block("other", ("weight",), 16, 21))
    rows = torch.cat([(g[:, :, None] * h[:, None, :]).reshape(m, 12), g, other], dim=1)
    return LowRankFisher(blocks, [factored, ExplicitRows(other)], n), rows.T @ rows / n


@pytest.mark.parametrize("m, p", [(6, 20), (20, 20), (30, 12)])
@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_interface_matches_the_matrix(m, p, damping):
    F, dense = _low_rank(m, p, n=4)
    v = torch.randn(p, generator=RNG, dtype=DT)
    block = torch.randn(p, 3, generator=RNG, dtype=DT)
    H.assert_rel_close(F @ v, dense @ v, 1e-12, "F @ v")
    H.assert_rel_close(F.mv(block), dense @ block, 1e-12, "F V")
    eye = torch.eye(p, dtype=DT)
    H.assert_rel_close(F.solve(v, damping), torch.linalg.solve(dense + damping * eye, v), 1e-9, "solve")
    H.assert_rel_close(F.solve(block, damping), torch.linalg.solve(dense + damping * eye, block), 1e-9, "solve V")
    H.assert_rel_close(F.to_dense(), dense, 1e-12, "to_dense")
    H.assert_rel_close(F.diagonal(), dense.diagonal(), 1e-12, "diagonal")
    H.assert_rel_close(F.trace(), dense.trace(), 1e-12, "trace")


@pytest.mark.parametrize("m", [3, 30])
def test_factored_rows_match_the_written_out_rows(m):
    F, dense = _factored_and_explicit(m, n=3)
    p = dense.shape[0]
    v = torch.randn(p, generator=RNG, dtype=DT)
    block = torch.randn(p, 2, generator=RNG, dtype=DT)
    eye = torch.eye(p, dtype=DT)
    H.assert_rel_close(F @ v, dense @ v, 1e-12, "F @ v")
    H.assert_rel_close(F.mv(block), dense @ block, 1e-12, "F V")
    H.assert_rel_close(F.solve(block, 0.1), torch.linalg.solve(dense + 0.1 * eye, block), 1e-9, "solve")
    H.assert_rel_close(F.to_dense(), dense, 1e-12, "to_dense")
    H.assert_rel_close(F.diagonal(), dense.diagonal(), 1e-12, "diagonal")
    H.assert_rel_close(F.trace(), dense.trace(), 1e-12, "trace")


def test_zero_damping_on_a_rank_deficient_fisher_is_a_clear_error():
    F, _ = _low_rank(5, 20, n=5)
    with pytest.raises(ValueError, match="damping"):
        F.solve(torch.ones(20, dtype=DT), 0.0)


def test_cost_rule():
    from natgrad.representations.low_rank import low_rank_is_cheaper

    assert low_rank_is_cheaper(128, 2410)  # the digits MLP, batch 128, one sample
    assert not low_rank_is_cheaper(2410, 2410)
    assert not low_rank_is_cheaper(1500, 2410)  # M²P + M³/3 = 6.6e9 > P³/3 = 4.7e9


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
@pytest.mark.parametrize("batch, kept_as_rows", [(6, True), (40, False)])
def test_ngd_keeps_a_small_batch_fisher_as_rows(estimator, batch, kept_as_rows):
    """The 5-4-3 MLP has P = 39: a batch of 6 gives M = 12 (exact, C − 1 = 2 rows per example) or 6
    rows, kept as rows; 40 examples give M ≥ 40, where the P×P matrix is cheaper. Either way the
    step is θ − lr (F_batch + λI)⁻¹∇L with the brute-force float64 Fisher of tests/reference.py."""
    from natgrad.representations.dense import DenseFisher
    from natgrad.representations.low_rank import LowRankFisher

    O = optim()
    model = mlp(45)
    x, y = data(model, batch)
    F = ref.fisher_dense(model, x, y, "categorical", estimator)
    grad = grad_of(model, x, y)
    opt = O.NGD(model, lr=0.5, damping=0.05, estimator=estimator)
    change = step_change(opt, model, x, y)
    assert isinstance(opt.fisher_matrix, LowRankFisher if kept_as_rows else DenseFisher)
    expected = torch.linalg.solve(F + 0.05 * torch.eye(F.shape[0], dtype=DT), grad)
    H.assert_rel_close(change / 0.5, expected, 1e-9, f"NGD step, batch {batch}")
    H.assert_rel_close(opt.fisher_matrix.to_dense(), F, 1e-9, "the batch Fisher")


def test_a_running_average_keeps_the_matrix():
    """Schedule(decay > 0) averages F across steps: stored as the P×P matrix whatever the batch."""
    from natgrad.representations.dense import DenseFisher

    O = optim()
    model = mlp(46)
    x, y = data(model, 6)
    opt = O.NGD(model, estimator="exact", schedule=O.Schedule(decay=0.5, inverse_every=1))
    step_change(opt, model, x, y)
    assert isinstance(opt.fisher_matrix, DenseFisher)


@pytest.mark.parametrize("rows_limit, structure", [(None, "dense"), (10, "implicit")])
def test_auto_above_the_dense_limit_keeps_a_small_batch_as_rows(monkeypatch, rows_limit, structure):
    """structure="auto" on 4,099 parameters (above DENSE_LIMIT): a batch of 4 (M = 8 exact rows)
    is kept as rows — a direct solve of the batch Fisher — unless the rows exceed ROWS_LIMIT
    (forced here), when the step is the matrix-free CG solve. Both are the float64 reference's
    step; CG to its residual bound as in tests/test_optim_ngd.py."""
    import natgrad.optim.ngd as ngd_module
    from natgrad.representations.low_rank import LowRankFisher

    if rows_limit is not None:
        monkeypatch.setattr(ngd_module, "ROWS_LIMIT", rows_limit)
    O = optim()
    model = mlp(47, sizes=(60, 64, 3))
    assert sum(p.numel() for p in model.parameters()) > ngd_module.DENSE_LIMIT
    x, y = data(model, 4)
    F = ref.fisher_dense(model, x, y, "categorical", "exact")
    grad = grad_of(model, x, y)
    lam, lr = 0.05, 0.5
    opt = O.NGD(model, lr=lr, damping=lam, estimator="exact")
    change = step_change(opt, model, x, y)
    assert opt.structure == structure
    expected = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=DT), grad)
    if structure == "dense":
        assert isinstance(opt.fisher_matrix, LowRankFisher)
        H.assert_rel_close(change / lr, expected, 1e-9, "auto: rows")
    else:
        err = float((change / lr - expected).abs().max())
        assert err <= 10 * H.CG_TOL * float(grad.norm()) / lam + 1e-12 * float(expected.abs().max()), err


@pytest.mark.parametrize("structure, dense_limit", [("implicit", None), ("auto", 20)])
def test_plain_backward_empirical_ngd_without_the_graph(monkeypatch, structure, dense_limit):
    """loss.backward(); opt.step() with the empirical Fisher where NGD would solve matrix-free
    (structure "implicit", or "auto" above DENSE_LIMIT — lowered here to keep the model small):
    no graph, so the captured per-example gradients give the batch Fisher as rows. The step is
    the float64 reference's θ − lr (F_emp + λI)⁻¹∇L."""
    import natgrad.optim.ngd as ngd_module

    if dense_limit is not None:
        monkeypatch.setattr(ngd_module, "DENSE_LIMIT", dense_limit)
    O = optim()
    model = mlp(48)
    x, y = data(model, 5)
    F = ref.fisher_dense(model, x, y, "categorical", "empirical")
    grad = grad_of(model, x, y)
    lam, lr = 0.05, 0.5
    opt = O.NGD(model, lr=lr, damping=lam, estimator="empirical", structure=structure)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.structure == "implicit"  # whose graph-based solve would have raised
    change = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())])
    expected = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=DT), grad)
    H.assert_rel_close(change / lr, expected, 1e-9, f"plain-backward NGD step ({structure})")


@pytest.mark.parametrize("batch, estimator, expected", [(4, "exact", "dense"), (300, "mc", "dense"),
                                                        (300, "exact", "implicit")])
def test_auto_prices_the_rows_against_a_cg_solve(batch, estimator, expected):
    """4,099 parameters, the Linear layers' rows factored (193 entries a row): M = 300 MC rows
    cost 300² · 193 + 300³/3 ≈ 2.6e7 < 30 · N · P ≈ 3.7e7 (rows); the 600 exact rows of the same
    batch ≈ 1.4e8 (CG); 8 exact rows of a batch of 4 are far below either."""
    O = optim()
    model = mlp(49, sizes=(60, 64, 3))
    x, y = data(model, batch)
    opt = O.NGD(model, estimator=estimator)
    change = step_change(opt, model, x, y)
    assert opt.structure == expected
    assert bool(torch.isfinite(change).all()) and float(change.abs().max()) > 0


def test_plain_backward_implicit_rows_respect_the_limit(monkeypatch):
    """Above ROWS_LIMIT the captured rows are not stored: the step asks for opt.backward."""
    import natgrad.optim.ngd as ngd_module

    monkeypatch.setattr(ngd_module, "ROWS_LIMIT", 10)
    O = optim()
    model = mlp(50)
    x, y = data(model, 5)
    opt = O.NGD(model, estimator="empirical", structure="implicit")
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"opt.backward\(loss, output\)"):
        opt.step()


def test_zero_damping_with_fewer_rows_than_parameters_fails_before_forming_the_matrix(monkeypatch):
    from natgrad.representations.low_rank import LowRankFisher

    F, _ = _low_rank(5, 20, n=5)
    monkeypatch.setattr(LowRankFisher, "_to_dense", lambda self: pytest.fail("formed the P×P matrix"))
    with pytest.raises(ValueError, match="singular"):
        F.solve(torch.ones(20, dtype=DT), 0.0)


def test_float32_woodbury_with_a_gram_far_above_the_damping():
    """UUᵀ ~ 1e9 and singular (repeated rows) against Nε ~ 1e-2: NεI + UUᵀ is positive definite,
    but its float32 rounding errors (~u · 1e9) swamp Nε and the float32 Cholesky fails.
    The M×M system is solved in float64; the answer keeps float32 accuracy norm-wise (its bulk,
    v's part outside the rows' span over ε, is formed exactly as in the dense solve)."""
    from natgrad.layout import Block
    from natgrad.representations.low_rank import ExplicitRows, LowRankFisher

    rows = 1e4 * torch.randn(4, 50, generator=RNG, dtype=torch.float64).repeat(2, 1)  # rank 4 of 8
    v = torch.randn(50, generator=RNG, dtype=torch.float64)
    F = LowRankFisher((Block("layer", ("weight",), 0, 50),), [ExplicitRows(rows.float())], 8)
    x = F.solve(v.float(), 1e-3)
    expected = torch.linalg.solve(rows.T @ rows / 8 + 1e-3 * torch.eye(50, dtype=torch.float64), v)
    assert x.dtype == torch.float32
    H.assert_rel_close(x.double(), expected, 1e-4, "float32 Woodbury solve")


def test_auto_prices_a_convolution_pass_by_its_positions():
    """A CNN of 9,930 parameters at batch 100 (MC): its rows cost ≈ 5.4e7, a CG pass through the
    two convolutions ≈ 8.5e6 multiply-adds (every output position) — rows win, where pricing a
    pass at N·P (1e6) would have sent the step to a ~30× slower CG solve."""
    from torch import nn

    O = optim()
    torch.manual_seed(52)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 4 * 4, 10)).to(DT)
    x, y = torch.randn(100, 1, 8, 8, dtype=DT), torch.randint(0, 10, (100,))
    opt = O.NGD(model)
    change = step_change(opt, model, x, y)
    assert opt.structure == "dense"
    assert bool(torch.isfinite(change).all()) and float(change.abs().max()) > 0
