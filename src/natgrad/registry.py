"""The optimizers ``natgrad train`` and ``natgrad compare`` know, with their per-task settings.

Adding one is one line, e.g. ``OPTIMIZERS["name"] = OptimizerSpec(make, lr_grid=(0.1, 0.3, 1.0))``.
An optimizer's defaults and learning-rate grid are the same on every task unless the task is in
its ``task_lr_grids``, (for natgrad's curvature optimizers) in :data:`TUNED` or (for PRONG) in
:data:`PRONG_TUNED`; everything
task-specific is in this file, so what was tuned is visible in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .tasks import Task

__all__ = ["OptimizerSpec", "OPTIMIZERS", "TUNED", "PRONG_TUNED", "register_optimizer", "get_optimizer"]


@dataclass(frozen=True)
class OptimizerSpec:
    """``make(model, task, lr, damping, train_inputs)`` (``None``: the optimizer's own default); ``curvature``
    optimizers train with ``opt.backward(loss, output)`` and take a damping; ``lr_grid`` is what
    ``compare`` tries, ``task_lr_grids[task name]`` replaces it on that task. The lr/damping
    actually used are read back from ``param_groups[0]``."""

    make: Callable[[nn.Module, Task, float | None, float | None, Tensor], torch.optim.Optimizer]
    lr_grid: tuple[float, ...]
    curvature: bool = False
    task_lr_grids: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def grid(self, task: Task) -> tuple[float, ...]:
        """The learning rates ``compare`` tries on ``task``."""
        return self.task_lr_grids.get(task.name, self.lr_grid)


def _autoencoder_curvature(optim) -> dict:
    """mnist-autoencoder (tuned on it, 50-s runs of seed 0, see docs/convergence.md): the deep
    sigmoid layers' Fisher blocks are ~1e-9 at PyTorch's initialisation, so any damping near the
    default 1e-3 (or the paper's λ=150, even adapted) swamps them and K-FAC sits on the ~205-nat
    plateau; λ=1e-6 does not. The Fisher-norm trust region is per image, and an image's loss is a
    sum over 784 pixels: 0.1 nats capped each step's predicted decrease at ~0.2 nats, 1 nat works
    (10 was worse). The quadratic model takes Martens & Grosse's τ₂ = 1/4 of each batch (63 images
    of 250, J·v replayed on them): every image carries 784 outputs, so the rows see the curvature
    well, and each step is ~15 % cheaper (lr 1, ``natgrad train`` with a 60-s budget, seeds 0/1/2:
    130 nats at the evaluation after 150/100/150 steps, 36/27/40 s, against 150/150/150 steps,
    46/46/47 s with whole batches)."""
    return {"damping": 1e-6, "step_policy": optim.StepPolicy(kl_clip=1.0, quadratic_fraction=0.25)}


# Per-task options of the curvature optimizers: ``TUNED[task][class name](natgrad.optim)`` returns
# keyword arguments (the damping default and option objects); the learning-rate grid stays the same.
TUNED: dict[str, dict[str, Callable[[object], dict]]] = {
    "mnist-autoencoder": {"KFAC": _autoencoder_curvature, "EKFAC": _autoencoder_curvature},
}

# The autoencoder's loss sums 784 pixels, so its gradients are ~784x a mean loss's: SGD (and
# PRONG's SGD) need a grid shifted down to be tuned at all; Adam and the curvature methods are
# invariant to that scale.
_AUTOENCODER_SGD_GRID = {"mnist-autoencoder": (3e-3, 1e-2, 3e-2)}
# PRONG+ and its control (batch normalisation after every linear map) on the autoencoder: batch
# normalisation makes the loss invariant to the scale of each layer's weights, and the measured
# best learning rates (seed 0, 300 steps) were 0.3-1 for PRONG+ (0.1: 130, 0.3: 117, 1: 111,
# 3: 119 nats) and 0.3 for SGD with batch normalisation (0.1: 125, 0.3: 119, 1: 119 nats).
_PRONG_PLUS_GRID = {"mnist-autoencoder": (0.1, 0.3, 1.0)}


def _natgrad(class_name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(model: nn.Module, task: Task, lr: float | None, damping: float | None, train_inputs: Tensor):
        import natgrad.optim as optim

        options = TUNED.get(task.name, {}).get(class_name, lambda _: {})(optim)
        if lr is not None:
            options["lr"] = lr
        if damping is not None:
            options["damping"] = damping
        return getattr(optim, class_name)(model, likelihood=task.likelihood, estimator="mc", **options)

    return make


def _autoencoder_prong() -> dict:
    """mnist-autoencoder: PRONG+ (batch normalisation after every whitened linear map), which
    the paper ran on this autoencoder next to plain PRONG; every, samples and eps keep their
    defaults (measured on seed 0, docs/convergence.md). Plain PRONG cannot be tuned here: at PyTorch's initialisation the
    deep sigmoid layers' inputs vary by 1e-6..1e-3, far below eps = 1e-2, so U ≈ eps^(-1/2) I and
    PRONG moves those layers like SGD at 1/eps = 100x the learning rate; within 20-30 steps
    their input variance grows by orders of magnitude (the whitened curvature of the last layer
    from 3e-8 to 1e2-1e4) and the loss blows up long before the next re-estimation (it does with
    every=10 too; eps=1e-4 blows up at step 14), while learning rates small enough not to
    diverge (1e-4, 3e-4) sit on the ~195-nat plateau. Batch normalisation keeps every layer's
    pre-activations at unit variance, so the sigmoid units' variance stays far above eps and the
    whitening stays valid between re-estimations."""
    return {"batchnorm": True}


# Per-task options of PRONG: ``PRONG_TUNED[task]()`` returns keyword arguments of :func:`_prong`
# (``batchnorm`` and PRONG's ``every``, ``samples``, ``eps``, ``momentum``).
PRONG_TUNED: dict[str, Callable[[], dict]] = {"mnist-autoencoder": _autoencoder_prong}


def _prong(model: nn.Module, task: Task, lr: float | None, damping: float | None, train_inputs: Tensor):
    """PRONG: the task's layers whitened in place (PRONG+, with batch normalisation after each
    whitened linear map, where :data:`PRONG_TUNED` says so), SGD with momentum 0.9 on (V, d),
    statistics from the training inputs (defaults every=100, samples=1000, eps=1e-2)."""
    import natgrad.nn
    import natgrad.optim as optim

    options = PRONG_TUNED.get(task.name, dict)()
    natgrad.nn.whiten(model, inplace=True, batchnorm=options.pop("batchnorm", False))
    base = torch.optim.SGD(model.parameters(), lr=lr or 0.1, momentum=0.9)
    return optim.PRONG(model, base, train_inputs, **options)


def _with_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.Linear`` replaced in place by ``Sequential(linear, BatchNorm1d)``
    (the architecture of PRONG+, without the whitening)."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear:
            norm = nn.BatchNorm1d(child.out_features, device=child.weight.device, dtype=child.weight.dtype)
            setattr(model, name, nn.Sequential(child, norm))
        else:
            _with_batchnorm(child)
    return model


def _sgd_bn(model: nn.Module, task: Task, lr: float | None, damping: float | None, train_inputs: Tensor):
    """The control of PRONG+: SGD with momentum 0.9 on the task's model with batch normalisation
    after every linear map (what PRONG+ adds besides the whitening), with PRONG+'s lr grid."""
    return torch.optim.SGD(_with_batchnorm(model).parameters(), lr=lr or 0.1, momentum=0.9)


