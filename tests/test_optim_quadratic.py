"""The exact-Fisher quadratic model (StepPolicy(rescale="quadratic"), the default) and
Levenberg–Marquardt adaptive damping, checked in float64 against the brute-force exact batch
Fisher F of tests/reference.py and directions written plainly from the reference factors.

M(δ) = ½ δᵀ (F + λ' I) δ + ∇ᵀ δ, λ' = damping + weight_decay. First step (no previous
update): δ = −α* Δ with α* = ∇ᵀΔ / (ΔᵀFΔ + λ'ΔᵀΔ); later steps minimise M over
δ = −c₁Δ + c₂δ₀ (δ₀ the previous update); with kl_clip the step is shrunk so that
½ δᵀ(F + λ'I)δ ≤ kl_clip; lr multiplies the result.
"""

from __future__ import annotations

import math

import pytest
import torch

import helpers as H
import reference as ref
from test_optim_helpers import (
    DT, bases_of, data, ekfac_direction, ekfac_scales, factored_direction, fisher_quadratic,
    flat_params, grad_of, layer_slices, loss_of, mlp, optim, step_change,
    train_step,
)


BIG = 1e10  # a kl_clip that never binds


def kfac(model, **kw):
    O = optim()
    kw.setdefault("estimator", "exact")
    kw.setdefault("schedule", O.Schedule(decay=0.0))
    return O.KFAC(model, **kw)


def alpha_star(F, grad, direction, lam):
    return float(grad @ direction) / float(direction @ F @ direction + lam * direction @ direction)


@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_first_step_is_alpha_star_times_direction(estimator, likelihood):
    O = optim()
    model = mlp(11)
    x, y = data(model, 6, likelihood=likelihood)
    lam = 0.02
    F = ref.fisher_exact(model, x, likelihood)  # the quadratic model always uses the exact F
    grad = grad_of(model, x, y, likelihood)
    direction = factored_direction(model, grad, ref.kfac_factors(model, x, y, likelihood, estimator), lam)
    alpha = alpha_star(F, grad, direction, lam)
    assert alpha > 0
    opt = kfac(model, likelihood=likelihood, estimator=estimator, damping=lam,
               step_policy=O.StepPolicy(rescale="quadratic", kl_clip=BIG))
    change = step_change(opt, model, x, y, likelihood)
    H.assert_rel_close(change, alpha * direction, 1e-9, f"α*Δ ({estimator}, {likelihood})")


def test_lr_multiplies_the_quadratic_step_and_weight_decay_enters_the_model():
    O = optim()
    model = mlp(12)
    x, y = data(model, 6)
    lam, eta, lr = 0.02, 0.05, 0.5
    F = ref.fisher_exact(model, x, "categorical")
    grad = grad_of(model, x, y) + eta * flat_params(model)
    direction = factored_direction(model, grad, ref.kfac_factors(model, x, y, "categorical", "exact"), lam + eta)
    alpha = alpha_star(F, grad, direction, lam + eta)
    opt = kfac(model, lr=lr, damping=lam, step_policy=O.StepPolicy(kl_clip=BIG, weight_decay=eta))
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change, lr * alpha * direction, 1e-9, "lr·α*Δ with weight decay")


def test_param_group_lrs_multiply_the_quadratic_step():
    O = optim()
    model = mlp(13)
    x, y = data(model, 6)
    lam = 0.05
    F = ref.fisher_exact(model, x, "categorical")
    grad = grad_of(model, x, y)
    direction = factored_direction(model, grad, ref.kfac_factors(model, x, y, "categorical", "exact"), lam)
    alpha = alpha_star(F, grad, direction, lam)
    groups = [{"params": list(model[0].parameters()), "lr": 1.0},
              {"params": list(model[2].parameters()), "lr": 0.25}]
    opt = kfac(model, damping=lam, step_policy=O.StepPolicy(kl_clip=BIG), param_groups=groups)
    change = step_change(opt, model, x, y)
    scale = torch.ones_like(direction)
    scale[dict((n, sl) for n, _, sl in layer_slices(model))["2"]] = 0.25
    H.assert_rel_close(change, alpha * scale * direction, 1e-9, "per-group lr")


