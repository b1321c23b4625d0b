"""The workloads of ``fisher_bench.py``: the models and data each case runs on (MNIST MLP,
MNIST CNN in several batches, sklearn digits MLP) at full or quick sizes, and the plain
forward + backward every figure is divided by."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as Fn

import _common as C

MODEL_SEED = 0


# --------------------------------------------------------------------------------------
# Workloads (PEERS.md sections 1, 2, 4 / 6 / 3)
# --------------------------------------------------------------------------------------
@dataclass
class Sizes:
    mlp_examples: int
    cnn_batches: int
    cnn_batch_size: int
    digits_examples: int | None  # None = all 1,797


FULL = Sizes(mlp_examples=1024, cnn_batches=10, cnn_batch_size=1000, digits_examples=None)
QUICK = Sizes(mlp_examples=256, cnn_batches=2, cnn_batch_size=200, digits_examples=512)


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    batches: list  # [(inputs, targets)]: what the baseline loops over
    data_source: str

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def n_examples(self) -> int:
        return sum(len(y) for _, y in self.batches)

    def baseline(self) -> None:
        """One plain forward + backward over all batches: mean cross-entropy on the true
        labels, gradients into ``.grad`` (zeroed first)."""
        self.model.zero_grad(set_to_none=True)
        for x, y in self.batches:
            Fn.cross_entropy(self.model(x), y).backward()

    def natgrad_data(self, mode: str):
        """The data argument for ``natgrad.fisher``: the single batch as an
        ``(inputs, targets)`` pair, or for several batches a DataLoader over them
        (``loader``), one concatenated pair (``tensors``), or the list of batches that the
        caller loops over (``loop``)."""
        if len(self.batches) == 1:
            return self.batches[0]
        if mode == "loader":
            from torch.utils.data import DataLoader

            return DataLoader(self.batches, batch_size=None)  # pre-made batches, no collation
        if mode == "tensors":
            return (torch.cat([x for x, _ in self.batches]),
                    torch.cat([y for _, y in self.batches]))
        if mode == "loop":
            return self.batches
        raise ValueError(f"unknown data mode {mode!r}")


def _mnist(args, n: int, flatten: bool):
    if args.synthetic:
        shape = (784,) if flatten else (1, 28, 28)
        return (*C.synthetic_classification(n, shape, 10, seed=0), "synthetic")
    x, y = C.load_mnist_test(args.mnist_dir, n=n, flatten=flatten)
    if len(y) < n:
        raise ValueError(f"MNIST test set in {args.mnist_dir} has {len(y)} < {n} examples")
    return x, y, "mnist"


def build_mlp(args, sizes: Sizes) -> Workload:
    x, y, src = _mnist(args, sizes.mlp_examples, flatten=True)
    torch.manual_seed(MODEL_SEED)
    model = nn.Sequential(nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    return Workload("mlp", f"MLP 784-512-256-10 (tanh, relu), first {len(y)} MNIST test "
                    "images as one batch", model, [(x, y)], src)


def build_cnn(args, sizes: Sizes) -> Workload:
    n = sizes.cnn_batches * sizes.cnn_batch_size
    x, y, src = _mnist(args, n, flatten=False)
    torch.manual_seed(MODEL_SEED)
    model = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(512, 10))
    b = sizes.cnn_batch_size
    batches = [(x[i:i + b].contiguous(), y[i:i + b].contiguous()) for i in range(0, n, b)]
    return Workload("cnn", f"CNN conv16-conv32-fc, {n} MNIST test images in "
                    f"{sizes.cnn_batches} batches of {sizes.cnn_batch_size}", model, batches, src)


def build_digits(args, sizes: Sizes) -> Workload:
    x, y = C.load_digits(sizes.digits_examples)
    torch.manual_seed(MODEL_SEED)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    return Workload("digits", f"MLP 64-32-10 (tanh), {len(y)} sklearn digits as one batch",
                    model, [(x, y)], "sklearn-digits")


BUILDERS: dict[str, Callable[..., Workload]] = {
    "mlp": build_mlp, "cnn": build_cnn, "digits": build_digits}
