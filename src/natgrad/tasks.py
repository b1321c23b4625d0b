"""Built-in training tasks: data, model, likelihood, loss, metric and a fixed target loss.

Every task's **target training loss is fixed in advance** (not tuned after seeing results):
it is the full-training-set loss (mean over examples of the per-example negative
log-likelihood) that ``natgrad compare`` measures steps and seconds to.

================== ===================================================== ======= ==========
task               model                                                 batch   target
================== ===================================================== ======= ==========
digits-mlp         sklearn 8x8 digits, MLP 64-32-10 tanh (2,410 params)   128    CE 0.05
mnist1d-mlp        MNIST-1D, residual MLP 40-100-(100 res)-10 ReLU        100    CE 0.1
mnist1d-cnn        MNIST-1D, 3 convolutions (25 ch) + Linear(125, 10)     100    CE 0.1
mnist-mlp          MNIST, MLP 784-256-128-10 ReLU                         128    CE 0.05
mnist-cnn          MNIST, conv5(16)-pool-conv5(32)-pool-Linear(512, 10)   128    CE 0.05
mnist-autoencoder  MNIST, 784-1000-500-250-30-250-500-1000-784 sigmoid    250    NLL 130
================== ===================================================== ======= ==========

Notes on the choices:

* ``digits-mlp`` (default): 1,437 train / 360 test (stratified split of scikit-learn's digits,
  :func:`natgrad.datasets.load_digits`). Target CE 0.05 is part of the contract.
* ``mnist1d-*``: MNIST-1D of Greydanus (2020), generated offline by the ``mnist1d`` package
  (4,000 train / 1,000 test signals of 40 points). Models as in the reference notebook: the MLP
  is 40→100 ReLU, then a residual ReLU block h + relu(W h + b) at width 100, then →10 (15,210
  parameters); target CE 0.1 is PAPERS.md goal T4. The CNN has three convolutions with 25
  channels (kernel 5 stride 2 padding 1, then kernel 3 stride 2 padding 1 twice, ReLU) and
  Linear(125→10) (5,210 parameters). natgrad's K-FAC handles ``nn.Conv2d`` but not
  ``nn.Conv1d``, so the 1-D convolutions are ``nn.Conv2d`` with kernel ``(1, k)``, stride
  ``(1, 2)`` and padding ``(0, 1)`` on the input viewed as ``[N, 1, 1, 40]`` — the same
  function and parameter count as the Conv1d model. Its target is also CE 0.1 (the CNN
  generalises far better than the MLP but fits the training set more slowly).
* ``mnist-*``: MNIST IDX files from ``mnist_dir`` (default: ``shared/data/mnist`` next to the
  repository root, if present). With the official training files present the 60,000 / 10,000
  split is used; with only the 10,000 test images (``t10k-*``) they are split once, by a fixed
  permutation (seed 0), into 8,000 train / 2,000 test. Classifier inputs are standardised
  (mean 0.1307, std 0.3081); the autoencoder sees pixels in [0, 1].
* ``mnist-autoencoder`` is the deep autoencoder of Hinton & Salakhutdinov used in the K-FAC
  paper: logistic (sigmoid) hidden units except the linear 30-unit code, Bernoulli output
  (logits) on the pixels; PyTorch's default initialisation (not the paper's sparse one). Loss:
  summed per-pixel binary cross-entropy, averaged over images (nats per image). Its target,
  130 nats per image, is well above the data's entropy floor (45.5 nats on the 8k split: the
  pixel targets are soft) and below the ~205-nat plateau of predicting roughly the mean image;
  measured on 8k images, one core: Adam (lr 3e-3, batch 250) reaches it in ~1,000 steps / ~55 s
  and 110 nats after 150 s, so it is reachable within the task's 120-s compare budget. Its metric
  is the reconstruction error (mean over images of the summed squared pixel error, as in Hinton
  & Salakhutdinov); it has no accuracy (``null``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Task", "Data", "TASKS", "DEFAULT_TASK", "get_task", "default_mnist_dir", "task_names"]

DEFAULT_TASK = "digits-mlp"
MNIST_TRAIN_SIZE = 8000  # with only the 10k test split present: 8k train / 2k test


@dataclass(frozen=True)
class Data:
    """Tensors of one task: inputs and targets (class indices, or the inputs for the autoencoder)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    note: str = ""


