"""The training-loop contract of natgrad.optim (KFAC, EKFAC, NGD): the documented loop, what
happens when it is not followed, non-finite losses/gradients, other modules, hooks and
evaluation between steps, and the validation of every option.

Expected values are independent of the library: plain autograd gradients, torch.optim.Adam,
the reference Fisher diagonal, hook counts taken before the optimizer existed, and runs
without the disturbance being tested.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import helpers as H
import reference as ref
from test_optim_helpers import (
    DT, assert_same, data, flat_params, grad_of, loss_of, mlp, nll, optim,
    roundtrip, step_change, train_step,
)


NAMES = ("KFAC", "EKFAC", "NGD")


def make(name, model, **kw):
    return getattr(optim(), name)(model, **kw)


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["mc", "exact", "empirical"])
@pytest.mark.parametrize("name", NAMES)
def test_documented_loop_trains(name, estimator):
    model = mlp(60, sizes=(5, 8, 3))
    x, y = data(model, 32)
    opt = make(name, model, likelihood="categorical", estimator=estimator)
    assert isinstance(opt, torch.optim.Optimizer)
    start = loss_of(model, x, y)
    for _ in range(15):
        train_step(opt, model, x, y)
    end = loss_of(model, x, y)
    assert math.isfinite(end) and end < 0.7 * start, (start, end)


@pytest.mark.parametrize("name", NAMES)
def test_common_signature(name):
    O = optim()
    model = mlp(60)
    opt = make(name, model, lr=0.2, damping=0.05, likelihood="gaussian", estimator="exact")
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["lr"] == 0.2 and opt.param_groups[0]["damping"] == 0.05
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    x = torch.randn(4, 5, dtype=DT)
    y = torch.randn(4, 3, dtype=DT)
    train_step(opt, model, x, y, "gaussian")
    assert isinstance(O.Schedule(), O.Schedule)


@pytest.mark.parametrize("name", NAMES)
def test_loop_has_no_second_forward_pass(name):
    model = mlp(61)
    x, y = data(model, 8)
    calls = []
    for m in model.modules():
        m.register_forward_hook(lambda mod, i, o: calls.append(mod))
    opt = make(name, model)
    for _ in range(3):
        opt.zero_grad()
        out = model(x)
        n = len(calls)
        loss = nll(out, y)
        opt.backward(loss, out)
        opt.step()
        assert len(calls) == n, f"{len(calls) - n} module calls inside backward()/step()"


@pytest.mark.parametrize("name", ["KFAC", "EKFAC"])
def test_empirical_plain_loop_with_defaults(name):
    model = mlp(62, sizes=(5, 8, 3))
    x, y = data(model, 32)
    opt = make(name, model, likelihood="categorical", estimator="empirical")
    start = loss_of(model, x, y)
    for _ in range(15):
        opt.zero_grad()
        nll(model(x), y).backward()
        opt.step()
    assert loss_of(model, x, y) < 0.7 * start


def test_empirical_plain_loop_ngd_defaults():
    model = mlp(62, sizes=(5, 8, 3))
    x, y = data(model, 32)
    opt = make("NGD", model, likelihood="categorical", estimator="empirical")
    start = loss_of(model, x, y)
    for _ in range(15):
        opt.zero_grad()
        nll(model(x), y).backward()
        opt.step()
    assert loss_of(model, x, y) < 0.7 * start


@pytest.mark.parametrize("estimator", ["mc", "exact"])
@pytest.mark.parametrize("name", NAMES)
def test_plain_backward_on_statistics_step_is_a_clear_error_and_recoverable(name, estimator):
    O = optim()
    kw = dict(estimator=estimator, step_policy=O.StepPolicy(rescale="none", momentum=0.0))
    model = mlp(63)
    x, y = data(model, 8)
    opt = make(name, model, **kw)
    state = roundtrip(opt.state_dict())
    before = flat_params(model)
    opt.zero_grad()
    nll(model(x), y).backward()
    with pytest.raises(RuntimeError) as info:
        opt.step()
    assert "opt.backward" in str(info.value)
    assert torch.equal(flat_params(model), before)
    assert_same(opt.state_dict(), state)
    # the proper loop continues as if nothing happened
    torch.manual_seed(5)
    change = step_change(opt, model, x, y)
    fresh_model = mlp(63)
    fresh = make(name, fresh_model, **kw)
    torch.manual_seed(5)
    assert torch.equal(change, step_change(fresh, fresh_model, x, y))


@pytest.mark.parametrize("name", NAMES)
def test_step_without_backward_is_a_clear_error(name):
    model = mlp(64)
    opt = make(name, model)
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_backward_argument_checks(name):
    model = mlp(65)
    x, y = data(model, 4)
    opt = make(name, model)
    out = model(x)
    with pytest.raises(TypeError):
        opt.backward(nn.functional.cross_entropy(out, y, reduction="none"), out)
    with pytest.raises(TypeError):
        opt.backward(nll(out, y), out.detach().numpy())


def test_ngd_implicit_empirical_plain_backward_is_a_clear_error():
    model = mlp(66)
    x, y = data(model, 4)
    opt = make("NGD", model, estimator="empirical", structure="implicit")
    opt.zero_grad()
    nll(model(x), y).backward()
    with pytest.raises(RuntimeError, match="opt.backward"):
        opt.step()


# --------------------------------------------------------------------------------------
# non-finite losses and gradients
# --------------------------------------------------------------------------------------
def _sequence(name, bad, estimator="exact"):
    """Two good steps with a bad one in between (or not); returns final params, and checks the
    bad step changes neither parameters nor state."""
    model = mlp(67)
    batches = [data(model, 8, seed=s) for s in (1, 2, 3)]
    opt = make(name, model, estimator=estimator)
    torch.manual_seed(3)
    train_step(opt, model, *batches[0])
    if bad is not None:
        x, y = batches[1]
        params = flat_params(model)
        state = roundtrip(opt.state_dict())
        with pytest.warns(Warning):
            opt.zero_grad()
            if bad == "nan_loss":
                x = x.clone()
                x[0, 0] = float("nan")
                out = model(x)
                opt.backward(nll(out, y), out)
            elif bad == "inf_grad":
                out = model(x)
                opt.backward(nll(out, y), out)
                model[0].weight.grad[0, 0] = float("inf")
            elif bad == "nan_plain":  # the user's own loss.backward() (empirical)
                x = x.clone()
                x[1] = float("nan")
                nll(model(x), y).backward()
            opt.step()
        assert torch.equal(flat_params(model), params), "parameters changed on a skipped step"
        assert_same(opt.state_dict(), state)
    train_step(opt, model, *batches[2])
    return flat_params(model), opt.state_dict()


@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_step_is_skipped_and_leaves_no_trace(name, bad):
    params, state = _sequence(name, bad)
    params_ref, state_ref = _sequence(name, None)
    assert torch.equal(params, params_ref)
    assert_same(state, state_ref)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_loss_with_mc_estimator_is_skipped(name):
    _sequence(name, "nan_loss", estimator="mc")  # checks params and state inside


def test_non_finite_plain_backward_empirical_is_skipped_ngd():
    # (KFAC/EKFAC with their default rescaling: see test_empirical_plain_loop_with_defaults)
    params, state = _sequence("NGD", "nan_plain", estimator="empirical")
    params_ref, state_ref = _sequence("NGD", None, estimator="empirical")
    assert torch.equal(params, params_ref)
    assert_same(state, state_ref)


@pytest.mark.parametrize("name", ["KFAC", "EKFAC"])
def test_non_finite_plain_backward_empirical_is_skipped_rescale_none(name):
    O = optim()
    model = mlp(68)
    x, y = data(model, 8)
    opt = make(name, model, estimator="empirical", step_policy=O.StepPolicy(rescale="none"))
    train_step(opt, model, x, y)
    params, state = flat_params(model), roundtrip(opt.state_dict())
    x = x.clone()
    x[2] = float("nan")
    opt.zero_grad()
    nll(model(x), y).backward()
    with pytest.warns(Warning):
        opt.step()
    assert torch.equal(flat_params(model), params)
    assert_same(opt.state_dict(), state)


# --------------------------------------------------------------------------------------
# the user's model is left usable
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["mc", "empirical"])
@pytest.mark.parametrize("name", NAMES)
def test_remove_hooks_leaves_no_hooks(name, estimator):
    model = mlp(69)
    x = torch.randn(6, 5, dtype=DT)
    y = torch.arange(6) % 3
    snap = H.snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make(name, model, estimator=estimator)
        for _ in range(3):
            train_step(opt, model, x, y)
    opt.remove_hooks()
    now = H.snapshot(model)
    for key in ("hooks", "tensor_hooks", "global_hooks", "training", "requires_grad", "grad_enabled",
                "default_dtype"):
        assert now[key] == snap[key], f"{key}: before {snap[key]} after {now[key]}"
    # and the model still trains with a plain optimizer
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd.zero_grad()
    nll(model(x), y).backward()
    sgd.step()


@pytest.mark.parametrize("estimator", ["mc", "exact", "empirical"])
@pytest.mark.parametrize("name", NAMES)
def test_no_grad_evaluation_between_steps_does_not_disturb(name, estimator):
    def run(evaluate):
        model = mlp(70)
        batches = [data(model, 8, seed=s) for s in (1, 2, 3, 4)]
        x_eval = torch.randn(11, 5, dtype=DT)
        opt = make(name, model, estimator=estimator)
        torch.manual_seed(9)
        for x, y in batches:
            opt.zero_grad()
            out = model(x)
            if evaluate:
                with torch.no_grad():
                    model(x_eval)
            opt.backward(nll(out, y), out)
            if evaluate:
                with torch.no_grad():
                    model(x_eval)
                    model.eval()
                    model(x_eval[:3])
                    model.train()
            opt.step()
            if evaluate:
                with torch.no_grad():
                    model(x_eval)
        return flat_params(model), opt.state_dict()

    p1, s1 = run(True)
    p2, s2 = run(False)
    assert torch.equal(p1, p2)
    assert_same(s1, s2)


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


def test_other_diagonal_uses_the_diagonal_fisher():
    O = optim()
    model = H.layernorm_net(74)
    x, y = H.make_data(model, "categorical", 6)
    lam, lr = 0.05, 0.1
    diag = torch.diagonal(ref.fisher_exact(model, x, "categorical"))
    grad = grad_of(model, x, y)
    with pytest.warns(UserWarning):
        opt = O.KFAC(model, lr=lr, damping=lam, other="diagonal", estimator="exact",
                     schedule=O.Schedule(decay=0.0), step_policy=O.StepPolicy(rescale="none", momentum=0.0))
    change = step_change(opt, model, x, y)
    sl = _ln_slice(model)
    H.assert_rel_close(change[sl] / lr, grad[sl] / (diag[sl] + lam), 1e-10, "other='diagonal'")


def test_other_diagonal_with_empirical_estimator():
    O = optim()
    model = H.layernorm_net(74)
    x, y = H.make_data(model, "categorical", 6)
    lam, lr = 0.05, 0.1
    diag = torch.diagonal(ref.fisher_empirical(model, x, y, "categorical"))
    grad = grad_of(model, x, y)
    with pytest.warns(UserWarning):
        opt = O.KFAC(model, lr=lr, damping=lam, other="diagonal", estimator="empirical",
                     schedule=O.Schedule(decay=0.0), step_policy=O.StepPolicy(rescale="none", momentum=0.0))
    change = step_change(opt, model, x, y)
    sl = _ln_slice(model)
    H.assert_rel_close(change[sl] / lr, grad[sl] / (diag[sl] + lam), 1e-10, "other='diagonal', empirical")


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


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _bad_constructor_args():
    O = optim()
    return [
        ("lr", dict(lr=0)), ("lr", dict(lr=-0.1)), ("lr", dict(lr=float("nan"))),
        ("lr", dict(lr=float("inf"))), ("lr", dict(lr="0.1")), ("lr", dict(lr=True)), ("lr", dict(lr=None)),
        ("damping", dict(damping=-1e-3)), ("damping", dict(damping=float("nan"))),
        ("damping", dict(damping=float("inf"))), ("damping", dict(damping="big")),
        ("estimator", dict(estimator="fisher")), ("estimator", dict(estimator=None)),
        ("estimator", dict(estimator="MC")),
        ("likelihood", dict(likelihood="poisson")), ("likelihood", dict(likelihood=3)),
        ("samples", dict(samples=0)), ("samples", dict(samples=2, estimator="exact")),
        ("schedule", dict(schedule={"decay": 0.5})), ("schedule", dict(schedule=None)),
        ("schedule", dict(schedule=O.DampingPolicy())),
        ("damping_policy", dict(damping_policy="eigen")), ("damping_policy", dict(damping_policy=O.Schedule())),
        ("step_policy", dict(step_policy={"rescale": "none"})), ("step_policy", dict(step_policy="none")),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_constructor_validation(name):
    for key, kw in _bad_constructor_args():
        model = mlp(75)
        with pytest.raises((ValueError, TypeError)) as info:
            make(name, model, **kw)
        assert key in str(info.value) or key.replace("_", " ") in str(info.value) or (
            key in ("schedule", "damping_policy", "step_policy")
            and type(kw[key]).__name__ in str(info.value)), f"{name}({kw}): unclear message {info.value!r}"


@pytest.mark.parametrize("name", ["KFAC", "EKFAC"])
def test_other_validation(name):
    with pytest.raises(ValueError, match="other"):
        make(name, mlp(76), other="rmsprop")


def test_ngd_structure_validation():
    with pytest.raises(ValueError, match="structure"):
        make("NGD", mlp(77), structure="full")


def test_model_type_validation():
    for name in NAMES:
        with pytest.raises(TypeError):
            make(name, [nn.Linear(2, 2)])


@pytest.mark.parametrize("factory,kw,key", [
    ("Schedule", dict(decay=1.0), "decay"), ("Schedule", dict(decay=-0.1), "decay"),
    ("Schedule", dict(decay=float("nan")), "decay"), ("Schedule", dict(decay="0.5"), "decay"),
    ("Schedule", dict(stat_every=0), "stat_every"), ("Schedule", dict(stat_every=-2), "stat_every"),
    ("Schedule", dict(stat_every=1.5), "stat_every"), ("Schedule", dict(stat_every=True), "stat_every"),
    ("Schedule", dict(inverse_every=0), "inverse_every"), ("Schedule", dict(inverse_every=2.0), "inverse_every"),
    ("DampingPolicy", dict(mode="full"), "mode"), ("DampingPolicy", dict(mode=None), "mode"),
    ("DampingPolicy", dict(adaptive="yes"), "adaptive"), ("DampingPolicy", dict(adapt_every=0), "adapt_every"),
    ("DampingPolicy", dict(omega=0.0), "omega"), ("DampingPolicy", dict(omega=1.5), "omega"),
    ("DampingPolicy", dict(min_damping=-1.0), "min_damping"),
    ("DampingPolicy", dict(min_damping=1.0, max_damping=0.5), "max_damping"),
    ("StepPolicy", dict(rescale="cubic"), "rescale"), ("StepPolicy", dict(rescale=None), "rescale"),
    ("StepPolicy", dict(momentum=1.0), "momentum"), ("StepPolicy", dict(momentum=-0.1), "momentum"),
    ("StepPolicy", dict(kl_clip=0.0), "kl_clip"), ("StepPolicy", dict(kl_clip=-1.0), "kl_clip"),
    ("StepPolicy", dict(weight_decay=-1e-4), "weight_decay"),
    ("StepPolicy", dict(weight_decay=float("inf")), "weight_decay"),
])
def test_option_object_validation(factory, kw, key):
    with pytest.raises((ValueError, TypeError), match=key):
        getattr(optim(), factory)(**kw)


def _groups(model, **extra):
    first, second = list(model[0].parameters()), list(model[2].parameters())
    return [dict(params=first, **extra), dict(params=second)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["lr0", "lr_neg", "damping_neg", "foreign", "missing", "duplicate",
                                  "split_layer", "not_dict"])
def test_param_group_validation(name, case):
    model = mlp(78)
    if case == "lr0":
        groups = _groups(model, lr=0.0)
    elif case == "lr_neg":
        groups = _groups(model, lr=-1.0)
    elif case == "damping_neg":
        groups = _groups(model, damping=-1.0)
    elif case == "foreign":
        groups = _groups(model) + [dict(params=[nn.Parameter(torch.zeros(2, dtype=DT))])]
    elif case == "missing":
        groups = _groups(model)[:1]
    elif case == "duplicate":
        groups = _groups(model) + [dict(params=[model[2].bias])]
    elif case == "split_layer":
        groups = [dict(params=[model[0].weight]), dict(params=[model[0].bias] + list(model[2].parameters()))]
        if name == "NGD":
            pytest.skip("NGD has no per-layer structure to keep together")
    else:
        groups = [list(model.parameters())]
    with pytest.raises((ValueError, TypeError)):
        make(name, model, param_groups=groups)


@pytest.mark.parametrize("value", [-1.0, float("nan")])
@pytest.mark.parametrize("name", NAMES)
def test_param_group_weight_decay_validation(name, value):
    model = mlp(79)
    with pytest.raises((ValueError, TypeError), match="weight_decay"):
        make(name, model, param_groups=_groups(model, weight_decay=value))
