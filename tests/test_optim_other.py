"""natgrad.optim's KFAC and EKFAC with parameters outside their Kronecker layers (LayerNorm,
Embedding, a custom module): reported once, updated by ``other`` ('sgd', 'adam', 'diagonal'),
and models without a Kronecker layer rejected.

Expected values are independent of the library: plain autograd gradients, torch.optim.Adam
and the reference Fisher diagonal.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import helpers as H
import reference as ref
from test_optim_helpers import grad_of, nll, optim, step_change, train_step
from test_optim_loop import make


# --------------------------------------------------------------------------------------
# parameters of other modules
# --------------------------------------------------------------------------------------
def _ln_slice(model):
    offsets = ref.param_offsets(model)
    return slice(offsets["1.weight"].start, offsets["1.bias"].stop)


@pytest.mark.parametrize("name", ["KFAC", "EKFAC"])
@pytest.mark.parametrize("make_net,modules", [
    (H.layernorm_net, ["1"]), (H.embed_net, ["emb"]), (H.custom_net, ["1"])])
def test_other_modules_reported_once(name, make_net, modules):
    model = make_net(71)
    x, y = H.make_data(model, "categorical", 6)
    with pytest.warns(UserWarning) as record:
        opt = make(name, model)
    user = [w for w in record if issubclass(w.category, UserWarning)]
    assert len(user) == 1, [str(w.message) for w in user]
    for m in modules:
        assert repr(m) in str(user[0].message) or m in str(user[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            train_step(opt, model, x, y)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_other_sgd_is_the_plain_gradient():
    O = optim()
    model = H.layernorm_net(72)
    x, y = H.make_data(model, "categorical", 6)
    grad = grad_of(model, x, y)
    with pytest.warns(UserWarning):
        opt = O.KFAC(model, lr=0.1, other="sgd", estimator="exact",
                     step_policy=O.StepPolicy(rescale="none", momentum=0.0))
    change = step_change(opt, model, x, y)
    sl = _ln_slice(model)
    H.assert_rel_close(change[sl], 0.1 * grad[sl], 1e-12, "other='sgd'")


def test_other_adam_matches_torch_adam():
    O = optim()
    model = H.layernorm_net(73)
    ln = [model[1].weight, model[1].bias]
    shadow = [p.detach().clone().requires_grad_(True) for p in ln]
    adam = torch.optim.Adam(shadow, lr=0.05)
    with pytest.warns(UserWarning):
        opt = O.KFAC(model, lr=0.05, other="adam", estimator="exact",
                     step_policy=O.StepPolicy(rescale="none", momentum=0.0))
    for k in range(4):
        x, y = H.make_data(model, "categorical", 6, seed=10 + k)
        opt.zero_grad()
        out = model(x)
        opt.backward(nll(out, y), out)
        for s, p in zip(shadow, ln):
            s.grad = p.grad.detach().clone()
        opt.step()
        adam.step()
        for s, p in zip(shadow, ln):
            H.assert_rel_close(p.detach(), s.detach(), 1e-12, f"Adam step {k}")


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_other_diagonal_uses_the_diagonal_fisher(estimator):
    O = optim()
    model = H.layernorm_net(74)
    x, y = H.make_data(model, "categorical", 6)
    lam, lr = 0.05, 0.1
    fisher = ref.fisher_exact(model, x, "categorical") if estimator == "exact" else \
        ref.fisher_empirical(model, x, y, "categorical")
    diag = torch.diagonal(fisher)
    grad = grad_of(model, x, y)
    with pytest.warns(UserWarning):
        opt = O.KFAC(model, lr=lr, damping=lam, other="diagonal", estimator=estimator,
                     schedule=O.Schedule(decay=0.0), step_policy=O.StepPolicy(rescale="none", momentum=0.0))
    change = step_change(opt, model, x, y)
    sl = _ln_slice(model)
    H.assert_rel_close(change[sl] / lr, grad[sl] / (diag[sl] + lam), 1e-10, f"other='diagonal', {estimator}")


@pytest.mark.parametrize("name", ["KFAC", "EKFAC"])
def test_model_without_kronecker_layer_is_a_value_error(name):
    model = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.LayerNorm(6))
    with pytest.raises(ValueError, match="Linear"):
        make(name, model)


@pytest.mark.parametrize("name", ["KFAC", "EKFAC"])
def test_model_with_only_frozen_linears_is_a_value_error(name):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    for layer in (model[0], model[2]):
        layer.requires_grad_(False)
    with pytest.raises(ValueError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make(name, model)
