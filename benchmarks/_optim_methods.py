"""What ``optim_bench.py`` measures: the optimizers (``Method``: K-FAC, EKFAC and two K-FAC
variants next to SGD), the MLP they train, the ``Trainer`` that steps one optimizer through
the batches, and the FLOP floor of a step (see ``optim_bench.py``'s docstring)."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as Fn

MODEL_SEED = 0
INVERSE_EVERY = 10
SGD_LR, SGD_MOMENTUM = 0.01, 0.9
LAYERS = [(784, 512), (512, 256), (256, 10)]  # (in, out) of the Linear layers


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    description: str
    kind: str  # sgd | kfac | ekfac
    stat_every: int = 1
    stat_fraction: float = 1.0
    stat_min_examples: int = 32  # natgrad's Schedule default
    rescale: str = "quadratic"
    quadratic_fraction: float = 1.0  # StepPolicy's τ₂ (natgrad's default: the whole batch)
    target: float | None = None  # on the ratio to SGD, at batch 256 only
    peer: tuple[str, float] | None = None  # at batch 256 only (PEERS.md §5, amortised)
    floor_target: float | None = None  # on vs_floor = ratio / floor_ratio
    vs_kfac_target: float | None = None  # on this step / K-FAC's step


METHODS = [
    Method("kfac", "KFAC(likelihood='categorical') (defaults: Schedule(stat_fraction=1/8, inverse_every=10))",
           "kfac", stat_fraction=1 / 8, target=3.0, peer=("kfac-pytorch", 5.0), floor_target=1.25),
    Method("ekfac", "EKFAC(likelihood='categorical', schedule=Schedule(inverse_every=10))",
           "ekfac", vs_kfac_target=1.3),
    Method("kfac-klclip", "KFAC(..., step_policy=StepPolicy(rescale='kl_clip'))", "kfac",
           stat_fraction=1 / 8, rescale="kl_clip"),
    Method("kfac-stat10", "KFAC(..., schedule=Schedule(stat_every=10, stat_fraction=1/8, inverse_every=10))",
           "kfac", stat_every=10, stat_fraction=1 / 8),
    Method("kfac-tau1", "KFAC(..., schedule=Schedule(inverse_every=10)) (statistics of whole batches)",
           "kfac"),
    Method("kfac-tau2", "KFAC(..., step_policy=StepPolicy(quadratic_fraction=1/4)) (quadratic model on "
           "max(N/4, 32) rows, J·v replayed)", "kfac", stat_fraction=1 / 8, quadratic_fraction=1 / 4),
]
METHODS_BY_NAME = {m.name: m for m in METHODS}


def build_model() -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


class Trainer:
    """One optimizer on its own copy of the model, stepping through the cycled batches.
    ``period(k)`` runs ``k`` inverse periods; per-step wall times are kept by phase
    (step index modulo the inverse period) while ``record`` is on."""

    def __init__(self, method: Method | None, base: nn.Module, batches: list, natgrad: Any):
        self.method = method
        self.model = copy.deepcopy(base)
        self.batches = batches
        self.i = 0
        self.record = False
        self.step_times: dict[int, list[float]] = {}
        self.last_loss = float("nan")
        self.steps = 0
        if method is None:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
            self._step = self._sgd_step
        else:
            o = natgrad.optim
            cls = {"kfac": o.KFAC, "ekfac": o.EKFAC}[method.kind]
            self.opt = cls(self.model, likelihood="categorical",
                           schedule=o.Schedule(stat_every=method.stat_every,
                                               stat_fraction=method.stat_fraction,
                                               stat_min_examples=method.stat_min_examples,
                                               inverse_every=INVERSE_EVERY),
                           step_policy=o.StepPolicy(rescale=method.rescale,
                                                    quadratic_fraction=method.quadratic_fraction))
            self._step = self._natgrad_step

    def _next(self):
        x, y = self.batches[self.i]
        self.i = (self.i + 1) % len(self.batches)
        return x, y

    def _sgd_step(self) -> torch.Tensor:
        x, y = self._next()
        self.opt.zero_grad(set_to_none=True)
        loss = Fn.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss

    def _natgrad_step(self) -> torch.Tensor:
        x, y = self._next()
        self.opt.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = Fn.cross_entropy(out, y)
        self.opt.backward(loss, out)
        self.opt.step()
        return loss

    def period(self, k: int = 1) -> None:
        for _ in range(k * INVERSE_EVERY):
            phase = self.steps % INVERSE_EVERY
            t0 = time.perf_counter()
            loss = self._step()
            dt = time.perf_counter() - t0
            self.steps += 1
            if self.record:
                self.step_times.setdefault(phase, []).append(dt)
            self.last_loss = loss.item()


# --------------------------------------------------------------------------------------
# FLOP floor
# --------------------------------------------------------------------------------------
def flops(method: Method, n: int) -> dict:
    """FLOPs (2 x multiply-adds) per step, amortised, for batch ``n`` (module docstring)."""
    fwd_bwd = precond = stats = inverse = mc_backprop = quad = factored_saving = 0.0
    # the examples that enter the statistics
    rows = min(n, max(math.ceil(n * method.stat_fraction), method.stat_min_examples))
    # EKFAC's projection reuses the scale statistics' āQ_A when those cover every row of every step
    inputs_known = method.kind == "ekfac" and method.stat_every == 1 and method.stat_fraction == 1
    # the quadratic model's two J·v: a double backward through the batch's graph, ~1 forward of
    # its n rows each, or on S rows replayed under torch.func: the rows' forward + 2 per direction
    quad_rows = min(n, max(math.ceil(n * method.quadratic_fraction), 32))
    quad_passes = 2 * n if quad_rows == n else 5 * quad_rows
    for i, o in LAYERS:
        d = i + 1
        fwd_bwd += 3 * n * i * o
        mc_backprop += n * i * o if i != LAYERS[0][0] else 0  # input grads of the extra backward
        quad += quad_passes * i * o
        # K-FAC uses (G⁻¹gᵀ)(āA⁻¹), EKFAC (gQ_G)ᵀ(āQ_A) for its projection, where that is cheaper
        factored = n * (o * o + o * d + (0 if inputs_known else d * d))
        factored_saving += max(0.0, o * o * d + o * d * d - factored)
        if method.kind == "kfac":
            precond += o * o * d + o * d * d
            stats += (rows * d * d + rows * o * o) / method.stat_every
        else:  # ekfac: four basis products; factors + projections + squared scales
            precond += 2 * (o * o * d + o * d * d)
            stats += (2 * rows * d * d + 2 * rows * o * o + rows * o * d) / method.stat_every
        inverse += (d ** 3 + o ** 3) / INVERSE_EVERY
    sgd = 2 * fwd_bwd
    floor = 2 * (fwd_bwd + precond + stats + inverse)
    floor_factored = floor - 2 * factored_saving
    return {
        "sgd": sgd, "floor": floor, "floor_ratio": floor / sgd,
        "floor_factored": floor_factored, "floor_factored_ratio": floor_factored / sgd,
        "parts": {"fwd_bwd": 2 * fwd_bwd, "precondition": 2 * precond, "statistics": 2 * stats,
                  "inverse": 2 * inverse},
        "not_in_floor": {"mc_fisher_backprop": 2 * mc_backprop / method.stat_every,
                         "quadratic_model": 2 * quad if method.rescale == "quadratic" else 0.0},
    }