@dataclass(frozen=True)
class Task:
    """A built-in task. ``loss(out, y)`` is the mean over examples of the per-example NLL."""

    name: str
    description: str
    load_fn: Callable[[Path | None], Data]
    model_fn: Callable[[], nn.Module]
    likelihood: str  # "categorical" or "bernoulli", as natgrad.optim expects
    batch_size: int
    target_loss: float
    target_note: str
    eval_every: int  # default: full train/test evaluation every this many steps
    default_epochs: int
    compare_budget: float  # default seconds of training per run in ``natgrad compare``
    needs_mnist: bool = False

    @property
    def classifier(self) -> bool:
        return self.likelihood == "categorical"

    def load(self, mnist_dir: str | Path | None = None) -> Data:
        return self.load_fn(mnist_dir)

    def make_model(self) -> nn.Module:
        return self.model_fn()

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.classifier:
            return F.cross_entropy(out, y)
        return F.binary_cross_entropy_with_logits(out, y, reduction="none").sum(1).mean()

    def metric_sums(self, out: Tensor, y: Tensor) -> dict[str, float]:
        """Sums over the examples of ``out`` (divided by N by the caller)."""
        if self.classifier:
            return {"accuracy": float((out.detach().argmax(1) == y).sum())}
        return {"reconstruction_error": float((torch.sigmoid(out.detach()) - y).pow(2).sum())}


# --------------------------------------------------------------------------- models

class ResidualMLP(nn.Module):
    """40→100 ReLU, h + relu(W h + b) at width 100, →10 (the MNIST-1D notebook's MLP)."""

    def __init__(self, inputs: int = 40, width: int = 100, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        h = h + torch.relu(self.fc2(h))
        return self.fc3(h)


class ConvNet1D(nn.Module):
    """The MNIST-1D notebook's CNN with ``nn.Conv2d`` kernels ``(1, k)`` (K-FAC has no Conv1d)."""

    def __init__(self, length: int = 40, channels: int = 25, classes: int = 10) -> None:
        super().__init__()
        self.length = length
        self.conv1 = nn.Conv2d(1, channels, (1, 5), stride=(1, 2), padding=(0, 1))
        self.conv2 = nn.Conv2d(channels, channels, (1, 3), stride=(1, 2), padding=(0, 1))
        self.conv3 = nn.Conv2d(channels, channels, (1, 3), stride=(1, 2), padding=(0, 1))
        out_length = length
        for k in (5, 3, 3):
            out_length = (out_length + 2 - k) // 2 + 1
        self.fc = nn.Linear(channels * out_length, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], 1, 1, self.length)
        h = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.fc(h.flatten(1))


