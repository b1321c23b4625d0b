"""state_dict / load_state_dict: a run resumed from a checkpoint (model state_dict, optimizer
state_dict and the torch RNG state, saved with torch.save) continues bit for bit (torch.equal)
as the uninterrupted run — KFAC, EKFAC and NGD under several Schedule / StepPolicy /
DampingPolicy settings, the default Monte-Carlo estimator included, with the checkpoint taken
at different points of the refresh schedule. The resumed optimizer is a new object on a new
model instance (different initial weights, so nothing leaks through shared objects).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import helpers as H
from test_optim_helpers import assert_same, mlp, nll, optim, roundtrip


STEPS = 7


def _configs():
    O = optim()
    S, D, P = O.Schedule, O.DampingPolicy, O.StepPolicy
    return {
        "kfac-default": ("KFAC", {}),
        "kfac-stat2-inv3-momentum": ("KFAC", dict(schedule=S(stat_every=2, inverse_every=3, decay=0.9),
                                                  step_policy=P(rescale="none", momentum=0.9))),
        "kfac-eigen-klclip-wd": ("KFAC", dict(damping_policy=D(mode="eigen"), lr=0.3,
                                              step_policy=P(rescale="kl_clip", kl_clip=1e-3, momentum=0.5,
                                                            weight_decay=1e-3))),
        "kfac-adaptive": ("KFAC", dict(damping_policy=D(adaptive=True, adapt_every=2), damping=0.1)),
        "kfac-quadratic-stat3": ("KFAC", dict(schedule=S(stat_every=3, inverse_every=2), samples=2)),
        "kfac-exact-groups": ("KFAC", dict(estimator="exact", group_lrs=(1.0, 0.5))),
        "kfac-empirical": ("KFAC", dict(estimator="empirical")),
        "kfac-other-adam": ("KFAC", dict(net="layernorm", other="adam")),
        "kfac-other-diagonal": ("KFAC", dict(net="layernorm", other="diagonal")),
        "ekfac-default": ("EKFAC", {}),
        "ekfac-stat2-inv3": ("EKFAC", dict(schedule=S(stat_every=2, inverse_every=3, decay=0.5),
                                           step_policy=P(rescale="none", momentum=0.9))),
        "ekfac-inv4-decay": ("EKFAC", dict(schedule=S(inverse_every=4, decay=0.8))),
        "ekfac-cnn": ("EKFAC", dict(net="cnn")),
        "ngd-default": ("NGD", {}),
        "ngd-implicit": ("NGD", dict(structure="implicit")),
        "ngd-quadratic-momentum": ("NGD", dict(step_policy=P(rescale="quadratic"))),
        "ngd-kfac-structure": ("NGD", dict(structure="kfac", step_policy=P(rescale="none", momentum=0.5))),
        "ngd-dense-average": ("NGD", dict(structure="dense", schedule=S(stat_every=1, inverse_every=1, decay=0.5))),
        "ngd-stat2": ("NGD", dict(schedule=S(stat_every=2, inverse_every=1, decay=0.0))),
    }


CASES = [pytest.param(c, id=c)
         for c in ["kfac-default", "kfac-stat2-inv3-momentum", "kfac-eigen-klclip-wd", "kfac-adaptive",
                   "kfac-quadratic-stat3", "kfac-exact-groups", "kfac-empirical", "kfac-other-adam",
                   "kfac-other-diagonal", "ekfac-default", "ekfac-stat2-inv3", "ekfac-inv4-decay",
                   "ekfac-cnn", "ngd-default", "ngd-implicit", "ngd-quadratic-momentum",
                   "ngd-kfac-structure", "ngd-dense-average", "ngd-stat2"]]


def _model(net, seed):
    if net == "layernorm":
        return H.layernorm_net(seed)
    if net == "cnn":
        return H.cnn(seed)
    return mlp(seed, sizes=(5, 6, 3))


def _batches(net):
    model = _model(net, 0)
    return [H.make_data(model, "categorical", 8, seed=100 + k) for k in range(STEPS)]


def _optimizer(name, model, kw):
    kw = dict(kw)
    kw.pop("net", None)
    lrs = kw.pop("group_lrs", None)
    if lrs is not None:
        kw["param_groups"] = [{"params": list(model[0].parameters()), "lr": lrs[0]},
                              {"params": list(model[2].parameters()), "lr": lrs[1]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "other modules" notice
        return getattr(optim(), name)(model, **kw)


def _run(case, split):
    """STEPS training steps; at step ``split`` everything goes through a checkpoint."""
    name, kw = _configs()[case]
    net = kw.get("net")
    batches = _batches(net)
    closure = kw.get("damping_policy") is not None and kw["damping_policy"].adaptive
    model = _model(net, 1)
    opt = _optimizer(name, model, kw)
    torch.manual_seed(1234)
    for k, (x, y) in enumerate(batches):
        if k == split:
            ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()})
            opt.remove_hooks()
            model = _model(net, 2)  # different weights: the checkpoint must restore them
            model.load_state_dict(ckpt["model"])
            torch.manual_seed(999)  # scramble the RNG: the checkpoint must restore it
            opt = _optimizer(name, model, kw)
            opt.load_state_dict(ckpt["opt"])
            torch.set_rng_state(ckpt["rng"])
        opt.zero_grad()
        out = model(x)
        loss = nll(out, y)
        opt.backward(loss, out)
        if closure:
            opt.step(lambda: nll(model(x), y))
        else:
            opt.step()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


@pytest.mark.parametrize("case", CASES)
def test_resume_is_bit_for_bit(case):
    params, state = _run(case, None)
    for split in (1, 3, 4):
        resumed, resumed_state = _run(case, split)
        for i, (a, b) in enumerate(zip(params, resumed)):
            assert torch.equal(a, b), f"checkpoint at step {split}: parameter {i} differs"
        assert_same(resumed_state, state, f"state (checkpoint at step {split})")


def test_runs_are_reproducible_and_mc_uses_the_torch_rng():
    """The baseline of the resume tests: same seed, same run; another seed, another run."""
    a, _ = _run("kfac-default", None)
    b, _ = _run("kfac-default", None)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    name, kw = _configs()["kfac-default"]
    model = _model(None, 1)
    opt = _optimizer(name, model, kw)
    torch.manual_seed(4321)
    for x, y in _batches(None):
        opt.zero_grad()
        out = model(x)
        opt.backward(nll(out, y), out)
        opt.step()
    assert not all(torch.equal(u, v.detach()) for u, v in zip(a, model.parameters()))


@pytest.mark.parametrize("name", ["KFAC", "EKFAC", "NGD"])
def test_state_dict_round_trip_is_identity(name):
    model = mlp(5, sizes=(5, 6, 3))
    opt = _optimizer(name, model, {})
    for x, y in _batches(None)[:3]:
        opt.zero_grad()
        out = model(x)
        opt.backward(nll(out, y), out)
        opt.step()
    saved = roundtrip(opt.state_dict())
    other_model = mlp(6, sizes=(5, 6, 3))
    other = _optimizer(name, other_model, {})
    other.load_state_dict(saved)
    assert_same(other.state_dict(), saved)
    # loading does not alias the saved tensors: training on does not modify the checkpoint
    frozen = roundtrip(saved)
    other_model.load_state_dict(model.state_dict())
    x, y = _batches(None)[3]
    other.zero_grad()
    out = other_model(x)
    other.backward(nll(out, y), out)
    other.step()
    assert_same(saved, frozen)
