"""The training-loop contract of natgrad.optim (KFAC, EKFAC, NGD): the documented loop, what
happens when it is not followed, non-finite losses/gradients, hooks and evaluation between
steps. Parameters of other modules are in test_optim_other.py, the validation of every option
in test_optim_validation.py (both use ``NAMES`` and ``make`` from here).

Expected values are independent of the library: hook counts taken before the optimizer
existed, and runs without the disturbance being tested.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import helpers as H
from test_optim_helpers import (
    DT, assert_same, data, flat_params, loss_of, mlp, nll, optim,
    roundtrip, step_change, train_step,
)


NAMES = ("KFAC", "EKFAC", "NGD")


def make(name, model, **kw):
    return getattr(optim(), name)(model, **kw)


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
# NGD's default damping (1.0, for realistic models: its MC Fisher of a batch has rank ≤ N, and
# the gradient outside that span is stepped by lr/damping) dwarfs this 5-8-3 model's Fisher
# eigenvalues (≪ 1): here it steps like SGD with lr 1 — 30 steps give ~0.7 of the start loss.
NGD_TINY_RATIO = {"NGD": 0.85}


@pytest.mark.parametrize("estimator", ["mc", "exact", "empirical"])
@pytest.mark.parametrize("name", NAMES)
def test_documented_loop_trains(name, estimator):
    model = mlp(60, sizes=(5, 8, 3))
    x, y = data(model, 32)
    opt = make(name, model, likelihood="categorical", estimator=estimator)
    assert isinstance(opt, torch.optim.Optimizer)
    start = loss_of(model, x, y)
    for _ in range(30):
        train_step(opt, model, x, y)
    end = loss_of(model, x, y)
    assert math.isfinite(end) and end < NGD_TINY_RATIO.get(name, 0.7) * start, (start, end)


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
    for _ in range(30):
        opt.zero_grad()
        nll(model(x), y).backward()
        opt.step()
    assert loss_of(model, x, y) < NGD_TINY_RATIO["NGD"] * start


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


@pytest.mark.parametrize("name", NAMES)
def test_step_itself_warns_when_it_skips_a_non_finite_loss(name):
    """The skip is announced where it happens too: opt.backward warns of the loss, step() of the
    skipped update (a test or a log that watches only step() sees it)."""
    model = mlp(68)
    x, y = data(model, 8)
    x[0, 0] = float("nan")
    opt = make(name, model)
    out = model(x)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.backward(nll(out, y), out)
    params = flat_params(model)
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert torch.equal(flat_params(model), params)