def _mlp(widths: list[int], activation: type[nn.Module], linear_at: frozenset[int] = frozenset()) -> nn.Sequential:
    """Linear layers between ``widths``; ``activation`` after each hidden layer except those in
    ``linear_at`` (indices of hidden layers that stay linear)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 and i not in linear_at:
            layers.append(activation())
    return nn.Sequential(*layers)


def mnist_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 10),
    )


AUTOENCODER_WIDTHS = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]


def mnist_autoencoder() -> nn.Sequential:
    return _mlp(AUTOENCODER_WIDTHS, nn.Sigmoid, linear_at=frozenset({3}))  # layer 3: the 30-unit code


# --------------------------------------------------------------------------- data

def default_mnist_dir() -> Path | None:
    """``shared/data/mnist`` next to the repository root (``<root>/../shared/data/mnist``), if it exists."""
    root = Path(__file__).resolve().parents[2]
    candidate = root.parent / "shared" / "data" / "mnist"
    return candidate if candidate.is_dir() else None


def _digits(_mnist_dir) -> Data:
    from .datasets import load_digits

    return Data(*load_digits(), note="sklearn digits: 1437 train / 360 test (stratified, seed 0)")


def _mnist1d(_mnist_dir) -> Data:
    from .datasets import load_mnist1d

    return Data(*load_mnist1d(), note="MNIST-1D (mnist1d package, default args): 4000 train / 1000 test")


@functools.lru_cache(maxsize=4)
def _mnist_cached(folder: str, flatten: bool, normalize: bool) -> Data:
    from .datasets import load_mnist

    path = Path(folder)
    kwargs = {"flatten": flatten, "normalize": normalize}
    if (path / "train-images-idx3-ubyte.gz").is_file() and (path / "train-labels-idx1-ubyte.gz").is_file():
        x_tr, y_tr = load_mnist(path, "train", **kwargs)
        x_te, y_te = load_mnist(path, "test", **kwargs)
        return Data(x_tr, y_tr, x_te, y_te, note="MNIST official split: 60000 train / 10000 test")
    x, y = load_mnist(path, "test", **kwargs)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    tr, te = perm[:MNIST_TRAIN_SIZE], perm[MNIST_TRAIN_SIZE:]
    return Data(x[tr], y[tr], x[te], y[te],
                note=f"MNIST t10k only: {len(tr)} train / {len(te)} test (fixed permutation, seed 0)")


def _mnist_loader(flatten: bool, normalize: bool, autoencoder: bool = False):
    def load(mnist_dir) -> Data:
        folder = Path(mnist_dir).expanduser() if mnist_dir is not None else default_mnist_dir()
        if folder is None:
            raise FileNotFoundError(
                "the MNIST tasks need the MNIST IDX files: pass --mnist-dir DIR (mnist_dir=...), "
                "a folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
                "(and optionally the train-* files)")
        data = _mnist_cached(str(folder.resolve()), flatten, normalize)
        if autoencoder:
            return Data(data.x_train, data.x_train, data.x_test, data.x_test, note=data.note)
        return data

    return load


# --------------------------------------------------------------------------- registry

def _task(**kwargs) -> Task:
    return Task(**kwargs)


TASKS: dict[str, Task] = {
    "digits-mlp": _task(
        name="digits-mlp", description="sklearn 8x8 digits, MLP 64-32-10 tanh",
        load_fn=_digits, model_fn=lambda: _mlp([64, 32, 10], nn.Tanh), likelihood="categorical",
        batch_size=128, target_loss=0.05, target_note="mean cross-entropy 0.05 on the training split (contract)",
        eval_every=5, default_epochs=20, compare_budget=3.0),
    "mnist1d-mlp": _task(
        name="mnist1d-mlp", description="MNIST-1D, residual MLP 40-100-100(res)-10 ReLU",
        load_fn=_mnist1d, model_fn=ResidualMLP, likelihood="categorical",
        batch_size=100, target_loss=0.1, target_note="mean cross-entropy 0.1 on the 4000 training signals (PAPERS.md T4)",
        eval_every=25, default_epochs=25, compare_budget=10.0),
    "mnist1d-cnn": _task(
        name="mnist1d-cnn", description="MNIST-1D, CNN 3x conv(1,k) 25ch (as Conv2d) + Linear(125,10)",
        load_fn=_mnist1d, model_fn=ConvNet1D, likelihood="categorical",
        batch_size=100, target_loss=0.1, target_note="mean cross-entropy 0.1 on the 4000 training signals",
        eval_every=25, default_epochs=25, compare_budget=10.0),
    "mnist-mlp": _task(
        name="mnist-mlp", description="MNIST, MLP 784-256-128-10 ReLU",
        load_fn=_mnist_loader(flatten=True, normalize=True), model_fn=lambda: _mlp([784, 256, 128, 10], nn.ReLU),
        likelihood="categorical", batch_size=128, target_loss=0.05,
        target_note="mean cross-entropy 0.05 on the training split", eval_every=50, default_epochs=5, compare_budget=30.0,
        needs_mnist=True),
    "mnist-cnn": _task(
        name="mnist-cnn", description="MNIST, CNN conv5(16)-pool-conv5(32)-pool-Linear(512,10)",
        load_fn=_mnist_loader(flatten=False, normalize=True), model_fn=mnist_cnn,
        likelihood="categorical", batch_size=128, target_loss=0.05,
        target_note="mean cross-entropy 0.05 on the training split", eval_every=50, default_epochs=5, compare_budget=30.0,
        needs_mnist=True),
    "mnist-autoencoder": _task(
        name="mnist-autoencoder", description="MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784 sigmoid",
        load_fn=_mnist_loader(flatten=True, normalize=False, autoencoder=True), model_fn=mnist_autoencoder,
        likelihood="bernoulli", batch_size=250, target_loss=130.0,
        target_note="reconstruction NLL 130 nats per image (summed pixel BCE, mean over images) on the training split",
        eval_every=50, default_epochs=5, compare_budget=120.0, needs_mnist=True),
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str | Task) -> Task:
    """The task called ``name``; ValueError listing the known tasks otherwise."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
