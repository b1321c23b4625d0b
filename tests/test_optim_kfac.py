"""natgrad.optim.KFAC against independent computations (float64).

* statistics: after one statistics step with Schedule(decay=0) the factors A, G in the state of
  each layer's weight equal the brute-force factors of tests/reference.py and the factors of
  natgrad.fisher(..., structure="kfac") for the same batch (which examples and steps enter the
  statistics, and their running averages: test_optim_kfac_schedule.py);
* directions: with StepPolicy(rescale="none", momentum=0) the step is lr·Δ with
  Δ = (G + √λ/π I)⁻¹ ∇M (A + π√λ I)⁻¹ (factored) or (G ⊗ A + λ I)⁻¹ vec ∇M (eigen), written
  here plainly from the reference factors; inverses are stale between refreshes
  (Schedule.inverse_every); per-group lr/damping, weight decay, heavy-ball momentum and the
  "kl_clip" rescaling on top of those directions;
* numerics: factors in the model's dtype; degenerate statistics do not produce NaN steps.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import helpers as H
import reference as ref
from test_optim_helpers import (
    MODELS, assert_factors_equal, data, eigen_direction, factored_direction, flat_params, grad_of, layer_slices, mlp,
    mlp_batches, nll, opt_factors, optim, plain, step_change, train_step,
)


# --------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_factors_after_one_statistics_step(model_name, estimator, likelihood):
    natgrad = H.lib()
    O = optim()
    model = MODELS[model_name]()
    x, y = data(model, 5, likelihood=likelihood)
    expected = ref.kfac_factors(model, x, y, likelihood, estimator)
    fisher = natgrad.fisher(model, (x, y) if estimator == "empirical" else x, likelihood=likelihood,
                            estimator=estimator, structure="kfac")
    opt = O.KFAC(model, likelihood=likelihood, estimator=estimator, schedule=O.Schedule(decay=0.0))
    train_step(opt, model, x, y, likelihood)
    actual = opt_factors(opt, model)
    assert_factors_equal(actual, expected, "optimizer vs reference")
    for i, (name, layer, _) in enumerate(layer_slices(model)):
        op = fisher.operators[i]
        st = opt.state[layer.weight]
        assert st["A"].shape == op.input_factor.shape and st["G"].shape == op.output_factor.shape
        H.assert_rel_close(st["A"], op.input_factor, 1e-12, f"A of {name} vs natgrad.fisher")
        H.assert_rel_close(st["G"], op.output_factor, 1e-12, f"G of {name} vs natgrad.fisher")


def test_empirical_factors_from_plain_loss_backward():
    """estimator="empirical": the user's own loss.backward() is enough for the statistics."""
    O = optim()
    model = mlp(1)
    x, y = data(model, 6)
    expected = ref.kfac_factors(model, x, y, "categorical", "empirical")
    opt = O.KFAC(model, estimator="empirical", schedule=O.Schedule(decay=0.0), step_policy=plain())
    opt.zero_grad()
    nll(model(x), y).backward()
    opt.step()
    assert_factors_equal(opt_factors(opt, model), expected, "plain loss.backward()")


