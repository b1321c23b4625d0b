"""The options of the curvature optimizers, grouped in three small objects with defaults.

* :class:`Schedule` — when statistics and inverses are refreshed;
* :class:`DampingPolicy` — how the damping λ enters the inverse and whether it adapts;
* :class:`StepPolicy` — how the preconditioned direction becomes a step (rescaling, momentum,
  weight decay, trust region).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _number(name: str, value: object, low: float, high: float, low_open: bool = False, high_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be a number in {lo}{low}, {high}{hi}, got {value!r}")


@dataclass(frozen=True)
class Schedule:
    """Statistics every ``stat_every`` steps; inverses/eigenbases every ``inverse_every`` steps
    (and on the first three steps, as in Martens & Grosse §8). Factors are running averages
    ``new = ρ old + (1 − ρ) batch`` with ρ = min(1 − 1/k, ``decay``) at the k-th update.
    ``stat_fraction`` τ₁: the statistics use ⌈τ₁ N⌉ consecutive examples of each batch of N,
    starting where the previous statistics step's stopped (cyclically), so that a batch seen
    again — full-batch training, an unshuffled loader — contributes all of its examples in turn
    (the paper's τ₁ = 1/8 makes the factor products 8× cheaper; the Fisher backprop itself still
    runs through the whole batch's graph), but at least ``stat_min_examples`` of them (all of a
    smaller batch): on small batches the subset saves little time and costs progress per step.
    K-FAC defaults to τ₁ = 1/8, EKFAC and NGD to 1."""

    stat_every: int = 1
    inverse_every: int = 10
    decay: float = 0.95
    stat_fraction: float = 1.0
    stat_min_examples: int = 32

    def __post_init__(self) -> None:
        _positive_int("Schedule.stat_every", self.stat_every)
        _positive_int("Schedule.inverse_every", self.inverse_every)
        _number("Schedule.decay", self.decay, 0.0, 1.0)
        _number("Schedule.stat_fraction", self.stat_fraction, 0.0, 1.0, low_open=True, high_open=False)
        _positive_int("Schedule.stat_min_examples", self.stat_min_examples)


@dataclass(frozen=True)
class DampingPolicy:
    """``mode="factored"``: Tikhonov damping split between the factors with the π heuristic,
    (A + π√λ I) ⊗ (G + √λ/π I) (Martens & Grosse §6.3); ``mode="eigen"``: exact damping
    (G ⊗ A + λ I)⁻¹ in the Kronecker eigenbasis. ``adaptive``: Levenberg–Marquardt on the
    reduction ratio ρ every ``adapt_every`` steps (needs ``step(closure)``): λ ← ω λ if ρ > 3/4,
    λ ← λ / ω if ρ < 1/4, ω = ``omega`` ** adapt_every, kept within [min_damping, max_damping]."""

    mode: str = "factored"
    adaptive: bool = False
    adapt_every: int = 5
    omega: float = 19 / 20
    min_damping: float = 1e-8
    max_damping: float = 1e4

    def __post_init__(self) -> None:
        if self.mode not in ("factored", "eigen"):
            raise ValueError(f"DampingPolicy.mode must be 'factored' or 'eigen', got {self.mode!r}")
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"DampingPolicy.adaptive must be a bool, got {self.adaptive!r}")
        _positive_int("DampingPolicy.adapt_every", self.adapt_every)
        _number("DampingPolicy.omega", self.omega, 0.0, 1.0, low_open=True)
        _number("DampingPolicy.min_damping", self.min_damping, 0.0, math.inf)
        _number("DampingPolicy.max_damping", self.max_damping, self.min_damping, math.inf)


@dataclass(frozen=True)
class StepPolicy:
    """``rescale="quadratic"``: step size α and momentum μ minimise the exact-Fisher quadratic
    model ½δᵀ(F + (λ+η)I)δ + ∇ᵀδ over δ = αΔ + μδ₀ on the current batch (Martens & Grosse §6.4
    and §7; ``momentum`` is then unused), and the step is shrunk if needed so that
    ½δᵀ(F + (λ+η)I)δ ≤ ``kl_clip`` (a trust region in the Fisher norm, ≈ the KL change of the
    model's predictions); ``"kl_clip"``: the step is scaled so that lr²·Δᵀ F̂ Δ ≤ ``kl_clip``
    (Ba et al. 2017), then heavy-ball ``momentum``; ``"none"``: plain lr with ``momentum``.
    ``weight_decay`` η adds η θ to the gradient (and η to the damping).

    ``quadratic_fraction`` τ₂ < 1: the quadratic model's F is that of ⌈τ₂ N⌉ consecutive examples
    of each batch of N (rotating through the batch from step to step, as the statistics do), but
    at least ``quadratic_min_examples`` (Martens & Grosse §6.4 use τ₂ = 1/4). For models large
    enough that it pays (~10⁵ parameters at batch 256), J·v on those rows come from re-running the
    model on their inputs with forward-mode differentiation, about (1 + 2K)/(2K)·τ₂ of the double
    backward through the whole batch for K directions; this needs the batch tensor as the
    forward's only argument and rows that depend neither on each other nor on randomness (it is
    checked: with dropout or BatchNorm in training mode J·v come from the batch's graph, with a
    warning). The default is τ₂ = 1, the whole batch: on classifiers a subset can miss the few
    examples that carry the gradient late in training, under-estimate the curvature along the
    step and overshoot (mnist-mlp, batch 256: no convergence with 64 rows; the paper: "use
    τ₂ = 1 when overfitting or when minibatches are small"); on mnist-autoencoder, whose every
    image carries 784 outputs, 1/4 costs no steps and ~20 % of the time per step."""

    rescale: str = "quadratic"
    momentum: float = 0.9
    kl_clip: float = 0.1
    weight_decay: float = 0.0
    quadratic_fraction: float = 1.0
    quadratic_min_examples: int = 32

    def __post_init__(self) -> None:
        if self.rescale not in ("quadratic", "kl_clip", "none"):
            raise ValueError(
                f"StepPolicy.rescale must be 'quadratic', 'kl_clip' or 'none', got {self.rescale!r}"
            )
        _number("StepPolicy.momentum", self.momentum, 0.0, 1.0)
        _number("StepPolicy.kl_clip", self.kl_clip, 0.0, math.inf, low_open=True)
        _number("StepPolicy.weight_decay", self.weight_decay, 0.0, math.inf)
        _number("StepPolicy.quadratic_fraction", self.quadratic_fraction, 0.0, 1.0, low_open=True, high_open=False)
        _positive_int("StepPolicy.quadratic_min_examples", self.quadratic_min_examples)