def test_second_step_minimises_the_model_over_direction_and_previous_step():
    """Momentum from the quadratic model (M&G §7): δ = −c₁Δ + c₂δ₀ with the 2×2 system of the
    exact F at the new parameters and on the new batch."""
    O = optim()
    model = mlp(14)
    (x0, y0), (x1, y1) = data(model, 6, seed=3), data(model, 6, seed=4)
    lam = 0.02
    opt = kfac(model, damping=lam, step_policy=O.StepPolicy(kl_clip=BIG))
    delta0 = -step_change(opt, model, x0, y0)
    F = ref.fisher_exact(model, x1, "categorical")
    grad = grad_of(model, x1, y1)
    direction = factored_direction(model, grad, ref.kfac_factors(model, x1, y1, "categorical", "exact"), lam)
    vecs = [-direction, delta0]
    Fl = F + lam * torch.eye(F.shape[0], dtype=DT)
    system = torch.tensor([[float(u @ Fl @ v) for v in vecs] for u in vecs], dtype=DT)
    linear = torch.tensor([float(grad @ v) for v in vecs], dtype=DT)
    c = -torch.linalg.solve(system, linear)
    expected = c[0] * vecs[0] + c[1] * vecs[1]
    assert abs(float(c[1])) > 1e-3  # the momentum term matters here
    delta1 = -step_change(opt, model, x1, y1)
    H.assert_rel_close(delta1, expected, 1e-8, "second step c₁(−Δ) + c₂δ₀")
    # and it is the minimiser: no better point along either vector
    best = fisher_quadratic(F, grad, delta1, lam)
    for v in vecs:
        for t in (1e-3, -1e-3):
            assert fisher_quadratic(F, grad, delta1 + t * v, lam) >= best - 1e-12 * abs(best)


@pytest.mark.parametrize("kl_clip", [1e-4, 1e-2])
def test_trust_region_bounds_the_fisher_norm_of_the_step(kl_clip):
    O = optim()
    model = mlp(15)
    x, y = data(model, 6)
    lam = 0.01
    F = ref.fisher_exact(model, x, "categorical")
    grad = grad_of(model, x, y)
    direction = factored_direction(model, grad, ref.kfac_factors(model, x, y, "categorical", "exact"), lam)
    alpha = alpha_star(F, grad, direction, lam)
    full = alpha * direction
    size = 0.5 * float(full @ F @ full + lam * full @ full)
    assert size > kl_clip  # the bound is active
    opt = kfac(model, damping=lam, step_policy=O.StepPolicy(kl_clip=kl_clip))
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change, math.sqrt(kl_clip / size) * full, 1e-9, "shrunk step")
    assert abs(0.5 * float(change @ F @ change + lam * change @ change) - kl_clip) <= 1e-9 * kl_clip


def test_ekfac_first_step_uses_the_quadratic_model_too():
    O = optim()
    model = mlp(16)
    x, y = data(model, 8)
    lam = 0.03
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    bases = bases_of(factors)
    direction = ekfac_direction(model, grad_of(model, x, y), bases,
                                ekfac_scales(model, x, y, "categorical", "exact", bases), lam)
    F = ref.fisher_exact(model, x, "categorical")
    grad = grad_of(model, x, y)
    opt = O.EKFAC(model, damping=lam, estimator="exact", schedule=O.Schedule(decay=0.0),
                  step_policy=O.StepPolicy(kl_clip=BIG))
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change, alpha_star(F, grad, direction, lam) * direction, 1e-8, "EKFAC α*Δ")


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_ngd_quadratic_rescale(estimator):
    """NGD with the exact Fisher: Δ = (F + λI)⁻¹∇ makes α* exactly 1; with the empirical
    Fisher α* is the formula with the exact F."""
    O = optim()
    model = mlp(17)
    x, y = data(model, 6)
    lam = 0.1
    F = ref.fisher_exact(model, x, "categorical")
    Fe = ref.fisher_dense(model, x, y, "categorical", estimator)
    grad = grad_of(model, x, y)
    direction = torch.linalg.solve(Fe + lam * torch.eye(F.shape[0], dtype=DT), grad)
    alpha = alpha_star(F, grad, direction, lam)
    if estimator == "exact":
        assert abs(alpha - 1) < 1e-10
    opt = O.NGD(model, lr=1.0, damping=lam, estimator=estimator, structure="dense",
                step_policy=O.StepPolicy(rescale="quadratic", kl_clip=BIG))
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change, alpha * direction, 1e-9, "NGD α*Δ")