# --------------------------------------------------------------------------------------
# directions
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("damping", [1e-3, 0.1, 3.0])
@pytest.mark.parametrize("mode", ["factored", "eigen"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_one_step_direction(model_name, mode, damping):
    O = optim()
    model = MODELS[model_name]()
    x, y = data(model, 7)
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    grad = grad_of(model, x, y)
    reference = factored_direction if mode == "factored" else eigen_direction
    expected = reference(model, grad, factors, damping)
    lr = 0.05
    opt = O.KFAC(model, lr=lr, damping=damping, estimator="exact", schedule=O.Schedule(decay=0.0),
                 damping_policy=O.DampingPolicy(mode=mode), step_policy=plain())
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change / lr, expected, 1e-9, f"{mode} damping λ={damping}")


@pytest.mark.parametrize("mode", ["factored", "eigen"])
def test_inverses_are_refreshed_only_every_inverse_every_steps(mode):
    """Refresh on steps 0, 1, 2 (first three) and then every inverse_every=4 steps: step 3 uses
    the inverses of the factors of step 2 with the gradient of step 3; step 5 those of step 4."""
    O = optim()
    model = mlp(3)
    batches = mlp_batches(6, size=7, seed=30)
    lam, lr = 0.05, 0.05
    opt = O.KFAC(model, lr=lr, damping=lam, estimator="exact",
                 schedule=O.Schedule(decay=0.0, inverse_every=4),
                 damping_policy=O.DampingPolicy(mode=mode), step_policy=plain())
    reference = factored_direction if mode == "factored" else eigen_direction
    inverted = None
    for k, (x, y) in enumerate(batches):
        factors = ref.kfac_factors(model, x, y, "categorical", "exact")
        if k in (0, 1, 2, 4):
            inverted = factors
        grad = grad_of(model, x, y)
        change = step_change(opt, model, x, y)
        H.assert_rel_close(change / lr, reference(model, grad, inverted, lam), 1e-9, f"step {k}")
        if k == 3:  # and the stale inverse really differs from a fresh one here
            fresh = reference(model, grad, factors, lam)
            assert H.rel_err(change / lr, fresh) > 1e-4


def test_param_groups_lr_and_damping_per_layer():
    O = optim()
    model = mlp(4)
    x, y = data(model, 7)
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    grad = grad_of(model, x, y)
    groups = [{"params": list(model[0].parameters()), "lr": 0.2, "damping": 0.01},
              {"params": list(model[2].parameters()), "lr": 0.03, "damping": 0.5}]
    opt = O.KFAC(model, lr=1.0, damping=1.0, estimator="exact", schedule=O.Schedule(decay=0.0),
                 step_policy=plain(), param_groups=groups)
    change = step_change(opt, model, x, y)
    direction = factored_direction(model, grad, factors, {"0": 0.01, "2": 0.5})
    slices = {name: sl for name, _, sl in layer_slices(model)}
    H.assert_rel_close(change[slices["0"]] / 0.2, direction[slices["0"]], 1e-9, "layer 0 (lr 0.2, λ 0.01)")
    H.assert_rel_close(change[slices["2"]] / 0.03, direction[slices["2"]], 1e-9, "layer 2 (lr 0.03, λ 0.5)")


def test_changing_group_lr_between_steps_is_honoured():
    """An lr scheduler edits param_groups[i]["lr"]; the next step uses the new value."""
    O = optim()
    model = mlp(4)
    x, y = data(model, 7)
    opt = O.KFAC(model, lr=0.1, damping=0.1, estimator="exact", schedule=O.Schedule(decay=0.0),
                 step_policy=plain())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train_step(opt, model, x, y)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    grad = grad_of(model, x, y)
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change / 0.05, factored_direction(model, grad, factors, 0.1), 1e-9, "lr after StepLR")


def test_weight_decay_adds_to_gradient_and_damping():
    O = optim()
    model = mlp(5)
    x, y = data(model, 7)
    eta, lam, lr = 0.1, 0.01, 0.05
    factors = ref.kfac_factors(model, x, y, "categorical", "exact")
    grad = grad_of(model, x, y) + eta * flat_params(model)
    expected = factored_direction(model, grad, factors, lam + eta)
    opt = O.KFAC(model, lr=lr, damping=lam, estimator="exact", schedule=O.Schedule(decay=0.0),
                 step_policy=plain(weight_decay=eta))
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change / lr, expected, 1e-9, "weight decay")


def test_heavy_ball_momentum():
    O = optim()
    model = mlp(6)
    lam, lr, mu = 0.1, 0.05, 0.9
    opt = O.KFAC(model, lr=lr, damping=lam, estimator="exact", schedule=O.Schedule(decay=0.0),
                 step_policy=O.StepPolicy(rescale="none", momentum=mu))
    buffer = None
    for k, (x, y) in enumerate(mlp_batches(3, size=7, seed=40)):
        direction = factored_direction(model, grad_of(model, x, y),
                                       ref.kfac_factors(model, x, y, "categorical", "exact"), lam)
        buffer = direction if buffer is None else mu * buffer + direction
        change = step_change(opt, model, x, y)
        H.assert_rel_close(change, lr * buffer, 1e-9, f"momentum step {k}")


