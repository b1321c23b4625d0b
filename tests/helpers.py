"""Small float64 models, data and comparison helpers shared by the test files."""

from __future__ import annotations

import torch
from torch import nn

import reference as ref

DT = torch.float64

STRUCTURES = ("dense", "block_diagonal", "diagonal", "kron_sum", "kfac", "ekfac", "implicit")
GENERIC_STRUCTURES = ("dense", "block_diagonal", "diagonal", "implicit")
KRON_STRUCTURES = ("kron_sum", "kfac", "ekfac")
ESTIMATORS = ("exact", "mc", "empirical")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")

# float64 comparisons of two computations of the same sums: rounding is ~1e-16 per operation,
# sums have < 10^3 terms and the eigendecompositions in EKFAC lose at most eps/gap; 1e-9
# relative (to the largest entry) leaves many orders of magnitude of head-room and still
# catches any wrong term, factor or permutation (those are O(1) relative).
RTOL = 1e-9
# Relative residual of the library's conjugate gradient in float64 (natgrad.linalg
# default_tolerance). Structures solved directly beat it by orders of magnitude.
CG_TOL = 1e-10


def lib():
    import natgrad

    return natgrad


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
def seeded(seed):
    torch.manual_seed(seed)


def mlp(seed=0, bias=True, sizes=(5, 4, 3)):
    seeded(seed)
    layers = []
    for i in range(len(sizes) - 1):
        if i:
            layers.append(nn.Tanh())
        b = bias if isinstance(bias, bool) else bias[i]
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=b))
    return nn.Sequential(*layers).to(DT)


