"""natgrad.optim.PRONG: training, the reparametrization schedule, momentum handling, resume, errors.

Expected values come from plain torch: SGD on the same model and batches, the model's own
outputs, parameter snapshots, and SGD momentum written out in the canonical coordinates
W = V U, b = d − W μ.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

DT = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


def lib():
    import natgrad.nn as nnn
    from natgrad.optim.prong import PRONG

    return nnn, PRONG


@pytest.fixture(scope="module")
def digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16
    y = torch.tensor(bunch.target, dtype=torch.long)
    return x, y


def tanh_mlp(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype)


def small(seed=0, dtype=DT):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def small_data(n=80, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=DT) @ torch.randn(6, 6, generator=g, dtype=DT) + 1.0
    y = torch.randint(0, 3, (n,), generator=g)
    return x.to(dtype), y


def train(model, opt, x, y, steps, batch=64, seed=0, after_step=None):
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        TF.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if after_step is not None:
            after_step(t + 1)


def full_loss(model, x, y):
    with torch.no_grad():
        return float(TF.cross_entropy(model(x), y))


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_prong_beats_sgd_on_digits(digits, seed):
    """Same initial weights, same batches, same lr and momentum: after 300 steps the whitened
    network (reparametrized every 20 steps from 500 rows) has a much lower training loss."""
    nnn, PRONG = lib()
    x, y = digits
    lr, steps = 0.03, 300
    plain = tanh_mlp(seed)
    train(plain, torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9), x, y, steps, seed=seed)
    model = nnn.whiten(tanh_mlp(seed))
    opt = PRONG(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), x, every=20, samples=500)
    train(model, opt, x, y, steps, seed=seed)
    sgd, prong = full_loss(plain, x, y), full_loss(model, x, y)
    assert prong < 0.5 * sgd, (prong, sgd)
    assert opt.reparametrizations == 1 + steps // 20


def test_prong_plus_trains(digits):
    nnn, PRONG = lib()
    x, y = digits
    model = nnn.whiten(tanh_mlp(0), batchnorm=True)
    opt = PRONG(model, torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9), x, every=20, samples=500)
    start = full_loss(model.eval(), x, y)
    model.train()
    train(model, opt, x, y, 100)
    model.eval()
    assert full_loss(model, x, y) < 0.5 * start


def test_adam_base_optimizer(digits):
    nnn, PRONG = lib()
    x, y = digits
    model = nnn.whiten(tanh_mlp(0))
    base = torch.optim.Adam(model.parameters(), lr=3e-3)
    opt = PRONG(model, base, (x, y), every=10, samples=300)
    start = full_loss(model, x, y)
    train(model, opt, x, y, 50)
    assert full_loss(model, x, y) < 0.5 * start
    assert all(p not in base.state or not base.state[p] for p in model.parameters())  # reset at step 50


# --------------------------------------------------------------------------------------
# schedule and momentum
# --------------------------------------------------------------------------------------
def test_reparametrizes_every_T_steps_and_resets_momentum():
    nnn, PRONG = lib()
    x, y = small_data()
    model = nnn.whiten(small())
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    calls = []
    opt = PRONG(model, base, x, every=5, samples=30)
    assert opt.reparametrizations == 1  # before the first step
    assert not torch.equal(model[0].whitener, torch.eye(6, dtype=DT))
    original = opt.reparametrize

    def counting():
        calls.append(opt.steps)
        return original()

    opt.reparametrize = counting
    snapshots = []

    def check(step):
        state = [base.state.get(p, {}) for p in model.parameters()]
        if step % 5 == 0:
            assert all(len(s) == 0 for s in state), step  # momentum reset right after
        else:
            assert all("momentum_buffer" in s for s in state), step
        snapshots.append(model[2].whitener.clone())

    train(model, opt, x, y, 23, batch=16, after_step=check)
    assert calls == [5, 10, 15, 20]
    assert opt.steps == 23 and opt.reparametrizations == 5
    changed = [t + 1 for t in range(1, 23) if not torch.equal(snapshots[t], snapshots[t - 1])]
    assert changed == [5, 10, 15, 20]


def test_momentum_transform_is_exact():
    """With momentum='transform', a reparametrization followed by a momentum-only SGD step (zero
    gradient) moves the function exactly like the same step without reparametrization."""
    nnn, PRONG = lib()
    x, y = small_data()
    model = nnn.whiten(small())
    opt = PRONG(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), x, every=1000, samples=40,
                momentum="transform")
    train(model, opt, x, y, 7, batch=32)  # build momentum buffers
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    twin_opt.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))  # (not aliasing the buffers)
    for p in model.parameters():
        assert "momentum_buffer" in opt.state[p]
    probe = small_data(seed=5)[0]
    before = model(probe).detach()
    opt.reparametrize()  # new μ, U; buffers mapped
    torch.testing.assert_close(model(probe), before, rtol=0, atol=1e-10)
    assert not torch.equal(model[0].weight, twin[0].weight)
    for m, opt_ in ((model, opt.base_optimizer), (twin, twin_opt)):
        for _ in range(3):
            for p in m.parameters():
                p.grad = torch.zeros_like(p)
            opt_.step()
    torch.testing.assert_close(model(probe), twin(probe), rtol=0, atol=1e-10)
    assert float((model(probe) - before).detach().abs().max()) > 1e-3  # the momentum did move the function


def test_momentum_reset_keeps_state_of_other_parameters(digits):
    """PRONG+: BatchNorm's parameters are not reparametrized, so their momentum survives."""
    nnn, PRONG = lib()
    x, y = digits
    model = nnn.whiten(tanh_mlp(0), batchnorm=True)
    base = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    opt = PRONG(model, base, x, every=4, samples=200)
    train(model, opt, x, y, 4)
    norms = [p for m in model.modules() if isinstance(m, nn.BatchNorm1d) for p in m.parameters()]
    whitened = [p for _, layer in nnn.whitened_layers(model) for p in layer.parameters()]
    assert all("momentum_buffer" in base.state[p] for p in norms)
    assert all(not base.state.get(p) for p in whitened)


