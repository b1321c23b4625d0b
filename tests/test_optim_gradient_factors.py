"""K-FAC's factored-gradient preconditioning (natgrad.optim.gradient_factors) against the
reference K-FAC direction of tests/test_optim_helpers.py (float64, no natgrad).

When a layer's ``.grad`` is exactly gᵀā (the loss's output gradients times the inputs, one
use of the layer, nothing added or changed), K-FAC computes G⁻¹∇M A⁻¹ as (G⁻¹gᵀ)(āA⁻¹). The
tests check (1) that path is taken on small batches and gives the reference direction of the
gradient, (2) every way ``.grad`` can differ from gᵀā — a regulariser, accumulation, clipping,
reassignment, a gradient hook, weight decay — falls back to preconditioning ``.grad`` itself,
and the step is then the reference direction of the gradient ``step()`` actually saw; (3) EKFAC's
projection (gQ_G)ᵀ(āQ_A) against the dense EKFAC reference, and K-FAC's eigenbasis damping against
its reference direction.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import helpers as H
import reference as ref
from test_optim_helpers import data, eigen_direction, factored_direction, flat_params, grad_of, mlp, nll, optim

LAM, LR = 0.05, 0.1
SIZES = (12, 16, 10)  # batch 3: R(O² + D² + OD) < OD(O + D) on both layers


def spy_on(monkeypatch, cls, projected=None):
    """Counts the layers ``cls`` preconditions through their gradient factors (g, ā), or (EKFAC)
    through g and the inputs already projected for the scale statistics (also listed in
    ``projected``, if given)."""
    from natgrad.optim.ekfac import ProjectedRows

    calls = []
    original = cls._layer_direction

    def spy(self, i, grad):
        if isinstance(grad, (tuple, ProjectedRows)):
            calls.append(i)
        if projected is not None and isinstance(grad, ProjectedRows):
            projected.append(i)
        return original(self, i, grad)

    monkeypatch.setattr(cls, "_layer_direction", spy)
    return calls


@pytest.fixture
def factored_calls(monkeypatch):
    return spy_on(monkeypatch, optim().KFAC)


def make_opt(model, **kw):
    O = optim()
    step_policy = kw.pop("step_policy", O.StepPolicy(rescale="none", momentum=0.0))
    return O.KFAC(model, lr=LR, damping=LAM, estimator="exact", schedule=O.Schedule(decay=0.0),
                  step_policy=step_policy, **kw)


def run_step(opt, model, x, y, after_backward=None, extra_loss=None):
    """One documented step; returns (θ change / lr, the flat .grad that step() saw)."""
    before = flat_params(model)
    opt.zero_grad()
    out = model(x)
    loss = nll(out, y)
    if extra_loss is not None:
        loss = loss + extra_loss(model)
    opt.backward(loss, out)
    if after_backward is not None:
        after_backward(model)
    seen = torch.cat([p.grad.reshape(-1) for _, p in ref.trainable(model)]).clone()
    opt.step()
    return (before - flat_params(model)) / LR, seen


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rescale", ["none", "quadratic"])
def test_factored_path_gives_the_reference_direction(factored_calls, bias, rescale):
    O = optim()
    model = mlp(0, SIZES)
    if not bias:
        model = nn.Sequential(*[nn.Linear(m.in_features, m.out_features, bias=False).double()
                                if isinstance(m, nn.Linear) else m for m in model])
    x, y = data(model, 3)
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    expected = factored_direction(model, grad_of(model, x, y), factors, LAM)
    if rescale == "none":
        change, _ = run_step(make_opt(model), model, x, y)
        H.assert_rel_close(change, expected, 1e-9, "factored K-FAC direction")
    else:  # the quadratic model rescales Δ: the step is parallel to it
        opt = make_opt(model, step_policy=O.StepPolicy(kl_clip=1e6))
        change, _ = run_step(opt, model, x, y)
        coeff = float(change @ expected / (expected @ expected))
        H.assert_rel_close(change, coeff * expected, 1e-9, "quadratic-model step along the K-FAC direction")
    assert sorted(factored_calls) == [0, 1]


def test_large_batch_keeps_the_matrix_product(factored_calls):
    model = mlp(1, SIZES)
    x, y = data(model, 64)
    expected = factored_direction(model, grad_of(model, x, y), ref.kfac_factors(model, x, y, "categorical", "exact"), LAM)
    change, _ = run_step(make_opt(model), model, x, y)
    H.assert_rel_close(change, expected, 1e-9, "batch 64")
    assert factored_calls == []


def _regulariser(model):
    return 0.3 * sum((p**2).sum() for p in model.parameters())


def _scale_first_weight_grad(model):
    model[0].weight.grad.mul_(0.5)


def _reassign_grads(model):
    for p in model.parameters():
        p.grad = p.grad * 2.0


def _clip(model):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)


CASES = {
    "regulariser in the loss": dict(extra_loss=_regulariser),
    ".grad scaled in place": dict(after_backward=_scale_first_weight_grad),
    ".grad reassigned": dict(after_backward=_reassign_grads),
    "clip_grad_norm_": dict(after_backward=_clip),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_that_is_not_the_factored_product_is_preconditioned_itself(factored_calls, case):
    model = mlp(2, SIZES)
    x, y = data(model, 3)
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    grad = grad_of(model, x, y)
    change, seen = run_step(make_opt(model), model, x, y, **CASES[case])
    assert H.rel_err(seen, grad) > 1e-3  # the case really changes the gradient
    H.assert_rel_close(change, factored_direction(model, seen, factors, LAM), 1e-9, case)
    touched = {"regulariser in the loss": [], ".grad scaled in place": [1], ".grad reassigned": [],
               "clip_grad_norm_": []}[case]
    assert sorted(factored_calls) == touched  # only layers whose .grad stayed gᵀā


def test_accumulated_gradient_is_preconditioned_itself(factored_calls):
    model = mlp(3, SIZES)
    x, y = data(model, 3)
    opt = make_opt(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)  # left from an earlier backward: opt.backward adds to it
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    grad = grad_of(model, x, y)
    before = flat_params(model)
    out = model(x)
    opt.backward(nll(out, y), out)
    seen = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()
    opt.step()
    H.assert_rel_close(seen, grad + 0.01, 1e-12, "accumulated gradient")
    H.assert_rel_close((before - flat_params(model)) / LR, factored_direction(model, seen, factors, LAM), 1e-9,
                       "accumulated")
    assert factored_calls == []


def test_gradient_hook_falls_back_for_its_layer(factored_calls):
    model = mlp(4, SIZES)
    x, y = data(model, 3)
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    grad = grad_of(model, x, y)
    handle = model[2].weight.register_hook(lambda g: 3.0 * g)
    try:
        change, seen = run_step(make_opt(model), model, x, y)
    finally:
        handle.remove()
    assert H.rel_err(seen, grad) > 1e-3
    H.assert_rel_close(change, factored_direction(model, seen, factors, LAM), 1e-9, "hooked weight")
    assert factored_calls == [0]


def test_weight_decay_falls_back(factored_calls):
    O = optim()
    model = mlp(6, SIZES)
    x, y = data(model, 3)
    eta = 0.1
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    theta = flat_params(model)
    opt = make_opt(model, step_policy=O.StepPolicy(rescale="none", momentum=0.0, weight_decay=eta))
    change, seen = run_step(opt, model, x, y)
    H.assert_rel_close(change, factored_direction(model, seen + eta * theta, factors, LAM + eta), 1e-9,
                       "weight decay")
    assert factored_calls == []


def test_linear_on_sequences_is_factored_exactly(factored_calls):
    """Extra leading dimensions (T = 3 positions per example): R = N·T rows, against the
    reference K-FAC direction (whose A averages over positions, as the definition says)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 10), nn.Flatten()).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    y = torch.randn(2, 30, dtype=torch.float64)
    factors = ref.kfac_factors(model, x, y, "gaussian", "exact")
    expected = factored_direction(model, grad_of(model, x, y, "gaussian"), factors, LAM)
    O = optim()
    opt = O.KFAC(model, lr=LR, damping=LAM, likelihood="gaussian", estimator="exact",
                 schedule=O.Schedule(decay=0.0), step_policy=O.StepPolicy(rescale="none", momentum=0.0))
    before = flat_params(model)
    out = model(x)
    opt.backward(nll(out, y, "gaussian"), out)
    opt.step()
    H.assert_rel_close((before - flat_params(model)) / LR, expected, 1e-9, "sequence inputs")
    assert sorted(factored_calls) == [0, 1]