def cnn(seed=0):
    seeded(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(DT)


def cnn_exotic(seed=0):
    """Conv2d with stride, padding, dilation, groups and no bias; rectangular kernel."""
    seeded(seed)
    return nn.Sequential(
        nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        nn.Tanh(),
        nn.Conv2d(4, 2, (2, 3), stride=(1, 2), padding=(1, 0), groups=2),
        nn.Flatten(),
        nn.Linear(2 * 5 * 2, 3),
    ).to(DT)


def cnn_padmodes(seed=0):
    """padding='same' with an even kernel (asymmetric), reflect and circular padding modes."""
    seeded(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv2d(3, 2, 3, stride=2, padding=1, padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).to(DT)


def cnn_inplace(seed=0, inplace=True):
    """The CNN with ReLU(inplace=True) right after the first convolution."""
    model = cnn(seed)
    model[1] = nn.ReLU(inplace=inplace)
    return model


class Token4D(nn.Module):
    """Linear on inputs with two extra leading dims [N, 2, 3, in]."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(2 * 3 * 4, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)).flatten(1))


class Unused(nn.Module):
    """Owns a Linear that the forward never calls."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.unused = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Tied(nn.Module):
    """One Parameter registered in two modules (tied weights): l2.weight is l1.weight."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.l2.weight = self.l1.weight

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.l2(torch.tanh(self.l1(h))))
        return self.out(h)


def tied_net(seed=0):
    seeded(seed)
    return Tied().to(DT)


class RecurrentNet(nn.Module):
    """nn.GRU / nn.LSTM / nn.RNN over [N, 5, 3], last step -> Linear."""

    input_shape = (5, 3)

    def __init__(self, kind):
        super().__init__()
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind](3, 4, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


class AttentionNet(nn.Module):
    """nn.MultiheadAttention (the fast path: need_weights=False) over [N, 5, 4]."""

    input_shape = (5, 4)

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.att(x, x, x, need_weights=False)[0].mean(1))


def recurrent_net(seed=0, kind="gru"):
    seeded(seed)
    return RecurrentNet(kind).to(DT)


def attention_net(seed=0):
    seeded(seed)
    return AttentionNet().to(DT)


def conv1d_net(seed=0):
    seeded(seed)
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3)).to(DT)
    net.input_shape = (2, 5)
    return net


def groupnorm_net(seed=0):
    seeded(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(36, 3)).to(DT)


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward is not Linear's: a = (W/2) h + b."""

    def forward(self, x):
        return nn.functional.linear(x, 0.5 * self.weight, self.bias)


def linear_subclass_net(seed=0):
    seeded(seed)
    return nn.Sequential(ScaledLinear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def token4d(seed=0):
    seeded(seed)
    return Token4D().to(DT)


def unused_net(seed=0):
    seeded(seed)
    return Unused().to(DT)


class TokenMLP(nn.Module):
    """Linear on [N, T, in]; ``pool`` -> logits [N, C], else outputs [N, T, out]."""

    def __init__(self, pool=True):
        super().__init__()
        self.pool = pool
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 3 if pool else 2)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if self.pool:
            h = h.mean(1)
        return self.l2(h)


class Reversed(nn.Module):
    """Registration order (b, then a) differs from the call order (a, then b)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(4, 3)
        self.a = nn.Linear(5, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Shared(nn.Module):
    """A Linear called twice in one forward (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.lin = nn.Linear(3, 3)

    def forward(self, idx):
        return self.lin(torch.tanh(self.emb(idx)).mean(1))


class Scale(nn.Module):
    """A custom module with its own parameter (no adapter)."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=DT))

    def forward(self, x):
        return x * self.s


def layernorm_net(seed=0):
    seeded(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def batchnorm_net(seed=0, train=False):
    seeded(seed)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(4, dtype=DT) * 0.3)
        bn.running_var.copy_(torch.rand(4, dtype=DT) + 0.5)
        bn.weight.copy_(torch.rand(4, dtype=DT) + 0.5)
        bn.bias.copy_(torch.randn(4, dtype=DT) * 0.2)
    net.train(train)
    return net


def custom_net(seed=0):
    seeded(seed)
    return nn.Sequential(nn.Linear(5, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def embed_net(seed=0):
    seeded(seed)
    return EmbedNet().to(DT)


def token_mlp(seed=0, pool=True):
    seeded(seed)
    return TokenMLP(pool).to(DT)


def reversed_net(seed=0):
    seeded(seed)
    return Reversed().to(DT)


def shared_net(seed=0):
    seeded(seed)
    return Shared().to(DT)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def inputs_for(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "input_shape"):
        return torch.randn(n, *model.input_shape, generator=g, dtype=DT)
    if isinstance(model, EmbedNet):
        return torch.randint(0, 6, (n, 4), generator=g)
    if isinstance(model, TokenMLP):
        return torch.randn(n, 3, 3, generator=g, dtype=DT)
    if isinstance(model, Token4D):
        return torch.randn(n, 2, 3, 3, generator=g, dtype=DT)
    if isinstance(model, (Reversed, Unused, Tied)):
        return torch.randn(n, 5, generator=g, dtype=DT)
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    if isinstance(first, nn.Conv2d):
        if first.in_channels == 2:
            return torch.randn(n, 2, 5, 5, generator=g, dtype=DT)
        return torch.randn(n, 4, 7, 9, generator=g, dtype=DT)
    return torch.randn(n, first.in_features, generator=g, dtype=DT)


def targets_for(model, x, likelihood, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = model(x)
    if likelihood == "categorical":
        return torch.randint(0, out.shape[1], (x.shape[0],), generator=g)
    if likelihood == "gaussian":
        # noise larger than σ = 1, so the empirical Fisher is far from the exact one
        return out + 2.0 * torch.randn(out.shape, generator=g, dtype=DT)
    if likelihood == "bernoulli":
        # soft targets in [0, 1], with some exact 0 and 1
        y = torch.rand(out.shape, generator=g, dtype=DT)
        y[0] = (y[0] > 0.5).to(DT)
        return y
    raise ValueError(likelihood)


def make_data(model, likelihood, n, seed=1):
    x = inputs_for(model, n, seed)
    return x, targets_for(model, x, likelihood, seed + 1)


def lik_arg(likelihood, variance=1.0):
    """What is passed as ``likelihood=``: the name, or an object for a non-unit variance."""
    if likelihood == "gaussian" and variance != 1.0:
        return lib().Gaussian(variance=variance)
    return likelihood


# --------------------------------------------------------------------------------------
# expected matrices from the reference
# --------------------------------------------------------------------------------------
def expected_matrix(model, x, y, likelihood, estimator, structure, variance=1.0):
    if structure == "kfac":
        factors = ref.kfac_factors(model, x, y, likelihood, estimator, variance)
        return ref.kfac_dense(model, factors)
    if structure == "ekfac":
        return ref.ekfac_dense(model, x, y, likelihood, estimator, variance)[0]
    F = ref.fisher_dense(model, x, y, likelihood, estimator, variance)
    return project(F, model, structure)


def project(F, model, structure):
    if structure in ("dense", "implicit"):
        return F
    if structure in ("block_diagonal", "kron_sum"):
        return ref.block_diagonal(F, model)
    if structure == "diagonal":
        return torch.diag(torch.diagonal(F))
    raise ValueError(structure)


# --------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------
def rel_err(actual, expected):
    """max |a - e| / max |e| (max |e| floored at the tiniest positive float)."""
    actual = torch.as_tensor(actual, dtype=DT)
    expected = torch.as_tensor(expected, dtype=DT)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(torch.finfo(DT).tiny)
    return float((actual - expected).abs().max() / scale)


def assert_rel_close(actual, expected, rtol=RTOL, what=""):
    err = rel_err(actual, expected)
    if not err <= rtol:
        a = torch.as_tensor(actual, dtype=DT)
        e = torch.as_tensor(expected, dtype=DT)
        diff = (a - e).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{what}: relative max error {err:.3e} > {rtol:.0e}; worst entry {idx}: "
            f"actual {float(a[idx]):.10g} expected {float(e[idx]):.10g}; "
            f"||actual||_F={float(a.norm()):.6g} ||expected||_F={float(e.norm()):.6g}"
        )


# --------------------------------------------------------------------------------------
# model snapshot (for "the model is unchanged" checks)
# --------------------------------------------------------------------------------------
def _hook_dicts(m):
    names = ["_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
             "_state_dict_hooks", "_load_state_dict_pre_hooks"]
    return {n: len(getattr(m, n, {}) or {}) for n in names}


def _global_hooks():
    import torch.nn.modules.module as mm

    names = ["_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks"]
    return {n: len(getattr(mm, n, {}) or {}) for n in names}


def snapshot(model):
    return dict(
        hooks={name: _hook_dicts(m) for name, m in model.named_modules()},
        tensor_hooks={name: (len(getattr(p, "_backward_hooks", None) or {}),
                             len(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
                      for name, p in model.named_parameters()},
        global_hooks=_global_hooks(),
        training={name: m.training for name, m in model.named_modules()},
        requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        params={name: p.detach().clone() for name, p in model.named_parameters()},
        grads={name: (None if p.grad is None else p.grad.detach().clone())
               for name, p in model.named_parameters()},
        buffers={name: b.detach().clone() for name, b in model.named_buffers()},
        grad_enabled=torch.is_grad_enabled(),
        default_dtype=torch.get_default_dtype(),
    )


def assert_unchanged(model, snap):
    now = snapshot(model)
    for key in ("hooks", "tensor_hooks", "global_hooks", "training", "requires_grad",
                "grad_enabled", "default_dtype"):
        assert now[key] == snap[key], f"model {key} changed: before {snap[key]} after {now[key]}"
    for key in ("params", "buffers"):
        assert now[key].keys() == snap[key].keys()
        for name in snap[key]:
            assert torch.equal(now[key][name], snap[key][name]), f"{key[:-1]} {name} changed"
    for name, before in snap["grads"].items():
        after = now["grads"][name]
        if before is None:
            assert after is None, f".grad of {name} was None, is now set"
        else:
            assert after is not None and torch.equal(after, before), f".grad of {name} changed"