# --------------------------------------------------------------------------------------
# data sources
# --------------------------------------------------------------------------------------
def test_sample_inputs_from_tensor_and_loader():
    nnn, PRONG = lib()
    x, y = small_data(n=100)
    model = nnn.whiten(small())
    opt = PRONG(model, torch.optim.SGD(model.parameters(), lr=0.1), x, samples=30, seed=3)
    rows = opt.sample_inputs()
    assert rows.shape == (30, 6)
    matches = (rows[:, None, :] == x[None]).all(-1)
    assert bool((matches.sum(1) == 1).all()) and len(set(matches.float().argmax(1).tolist())) == 30  # distinct rows
    big = PRONG(model, torch.optim.SGD(model.parameters(), lr=0.1), x, samples=1000)
    assert torch.equal(big.sample_inputs(), x)  # fewer rows than samples: all of them
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    from_loader = PRONG(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, samples=40)
    assert torch.equal(from_loader.sample_inputs(), x[:40])
    batches = PRONG(model, torch.optim.SGD(model.parameters(), lr=0.1), [x[:10], x[10:50]], samples=25)
    assert torch.equal(batches.sample_inputs(), x[:25])


def test_lr_scheduler_and_param_groups_are_the_base_optimizers():
    nnn, PRONG = lib()
    x, y = small_data()
    model = nnn.whiten(small())
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = PRONG(model, base, x, every=3)
    assert opt.param_groups is base.param_groups and opt.state is base.state and opt.defaults is base.defaults
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        idx = torch.randint(0, 80, (16,), generator=g)
        opt.zero_grad()
        TF.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.steps == 4


# --------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,order", [("tensor", "optimizer_first"), ("loader", "optimizer_first"),
                                          ("tensor", "model_first")])
def test_resume_is_bit_exact(digits, source, order):
    nnn, PRONG = lib()
    x, y = digits
    x, y = x[:600], y[:600]
    data = x if source == "tensor" else torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50, shuffle=True)

    def build(seed, state=None):
        model = nnn.whiten(tanh_mlp(seed))
        if state is not None:
            model.load_state_dict(state)
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        return model, PRONG(model, base, data, every=4, samples=120)

    def run(model, opt, steps):  # batches from the global RNG: the RNG state matters
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (32,))
            opt.zero_grad()
            TF.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()

    torch.manual_seed(11)
    model, opt = build(0)
    run(model, opt, 6)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buffer)
    run(model, opt, 9)  # crosses reparametrizations at steps 8 and 12
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    buffer.seek(0)
    ck = torch.load(buffer, weights_only=False)
    if order == "optimizer_first":
        model2, opt2 = build(5)  # other initial weights; constructing reparametrizes
        model2.load_state_dict(ck["model"])
    else:  # the checkpoint's model, then PRONG (which reparametrizes it: undone by load_state_dict)
        model2, opt2 = build(5, ck["model"])
    opt2.load_state_dict(ck["opt"])
    torch.set_rng_state(ck["rng"])
    assert opt2.steps == 6 and opt2.reparametrizations == 2
    run(model2, opt2, 9)
    assert opt2.steps == opt.steps == 15 and opt2.reparametrizations == opt.reparametrizations == 4
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
def test_bad_arguments():
    nnn, PRONG = lib()
    x, _ = small_data()
    plain = small()
    model = nnn.whiten(plain)

    def sgd(m=model):
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    for every in (0, -3):
        with pytest.raises(ValueError, match="every"):
            PRONG(model, sgd(), x, every=every)
    for samples in (0, -1):
        with pytest.raises(ValueError, match="samples"):
            PRONG(model, sgd(), x, samples=samples)
    with pytest.raises(TypeError, match="every"):
        PRONG(model, sgd(), x, every=2.5)
    with pytest.raises(TypeError, match="samples"):
        PRONG(model, sgd(), x, samples=True)
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            PRONG(model, sgd(), x, eps=eps)
    with pytest.raises(TypeError, match="base_optimizer"):
        PRONG(model, "sgd", x)
    with pytest.raises(TypeError, match="base_optimizer"):
        PRONG(model, list(model.parameters()), x)
    with pytest.raises(ValueError, match="not the model's"):
        PRONG(model, sgd(plain), x)  # built over the unwhitened model
    with pytest.raises(ValueError, match="whiten"):
        PRONG(plain, sgd(plain), x)  # no whitened layer
    with pytest.raises(TypeError):
        PRONG(object(), sgd(), x)
    with pytest.raises(ValueError, match="momentum"):
        PRONG(model, sgd(), x, momentum="keep")
    with pytest.raises(ValueError, match="SGD"):
        PRONG(model, torch.optim.Adam(model.parameters()), x, momentum="transform")
    with pytest.raises(ValueError, match="empty"):
        PRONG(model, sgd(), x[:0])
    with pytest.raises(TypeError, match="re-iterable"):
        PRONG(model, sgd(), (row for row in x))
    with pytest.raises(ValueError, match="no inputs"):
        PRONG(model, sgd(), [])
    opt = PRONG(model, sgd(), x)
    with pytest.raises(ValueError, match="PRONG state_dict"):
        opt.load_state_dict(sgd().state_dict())