# --------------------------------------------------------------------------------------
# adaptive damping (Levenberg–Marquardt)
# --------------------------------------------------------------------------------------
def _expected_ratio(model, x, y, lam, step):
    """ρ = (L(θ+δ) − L(θ)) / (M(δ) − M(0)) with the reference F at θ; ``step`` runs the step."""
    F = ref.fisher_exact(model, x, "categorical")
    grad = grad_of(model, x, y)
    before = loss_of(model, x, y)
    change = step()
    after = loss_of(model, x, y)
    predicted = fisher_quadratic(F, grad, -change, lam)
    return (after - before) / predicted, predicted


def _sharp_model():
    """Weights ×3: saturated tanh/softmax, where a full quadratic-model step overshoots."""
    model = mlp(20)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


@pytest.mark.parametrize("case", ["decrease", "increase"])
def test_levenberg_marquardt_update(case):
    O = optim()
    if case == "decrease":  # a well-predicted step: ρ > 3/4, λ ← ωλ
        model, lam, lr = mlp(18), 0.5, 1.0
    else:  # an overshooting step: ρ < 1/4, λ ← λ/ω
        model, lam, lr = _sharp_model(), 1e-3, 1.5
    x, y = data(mlp(18), 6)
    omega = 0.5
    opt = kfac(model, lr=lr, damping=lam, step_policy=O.StepPolicy(kl_clip=BIG),
               damping_policy=O.DampingPolicy(adaptive=True, adapt_every=1, omega=omega))
    rho, predicted = _expected_ratio(model, x, y, lam, lambda: step_change(opt, model, x, y, closure=True))
    assert predicted < 0
    if case == "decrease":
        assert rho > 0.75, rho
        expected = lam * omega
    else:
        assert rho < 0.25, rho
        expected = lam / omega
    assert opt.param_groups[0]["damping"] == pytest.approx(expected, rel=1e-12)


def test_adaptive_damping_every_adapt_every_steps_and_clamped():
    O = optim()
    model = _sharp_model()
    x, y = data(mlp(18), 6)
    lam = 1e-3
    policy = O.DampingPolicy(adaptive=True, adapt_every=2, omega=0.5, max_damping=3e-3)
    opt = kfac(model, lr=1.5, damping=lam, step_policy=O.StepPolicy(kl_clip=BIG), damping_policy=policy)
    rho, _ = _expected_ratio(model, x, y, lam, lambda: step_change(opt, model, x, y, closure=True))
    assert rho < 0.25
    # λ / 0.5² = 4e-3 > max_damping: clamped
    assert opt.param_groups[0]["damping"] == pytest.approx(3e-3, rel=1e-12)
    step_change(opt, model, x, y, closure=True)  # step 1: not an adaptation step
    assert opt.param_groups[0]["damping"] == pytest.approx(3e-3, rel=1e-12)


def test_adaptive_damping_needs_a_closure():
    O = optim()
    model = mlp(20)
    x, y = data(model, 6)
    opt = kfac(model, damping_policy=O.DampingPolicy(adaptive=True, adapt_every=1))
    with pytest.raises(RuntimeError, match="closure"):
        train_step(opt, model, x, y)


@pytest.mark.parametrize("rescale", ["none", "kl_clip"])
def test_adaptive_damping_needs_the_quadratic_model(rescale):
    """LM adaptation compares the loss change with the quadratic model's prediction, which only
    rescale='quadratic' builds: other rescalings are refused at construction."""
    O = optim()
    model = mlp(21)
    with pytest.raises(ValueError, match="quadratic"):
        kfac(model, step_policy=O.StepPolicy(rescale=rescale), damping_policy=O.DampingPolicy(adaptive=True))


def test_closure_loss_is_returned():
    O = optim()
    model = mlp(22)
    x, y = data(model, 6)
    opt = kfac(model, damping_policy=O.DampingPolicy(adaptive=True, adapt_every=1))
    loss = train_step(opt, model, x, y, closure=True)
    assert isinstance(loss, torch.Tensor)
    assert float(loss.detach()) == pytest.approx(loss_of(model, x, y), rel=1e-12)