def _sgd(model: nn.Module, task: Task, lr: float | None, damping: float | None, train_inputs: Tensor):
    return torch.optim.SGD(model.parameters(), lr=lr or 0.1, momentum=0.9)


def _adam(model: nn.Module, task: Task, lr: float | None, damping: float | None, train_inputs: Tensor):
    return torch.optim.Adam(model.parameters(), lr=lr or 3e-3)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(_sgd, (0.03, 0.1, 0.3), task_lr_grids=_AUTOENCODER_SGD_GRID),
    "adam": OptimizerSpec(_adam, (1e-3, 3e-3, 1e-2)),
    "kfac": OptimizerSpec(_natgrad("KFAC"), (0.1, 0.3, 1.0), curvature=True),
    "ekfac": OptimizerSpec(_natgrad("EKFAC"), (0.1, 0.3, 1.0), curvature=True),
    "ngd": OptimizerSpec(_natgrad("NGD"), (0.1, 0.3, 1.0), curvature=True),
    "prong": OptimizerSpec(_prong, (0.03, 0.1, 0.3), task_lr_grids=_PRONG_PLUS_GRID),
    "sgd-bn": OptimizerSpec(_sgd_bn, (0.03, 0.1, 0.3), task_lr_grids=_PRONG_PLUS_GRID),
}


def register_optimizer(name: str, spec: OptimizerSpec) -> None:
    OPTIMIZERS[name] = spec


def get_optimizer(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known optimizers: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]
