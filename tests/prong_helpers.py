"""Models, data and inspection helpers shared by the PRONG layer tests (test_prong_layers.py,
test_prong_reparametrize.py): small float64 MLP/CNN with correlated, off-centre inputs, the
whitened layers of a model, their captured inputs, and plain SGD steps."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import nn

DT = torch.float64


def lib():
    import natgrad.nn as nnn

    return nnn


# --------------------------------------------------------------------------------------
# models and data: correlated, off-centre inputs so that whitening is far from the identity
# --------------------------------------------------------------------------------------
def mlp(seed=0, bias=True, dtype=DT):
    torch.manual_seed(seed)
    b = (bias, bias, bias) if isinstance(bias, bool) else bias
    return nn.Sequential(
        nn.Linear(6, 5, bias=b[0]), nn.Tanh(), nn.Linear(5, 4, bias=b[1]), nn.ReLU(), nn.Linear(4, 3, bias=b[2])
    ).to(dtype)


def cnn(seed=0, bias=True, dtype=DT):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=bias),
        nn.Tanh(),
        nn.Conv2d(4, 3, 3, stride=2, dilation=2, padding=2, bias=bias),
        nn.ReLU(),
        nn.Conv2d(3, 3, 2, padding="same", bias=bias),  # even kernel: asymmetric 'same' padding
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3, bias=bias),
    ).to(dtype)


def mlp_inputs(n=64, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 6, generator=g, dtype=DT)
    x = torch.randn(n, 6, generator=g, dtype=DT) @ mix + torch.linspace(-2, 3, 6, dtype=DT)
    return x.to(dtype)


def cnn_inputs(n=16, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(2, 2, generator=g, dtype=DT)
    x = torch.einsum("nchw,cd->ndhw", torch.randn(n, 2, 7, 7, generator=g, dtype=DT), mix)
    return (x + torch.tensor([1.5, -0.5], dtype=DT)[:, None, None]).to(dtype)


MODELS = {"mlp": (mlp, mlp_inputs), "cnn": (cnn, cnn_inputs)}


def whitened_modules(model):
    nnn = lib()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nnn.WhitenedLinear, nnn.WhitenedConv2d))]


def capture_inputs(model, x):
    """{name: the input tensor of every whitened layer} from one plain forward pass."""
    seen, handles = {}, []
    for name, m in whitened_modules(model):
        handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].detach().clone())))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def rows(layer, h):
    """The layer's input samples as a numpy [rows, in] array (conv: every position a row)."""
    nnn = lib()
    if isinstance(layer, nnn.WhitenedConv2d):
        h = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    return h.reshape(-1, h.shape[-1]).double().numpy()


def sgd_steps(model, x, steps, lr=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        y = torch.randint(0, 3, (x.shape[0],), generator=g)
        opt.zero_grad()
        TF.cross_entropy(model(x), y).backward()
        opt.step()
