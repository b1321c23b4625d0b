"""Defaults that work: on scikit-learn's digits (pixels / 16, all 1,797 images as the training
set), the MLP Linear(64, 32)-Tanh-Linear(32, 10) with batches of 128 reaches a lower
full-training-set cross-entropy after 200 steps with ``KFAC(model, likelihood="categorical")``
(no other argument) than with ``torch.optim.Adam`` and its defaults — same initial weights,
same batch sequence, several seeds. EKFAC and NGD too, and all three through a shuffled
DataLoader whose epochs end with a short batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from test_optim_helpers import optim


STEPS = 200
BATCH = 128


@pytest.fixture(scope="module")
def digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16
    y = torch.tensor(bunch.target, dtype=torch.long)
    assert x.shape == (1797, 64) and float(x.max()) == 1.0
    return x, y


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def batch_indices(n, seed, steps=STEPS):
    """Epochs of a fixed random permutation, full batches only."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out.extend(perm[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH))
    return out[:steps]


def full_loss(model, x, y):
    with torch.no_grad():
        return float(TF.cross_entropy(model(x), y))


_ADAM: dict[int, float] = {}


def train_adam(x, y, seed):
    if seed in _ADAM:
        return _ADAM[seed]
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters())
    for idx in batch_indices(len(x), seed):
        opt.zero_grad()
        TF.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    _ADAM[seed] = full_loss(model, x, y)
    return _ADAM[seed]


def train_natgrad(name, x, y, seed, steps=STEPS):
    model = make_model(seed)
    opt = getattr(optim(), name)(model, likelihood="categorical")
    torch.manual_seed(1000 + seed)  # the Monte-Carlo draws of the default estimator
    for idx in batch_indices(len(x), seed, steps):
        opt.zero_grad()
        out = model(x[idx])
        loss = TF.cross_entropy(out, y[idx])
        opt.backward(loss, out)
        opt.step()
    for p in model.parameters():
        assert p.dtype == torch.float32 and bool(torch.isfinite(p).all())
    return full_loss(model, x, y)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["KFAC", "EKFAC"])
def test_defaults_beat_adam_on_digits(digits, name, seed):
    x, y = digits
    initial = full_loss(make_model(seed), x, y)
    adam = train_adam(x, y, seed)
    ours = train_natgrad(name, x, y, seed)
    assert adam < initial  # the baseline did train
    assert ours < adam, f"{name}: {ours:.4f} vs Adam {adam:.4f} (initial {initial:.4f})"


def test_ngd_defaults_beat_adam_on_digits(digits):
    x, y = digits
    adam = train_adam(x, y, 0)
    ours = train_natgrad("NGD", x, y, 0)
    assert ours < adam, f"NGD: {ours:.4f} vs Adam {adam:.4f}"


@pytest.mark.parametrize("name", ["KFAC", "EKFAC", "NGD"])
def test_defaults_train_through_a_shuffled_loader(digits, name):
    """The plain DataLoader(batch_size=128, shuffle=True) loop: every epoch ends with a batch of
    5, whose one-sample Monte-Carlo Fisher has rank ≤ 5 — with NGD's former default damping 0.1
    its solve multiplied the gradient outside that span by 10 and training diverged on 3 seeds
    of 5 (0.3 still diverged on the MNIST MLP). All three end below Adam's loss of the
    full-batch sequence (~0.75–0.8)."""
    x, y = digits
    for seed in (0, 1):
        model = make_model(seed)
        opt = getattr(optim(), name)(model, likelihood="categorical")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(1000 + seed)
        steps = 0
        while steps < STEPS:
            for xb, yb in loader:
                opt.zero_grad()
                out = model(xb)
                opt.backward(TF.cross_entropy(out, yb), out)
                opt.step()
                steps += 1
                if steps == STEPS:
                    break
        ours, adam = full_loss(model, x, y), train_adam(x, y, seed)
        assert ours < adam, f"{name}, seed {seed}: {ours:.4f} vs Adam {adam:.4f}"
