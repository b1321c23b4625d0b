"""Validation of every option of natgrad.optim's KFAC, EKFAC and NGD: constructor arguments,
option objects (Schedule, DampingPolicy, StepPolicy), the model and param groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_optim_helpers import DT, data, mlp, optim
from test_optim_loop import NAMES, make


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
        ("samples", dict(samples=0)),
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


@pytest.mark.parametrize("name", NAMES)
def test_samples_without_mc_warns(name):
    with pytest.warns(UserWarning, match="samples=2 has no effect"):
        make(name, mlp(75), samples=2, estimator="exact")


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
    ("Schedule", dict(stat_fraction=0.0), "stat_fraction"), ("Schedule", dict(stat_fraction=1.5), "stat_fraction"),
    ("Schedule", dict(stat_fraction=float("nan")), "stat_fraction"), ("Schedule", dict(stat_fraction=True), "stat_fraction"),
    ("Schedule", dict(inverse_every=0), "inverse_every"), ("Schedule", dict(inverse_every=2.0), "inverse_every"),
    ("Schedule", dict(stat_min_examples=0), "stat_min_examples"),
    ("Schedule", dict(stat_min_examples=True), "stat_min_examples"),
    ("Schedule", dict(stat_min_examples=8.0), "stat_min_examples"),
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


@pytest.mark.parametrize("name", NAMES)
def test_group_values_changed_after_construction_are_checked_at_step(name):
    """lr is checked again at step(): a scheduler may anneal it to 0 (a step that changes
    nothing), a negative lr set by hand is an error before anything moves."""
    model = mlp(80)
    x, y = data(model, 16)
    opt = make(name, model, estimator="empirical")

    def one_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = 0.0
    one_step()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    opt.param_groups[0]["lr"] = -0.1
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        one_step()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_of_another_architecture_is_refused(name):
    """Same number of layers, other widths: torch's own check (group sizes) passes; natgrad's
    says what is wrong instead of failing deep inside the next step."""
    small, wide = mlp(81, sizes=(5, 4, 3)), mlp(81, sizes=(5, 6, 3))
    x, y = data(small, 8)
    opt = make(name, small, estimator="empirical")
    opt.zero_grad()
    torch.nn.functional.cross_entropy(small(x), y).backward()
    opt.step()
    with pytest.raises(ValueError, match="other parameter shapes"):
        make(name, wide, estimator="empirical").load_state_dict(opt.state_dict())
    make(name, mlp(82), estimator="empirical").load_state_dict(opt.state_dict())  # same shapes: fine


def test_warnings_point_at_the_callers_line():
    """natgrad's warnings name the user's line, not natgrad's frames or torch's no_grad wrapper
    (their depth differs: EKFAC → KFAC → base __init__, step() under @torch.no_grad())."""
    import warnings

    model = mlp(83)
    x, y = data(model, 6)
    x[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optim().EKFAC(model, estimator="exact", samples=2).remove_hooks()
        opt = optim().NGD(model)
        out = model(x)
        opt.backward(torch.nn.functional.cross_entropy(out, y), out)
        opt.step()
    assert len(caught) == 3
    assert all(w.filename == __file__ for w in caught), [(w.filename, w.lineno) for w in caught]