@pytest.mark.parametrize("groups", [1, 2])
def test_convolution_with_few_positions_is_factored_exactly(factored_calls, groups):
    """A Conv2d whose R = N·(output positions) is small next to its matrix: the factored path,
    with patches as ā, against the reference K-FAC direction."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(8, 16, 2, groups=groups), nn.Tanh(), nn.Flatten(), nn.Linear(64, 10)).double()
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)  # 2×2 output positions: R = 8
    if groups == 2:  # 8 outputs × 17 inputs per group: only 1 position (R = 2) is cheaper factored
        model[3] = nn.Linear(16, 10).double()
        x = x[..., :2, :2]
    y = torch.randint(0, 10, (2,))
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    expected = factored_direction(model, grad_of(model, x, y), factors, LAM)
    change, _ = run_step(make_opt(model), model, x, y)
    H.assert_rel_close(change, expected, 1e-9, f"conv groups={groups}")
    assert sorted(factored_calls) == [0, 1]


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_ekfac_factored_projection_gives_the_dense_reference(monkeypatch, estimator):
    """EKFAC projects ∇M = gᵀā into its eigenbasis as (gQ_G)ᵀ(āQ_A): the step is still
    (E + λI)⁻¹∇L with E the dense EKFAC matrix of tests/reference.py."""
    O = optim()
    projected = []
    calls = spy_on(monkeypatch, O.EKFAC, projected)
    model = mlp(8, SIZES)
    x, y = data(model, 3)
    E, _ = ref.ekfac_dense(model, x, y, "categorical", estimator)
    expected = torch.linalg.solve(E + LAM * torch.eye(E.shape[0], dtype=torch.float64), grad_of(model, x, y))
    opt = O.EKFAC(model, lr=LR, damping=LAM, estimator=estimator, schedule=O.Schedule(decay=0.0),
                  step_policy=O.StepPolicy(rescale="none", momentum=0.0))
    change, _ = run_step(opt, model, x, y)
    H.assert_rel_close(change, expected, 1e-8, f"EKFAC factored ({estimator})")
    assert sorted(calls) == [0, 1]
    assert sorted(projected) == [0, 1]  # ā Q_A of the scale statistics, reused


def test_ekfac_statistics_of_a_subset_do_not_lend_their_projection(monkeypatch):
    """stat_fraction ½: the scales come from the first 2 of 4 rows, the gradient from all 4, so
    the statistics' ā Q_A cannot serve the projection; the step is still the dense reference's."""
    O = optim()
    projected = []
    calls = spy_on(monkeypatch, O.EKFAC, projected)
    model = mlp(12, SIZES)
    x, y = data(model, 4)
    E, _ = ref.ekfac_dense(model, x[:2], y[:2], "categorical", "exact")
    expected = torch.linalg.solve(E + LAM * torch.eye(E.shape[0], dtype=torch.float64), grad_of(model, x, y))
    schedule = O.Schedule(decay=0.0, stat_fraction=0.5, stat_min_examples=1)
    opt = O.EKFAC(model, lr=LR, damping=LAM, estimator="exact", schedule=schedule,
                  step_policy=O.StepPolicy(rescale="none", momentum=0.0))
    change, _ = run_step(opt, model, x, y)
    H.assert_rel_close(change, expected, 1e-8, "EKFAC factored, statistics of 2 of 4 rows")
    assert sorted(calls) == [0, 1] and projected == []


def test_ekfac_projection_is_reused_only_within_its_step(monkeypatch):
    """Full-batch training (the very same input tensor every step), stat_every=2, inverse_every=3:
    only statistics steps precondition with the ā Q_A their scale statistics computed; the other
    steps (step 3 refreshes the basis) project the gradient factors themselves. Every step is the
    float64 reference's (as in tests/test_optim_ekfac.py). Only the first layer trains: its input
    is x itself every step (a projection kept from an earlier step would pass an identity check
    on the inputs), and its A, of rank 3 < 13, has x's span as its range, so the reference
    direction does not depend on how eigh picks a basis of A's null space."""
    from test_optim_helpers import bases_of, ekfac_direction, ekfac_scales

    O = optim()
    projected = []
    calls = spy_on(monkeypatch, O.EKFAC, projected)
    model = mlp(13, SIZES)
    model[2].requires_grad_(False)
    x, y = data(model, 3)
    opt = O.EKFAC(model, lr=LR, damping=LAM, estimator="exact",
                  schedule=O.Schedule(stat_every=2, inverse_every=3, decay=0.0),
                  step_policy=O.StepPolicy(rescale="none", momentum=0.0))
    factors = bases = scales = None
    for k in range(6):
        grad = grad_of(model, x, y)
        if k % 2 == 0:
            factors = ref.kfac_factors(model, x, y, "categorical", "exact")
        if k in (0, 2):  # statistics + refresh
            bases = bases_of(factors)
        if k in (0, 2, 4):  # step 4: statistics in the basis of step 3 (step 2's factors)
            scales = ekfac_scales(model, x, y, "categorical", "exact", bases)
        del calls[:], projected[:]
        change, _ = run_step(opt, model, x, y)
        assert calls == [0], f"step {k}"  # the one trainable layer
        assert projected == ([0] if k % 2 == 0 else []), f"step {k}"
        if k == 1:
            continue  # a refresh of unchanged factors; not specified further
        expected = eigen_direction(model, grad, factors, LAM) if k == 3 else ekfac_direction(model, grad, bases, scales, LAM)
        H.assert_rel_close(change, expected, 1e-8, f"step {k}")


def test_eigenbasis_damping_projects_the_factors(factored_calls):
    O = optim()
    model = mlp(9, SIZES)
    x, y = data(model, 3)
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    expected = eigen_direction(model, grad_of(model, x, y), factors, LAM)
    change, _ = run_step(make_opt(model, damping_policy=O.DampingPolicy(mode="eigen")), model, x, y)
    H.assert_rel_close(change, expected, 1e-9, "eigenbasis damping, factored projection")
    assert sorted(factored_calls) == [0, 1]
