"""PRONG on mnist-autoencoder, as ``natgrad train``/``compare`` build it (natgrad.registry).

Plain PRONG (the registry's setting before) blew the loss up from ~550 to thousands of nats in
20-30 steps at every lr of its grid (docs/convergence.md: the deep sigmoid layers' inputs vary
far less than eps, so their whitening is a ×1/eps step size that turns unstable as soon as the
units start to vary). The registry now builds PRONG+ (batch normalisation after every whitened
linear map) with its own lr grid; these tests pin that setting and that it trains.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="MNIST t10k files not found in ../shared/data/mnist")


def _auto():
    from natgrad.tasks import get_task

    return get_task("mnist-autoencoder")


def test_prong_on_the_autoencoder_is_prong_plus():
    import natgrad.nn as nnn
    from natgrad.nn.whitened import WhitenedLinear
    from natgrad.optim import PRONG
    from natgrad.registry import get_optimizer

    task = _auto()
    torch.manual_seed(0)
    model = task.make_model()
    x = torch.rand(300, 784)
    opt = get_optimizer("prong").make(model, task, None, None, x)
    assert isinstance(opt, PRONG) and (opt.every, opt.samples, opt.eps, opt.momentum) == (100, 1000, 1e-2, "reset")
    linear = [m for m in model.modules() if isinstance(m, WhitenedLinear)]
    assert len(linear) == 8 and not any(isinstance(m, nn.Linear) for m in model.modules())
    pairs = [m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 2
             and isinstance(m[0], WhitenedLinear) and isinstance(m[1], nn.BatchNorm1d)]
    assert len(pairs) == 8  # every whitened layer is followed by its batch normalisation
    assert len(nnn.whitened_layers(model)) == 8
    assert get_optimizer("prong").grid(task) == (0.1, 0.3, 1.0) == get_optimizer("sgd-bn").grid(task)
    assert get_optimizer("prong").grid(task) != get_optimizer("sgd").grid(task)
    assert len(get_optimizer("prong").grid(task)) == len(get_optimizer("sgd").grid(task))  # same tuning budget
    # other tasks keep plain PRONG and the default grid
    from natgrad.tasks import get_task

    digits = get_task("digits-mlp")
    small = digits.make_model()
    get_optimizer("prong").make(small, digits, 0.1, None, torch.randn(50, 64))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in small.modules())
    assert get_optimizer("prong").grid(digits) == (0.03, 0.1, 0.3)


def test_sgd_bn_is_the_architecture_of_prong_plus_without_whitening():
    from natgrad.registry import get_optimizer

    task = _auto()
    torch.manual_seed(0)
    model = task.make_model()
    n_params = sum(p.numel() for p in model.parameters())
    opt = get_optimizer("sgd-bn").make(model, task, None, None, None)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.1
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [m.num_features for m in norms] == [1000, 500, 250, 30, 250, 500, 1000, 784]
    assert sum(p.numel() for p in model.parameters()) == n_params + 2 * sum(m.num_features for m in norms)
    assert model(torch.rand(5, 784)).shape == (5, 784)


@needs_mnist
def test_prong_plus_trains_the_autoencoder_at_the_largest_lr_of_its_grid():
    """40 steps on MNIST at lr 1 (the registry's grid's largest): below the ~205-nat plateau,
    where plain PRONG had blown up to thousands of nats by then at lr 3e-3."""
    from natgrad.registry import get_optimizer

    torch.set_num_threads(1)
    task = _auto()
    x = task.load(MNIST_DIR).x_train
    torch.manual_seed(0)
    model = task.make_model()
    spec = get_optimizer("prong")
    opt = spec.make(model, task, max(spec.grid(task)), None, x)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        xb = x[torch.randint(0, x.shape[0], (250,), generator=g)]
        opt.zero_grad()
        loss = task.loss(model(xb), xb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and max(losses) <= losses[0] + 1
    with torch.no_grad():
        full = float(task.loss(model(x[:2000]), x[:2000]))
    assert full < 200, (losses[::5], full)