@pytest.mark.parametrize("kl_clip", [1e-7, 1e3])
def test_kl_clip_rescaling(kl_clip):
    """rescale="kl_clip": step lr·ν·Δ, ν = min(1, √(kl_clip / (lr² Δᵀ F̂ Δ))) with F̂ the damped
    K-FAC matrix, so that Δᵀ F̂ Δ = Δᵀ ∇ (Ba et al. 2017)."""
    O = optim()
    model = mlp(7)
    x, y = data(model, 7)
    lam, lr = 0.1, 0.5
    grad = grad_of(model, x, y)
    direction = factored_direction(model, grad, ref.kfac_factors(model, x, y, "categorical", "exact"), lam)
    nu = min(1.0, math.sqrt(kl_clip / (lr * lr * float(direction @ grad))))
    if kl_clip < 1:
        assert nu < 1e-2  # the clip is active
    opt = O.KFAC(model, lr=lr, damping=lam, estimator="exact", schedule=O.Schedule(decay=0.0),
                 step_policy=O.StepPolicy(rescale="kl_clip", kl_clip=kl_clip, momentum=0.0))
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change, lr * nu * direction, 1e-9, f"kl_clip={kl_clip}")


# --------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_in_model_dtype(name, dtype):
    O = optim()
    model = mlp(8, dtype=dtype)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
    y = torch.arange(8) % 3
    opt = getattr(O, name)(model, damping_policy=O.DampingPolicy(mode="eigen"))
    for _ in range(3):
        train_step(opt, model, x, y)
    for p in model.parameters():
        assert p.dtype == dtype and bool(torch.isfinite(p).all())
    seen = 0
    for p, st in opt.state.items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == dtype, f"state {key!r} is {value.dtype}, model is {dtype}"
                seen += 1
            elif isinstance(value, tuple):
                for v in value:
                    if isinstance(v, torch.Tensor) and v.is_floating_point():
                        assert v.dtype == dtype, f"state {key!r} is {v.dtype}, model is {dtype}"
    assert seen >= 4
    for layer in (model[0], model[2]):
        assert opt.state[layer.weight]["A"].dtype == dtype and opt.state[layer.weight]["G"].dtype == dtype


def _degenerate_inputs(kind, n, d, dtype):
    g = torch.Generator().manual_seed(0)
    if kind == "zeros":
        return torch.zeros(n, d, dtype=dtype)
    if kind == "constant":
        return torch.ones(n, d, dtype=dtype)
    if kind == "duplicate_columns":
        col = torch.randn(n, 1, generator=g, dtype=dtype)
        return col.repeat(1, d)
    if kind == "huge":
        return 1e4 * torch.randn(n, d, generator=g, dtype=dtype)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["zeros", "constant", "duplicate_columns", "huge"])
@pytest.mark.parametrize("variant", ["factored", "eigen", "ekfac"])
def test_degenerate_statistics_give_finite_steps(variant, kind):
    """Rank-deficient factors with repeated (zero) eigenvalues, in float32 with tiny damping:
    the eigendecompositions/inverses must not blow up (finite parameters, no exception)."""
    O = optim()
    model = mlp(9, sizes=(6, 5, 4), dtype=torch.float32)
    x = _degenerate_inputs(kind, 16, 6, torch.float32)
    y = torch.arange(16) % 4
    cls = O.EKFAC if variant == "ekfac" else O.KFAC
    mode = "eigen" if variant == "eigen" else "factored"
    opt = cls(model, damping=1e-8, damping_policy=O.DampingPolicy(mode=mode),
              schedule=O.Schedule(inverse_every=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipped step" either
        for _ in range(5):
            train_step(opt, model, x, y)
    for p in model.parameters():
        assert bool(torch.isfinite(p).all())
    with torch.no_grad():
        assert math.isfinite(float(nll(model(x), y)))
