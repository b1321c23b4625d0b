"""Small float64 models shared by the test files (through :mod:`helpers`): MLPs, CNNs with
every kind of convolution, and models with unusual structure (tied, shared, unused or
reordered layers, extra input dimensions, recurrent, attention, normalisation and custom
layers)."""

from __future__ import annotations

import torch
from torch import nn

DT = torch.float64


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


def registered_twice_net(seed=0):
    """One Linear module object at two places of a Sequential ("2" and "4"): its parameters
    are listed once (as "2.*") and used twice."""
    seeded(seed)
    inner = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), inner, nn.Tanh(), inner, nn.Linear(4, 3)).to(DT)
