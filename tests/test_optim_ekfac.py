"""natgrad.optim.EKFAC against a plain re-implementation from tests/reference.py (float64).

Direction Q_G [(Q_Gᵀ ∇M Q_A) / (s + λ)] Q_Aᵀ, with Q_A, Q_G the eigenbases of the running K-FAC
factors, recomputed on refresh steps (the first three steps and every inverse_every steps),
and s = (1/N) Σ_{n,k} (Q_Gᵀ Γ_nk Q_A)² re-estimated from the per-example gradients Γ_nk of
each statistics step in the *current* basis (running average within a basis, restarted when
the basis changes). On a refresh step without statistics s falls back to λ_G λ_Aᵀ (K-FAC).

The comparisons use directions, which do not depend on the sign/order of eigenvectors.
"""

from __future__ import annotations

import pytest
import torch

import helpers as H
import reference as ref
from test_optim_helpers import (
    bases_of, data, eigen_direction, ekfac_direction, ekfac_scales, grad_of, mlp, optim, plain,
    step_change,
)



def average(old, new, rho):
    if old is None:
        return new
    return {name: [tuple(rho * a + (1 - rho) * b for a, b in zip(po, pn)) for po, pn in zip(old[name], new[name])]
            for name in old}


def average_scales(old, new, rho):
    if old is None:
        return new
    return {name: [rho * a + (1 - rho) * b for a, b in zip(old[name], new[name])] for name in old}


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_first_step_direction(model_name, estimator, likelihood):
    O = optim()
    model = mlp(30) if model_name == "mlp" else H.cnn(30)
    x, y = data(model, 8, likelihood=likelihood)
    lam, lr = 0.02, 0.05
    E, _ = ref.ekfac_dense(model, x, y, likelihood, estimator)
    grad = grad_of(model, x, y, likelihood)
    expected = torch.linalg.solve(E + lam * torch.eye(E.shape[0], dtype=torch.float64), grad)
    opt = O.EKFAC(model, lr=lr, damping=lam, likelihood=likelihood, estimator=estimator,
                  schedule=O.Schedule(decay=0.0), step_policy=plain())
    change = step_change(opt, model, x, y, likelihood)
    H.assert_rel_close(change / lr, expected, 1e-8, f"EKFAC direction ({estimator}, {likelihood})")


def test_stat_fraction_fits_bases_and_scales_on_the_first_examples():
    """Schedule(stat_fraction=½): factors, bases and scales from the first 4 of 8 examples; the
    gradient is still the whole batch's."""
    O = optim()
    model = mlp(31)
    x, y = data(model, 8)
    lam, lr = 0.02, 0.05
    E, _ = ref.ekfac_dense(model, x[:4], y[:4], "categorical", "exact")
    expected = torch.linalg.solve(E + lam * torch.eye(E.shape[0], dtype=torch.float64), grad_of(model, x, y))
    opt = O.EKFAC(model, lr=lr, damping=lam, estimator="exact",
                  schedule=O.Schedule(decay=0.0, stat_fraction=0.5, stat_min_examples=1), step_policy=plain())
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change / lr, expected, 1e-8, "EKFAC direction, statistics of 4 of 8 examples")


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_basis_every_inverse_every_steps_scales_every_step(decay):
    """inverse_every=3: bases from the running factors on steps 0, 1, 2, 3, 6; on the other
    steps the scales are re-measured from that step's per-example gradients in the old basis
    (averaged with decay within the basis)."""
    O = optim()
    model = mlp(31)
    batches = [data(model, 8, seed=50 + i) for i in range(6)]
    lam, lr = 0.05, 0.05
    opt = O.EKFAC(model, lr=lr, damping=lam, estimator="exact",
                  schedule=O.Schedule(decay=decay, inverse_every=3), step_policy=plain())
    factors = bases = scales = None
    for k, (x, y) in enumerate(batches):
        rho = min(1 - 1 / (k + 1), decay)
        factors = average(factors, ref.kfac_factors(model, x, y, "categorical", "exact"), rho)
        fresh = k < 3 or k % 3 == 0
        if fresh:
            bases = bases_of(factors)
        batch_scales = ekfac_scales(model, x, y, "categorical", "exact", bases)
        scales = batch_scales if fresh else average_scales(scales, batch_scales, rho)
        grad = grad_of(model, x, y)
        expected = ekfac_direction(model, grad, bases, scales, lam)
        change = step_change(opt, model, x, y)
        H.assert_rel_close(change / lr, expected, 1e-8, f"step {k}")
        if k in (4, 5):  # stale basis: differs from a freshly fitted EKFAC
            new_bases = bases_of(factors)
            fresh_dir = ekfac_direction(model, grad, new_bases,
                                        ekfac_scales(model, x, y, "categorical", "exact", new_bases), lam)
            assert H.rel_err(change / lr, fresh_dir) > 1e-4


