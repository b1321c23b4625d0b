"""The optimizers ``natgrad train`` and ``natgrad compare`` know, with their per-task settings.

Adding one is one line, e.g. ``OPTIMIZERS["name"] = OptimizerSpec(make, lr_grid=(0.1, 0.3, 1.0))``.
An optimizer's defaults and learning-rate grid are the same on every task unless the task is in
its ``task_lr_grids`` or (for natgrad's curvature optimizers) in :data:`TUNED`; everything
task-specific is in this file, so what was tuned is visible in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .tasks import Task

__all__ = ["OptimizerSpec", "OPTIMIZERS", "TUNED", "register_optimizer", "get_optimizer"]


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
    (10 was worse)."""
    return {"damping": 1e-6, "step_policy": optim.StepPolicy(kl_clip=1.0)}


# Per-task options of the curvature optimizers: ``TUNED[task][class name](natgrad.optim)`` returns
# keyword arguments (the damping default and option objects); the learning-rate grid stays the same.
TUNED: dict[str, dict[str, Callable[[object], dict]]] = {
    "mnist-autoencoder": {"KFAC": _autoencoder_curvature, "EKFAC": _autoencoder_curvature},
}

# The autoencoder's loss sums 784 pixels, so its gradients are ~784x a mean loss's: SGD (and
# PRONG's SGD) need a grid shifted down to be tuned at all; Adam and the curvature methods are
# invariant to that scale.
_AUTOENCODER_SGD_GRID = {"mnist-autoencoder": (3e-3, 1e-2, 3e-2)}


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


def _prong(model: nn.Module, task: Task, lr: float | None, damping: float | None, train_inputs: Tensor):
    """PRONG: the task's layers whitened in place, SGD with momentum 0.9 on (V, d), statistics
    from the training inputs (defaults every=100, samples=1000, eps=1e-2)."""
    import natgrad.nn
    import natgrad.optim as optim

    natgrad.nn.whiten(model, inplace=True)
    base = torch.optim.SGD(model.parameters(), lr=lr or 0.1, momentum=0.9)
    return optim.PRONG(model, base, train_inputs)


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
    "prong": OptimizerSpec(_prong, (0.03, 0.1, 0.3), task_lr_grids=_AUTOENCODER_SGD_GRID),
}


def register_optimizer(name: str, spec: OptimizerSpec) -> None:
    OPTIMIZERS[name] = spec


def get_optimizer(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known optimizers: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]