def test_refresh_without_statistics_uses_kfac_eigenvalues():
    """stat_every=2, inverse_every=3: step 3 refreshes the basis with no batch to measure
    scales in it, so s = λ_G λ_Aᵀ and the direction is K-FAC's exactly damped one; step 4
    (statistics, no refresh) re-measures s in that basis; step 5 reuses it."""
    O = optim()
    model = mlp(32)
    batches = [data(model, 8, seed=60 + i) for i in range(6)]
    lam, lr = 0.05, 0.05
    opt = O.EKFAC(model, lr=lr, damping=lam, estimator="exact",
                  schedule=O.Schedule(stat_every=2, inverse_every=3, decay=0.0), step_policy=plain())
    factors = bases = scales = None
    for k, (x, y) in enumerate(batches):
        grad = grad_of(model, x, y)
        if k % 2 == 0:
            factors = ref.kfac_factors(model, x, y, "categorical", "exact")
        if k in (0, 2):  # statistics + refresh
            bases = bases_of(factors)
            scales = ekfac_scales(model, x, y, "categorical", "exact", bases)
        if k == 4:  # statistics in the basis of step 3 (= eigenbasis of step 2's factors)
            scales = ekfac_scales(model, x, y, "categorical", "exact", bases)
        change = step_change(opt, model, x, y)
        if k == 1:
            continue  # a refresh of unchanged factors; not specified further
        if k == 3:
            expected = eigen_direction(model, grad, factors, lam)
        else:
            expected = ekfac_direction(model, grad, bases, scales, lam)
        H.assert_rel_close(change / lr, expected, 1e-8, f"step {k}")


def test_damping_mode_is_ignored_damping_is_exact_in_the_eigenbasis():
    O = optim()
    changes = []
    for mode in ("factored", "eigen"):
        model = mlp(33)
        x, y = data(model, 8)
        opt = O.EKFAC(model, lr=0.05, damping=0.3, estimator="exact", schedule=O.Schedule(decay=0.0),
                      damping_policy=O.DampingPolicy(mode=mode), step_policy=plain())
        changes.append(step_change(opt, model, x, y))
    H.assert_rel_close(changes[0], changes[1], 1e-12, "factored vs eigen mode")


def test_param_groups_lr_and_damping_per_layer():
    O = optim()
    model = mlp(34)
    x, y = data(model, 8)
    E, _ = ref.ekfac_dense(model, x, y, "categorical", "exact")
    grad = grad_of(model, x, y)
    groups = [{"params": list(model[0].parameters()), "lr": 0.2, "damping": 0.01},
              {"params": list(model[2].parameters()), "lr": 0.03, "damping": 0.5}]
    opt = O.EKFAC(model, estimator="exact", schedule=O.Schedule(decay=0.0), step_policy=plain(),
                  param_groups=groups)
    change = step_change(opt, model, x, y)
    n0 = sum(p.numel() for p in model[0].parameters())
    lam = torch.cat([torch.full((n0,), 0.01), torch.full((grad.numel() - n0,), 0.5)]).to(grad.dtype)
    expected = torch.linalg.solve(E + torch.diag(lam), grad)  # E is block-diagonal over layers
    H.assert_rel_close(change[:n0] / 0.2, expected[:n0], 1e-8, "layer 0")
    H.assert_rel_close(change[n0:] / 0.03, expected[n0:], 1e-8, "layer 2")
