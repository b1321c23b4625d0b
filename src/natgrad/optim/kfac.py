"""K-FAC (Martens & Grosse 2015) and KFC for convolutions (Grosse & Martens 2016).

Per layer, running averages of A = E[ā āᵀ] and G = E[g gᵀ] (g from the estimator's backprop,
see :mod:`natgrad.statistics`), refreshed every ``Schedule.stat_every`` steps; every
``Schedule.inverse_every`` steps either the factored-damped inverses
(A + π√λ' I)⁻¹, (G + √λ'/π I)⁻¹ (π = √((tr A / dim A)/(tr G / dim G))) or the eigendecompositions
(for exact damping) are recomputed. The direction of a layer with gradient matrix ∇M is
Δ = (G + ·)⁻¹ ∇M (A + ·)⁻¹, or Q_G[(Q_Gᵀ∇M Q_A)/(λ_G λ_Aᵀ + λ')]Q_Aᵀ.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..collect import BatchData
from ..likelihoods import Likelihood
from ..linalg import symmetric_eigh
from ..statistics import input_gram, output_gram
from .base import CurvatureOptimizer
from .config import DampingPolicy, Schedule, StepPolicy
from .other import check_other, other_direction


def damped_inverse(matrix: Tensor, shift: Tensor) -> Tensor:
    """(matrix + shift I)⁻¹ per group for PSD ``matrix`` [G, d, d], ``shift`` [G] > 0.

    Cholesky first; if it fails (ill-conditioned float32), eigenvalues floored at 0 in float64.
    """
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    damped = 0.5 * (matrix + matrix.mT) + shift[:, None, None] * eye
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info.max()) == 0:
        return torch.cholesky_inverse(factor)
    values, vectors = symmetric_eigh(matrix.double())
    inverse = (vectors / (values + shift.double()[:, None])[:, None, :]) @ vectors.mT
    return inverse.to(matrix.dtype)


def right_multiply(matrix: Tensor, factor: Tensor, has_bias: bool) -> Tensor:
    """[W | b] @ factor per group, without products of the odd width D_in + 1: with
    factor = [[P, q], [sᵀ, r]], the result is [W P + b sᵀ | W q + b r]."""
    if not has_bias:
        return matrix @ factor
    weight, bias = matrix[..., :-1], matrix[..., -1:]
    p, q = factor[..., :-1, :-1], factor[..., :-1, -1:]
    s, r = factor[..., -1:, :-1], factor[..., -1:, -1:]
    return torch.cat([weight @ p + bias @ s, weight @ q + bias @ r], dim=-1)


class KFAC(CurvatureOptimizer):
    """K-FAC optimizer. ``KFAC(model, likelihood=...)`` has working defaults.

    Args:
        model: the network (or a DistributedDataParallel wrapping it).
        lr: multiplier of the step (1.0 = the step the quadratic model picks).
        damping: Tikhonov damping λ of the Kronecker factors.
        likelihood: output distribution, as in :func:`natgrad.fisher`.
        estimator: "mc" (default), "exact" or "empirical".
        samples: draws of y per input for "mc".
        schedule, damping_policy, step_policy: option groups (:mod:`natgrad.optim.config`).
        other: update of parameters of modules without a layer adapter: "adam", "sgd", "diagonal".
        param_groups: optional groups with their own lr/damping/weight_decay.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        damping: float = 1e-3,
        likelihood: str | Likelihood = "categorical",
        estimator: str = "mc",
        samples: int = 1,
        *,
        schedule: Schedule = Schedule(),
        damping_policy: DampingPolicy = DampingPolicy(),
        step_policy: StepPolicy = StepPolicy(),
        other: str = "adam",
        param_groups: list[dict] | None = None,
    ) -> None:
        self.other = check_other(other)
        self.generic_statistics = other == "diagonal"
        super().__init__(
            model, lr, damping, likelihood, estimator, samples, schedule, damping_policy, step_policy,
            param_groups, kronecker=True,
        )
        self.other_blocks = [i for i in range(len(self.blocks)) if i not in self.adapters]
        if self.other_blocks:
            names = ", ".join(repr(self.blocks[i].name) for i in self.other_blocks)
            warnings.warn(
                f"{type(self).__name__}: modules {names} have no Kronecker layer adapter; their "
                f"parameters are updated with other={other!r}",
                UserWarning,
                stacklevel=2,
            )
        self.stat_updates = 0

    def _layer_state(self, i: int) -> dict:
        return self.state[self.block_params[i][0]]

    def _decay(self) -> float:
        return min(1.0 - 1.0 / self.stat_updates, self.schedule.decay)

    @staticmethod
    def _average(state: dict, key: str, value: Tensor, decay: float) -> None:
        state[key] = value if key not in state or decay == 0 else decay * state[key] + (1 - decay) * value

    def _update_statistics(self, batch: BatchData) -> None:
        self.stat_updates += 1
        decay = self._decay()
        for i, layer in batch.layers.items():
            state = self._layer_state(i)
            positions = layer.raw_inputs.shape[1]
            self._average(state, "A", input_gram(layer) / (batch.examples * positions), decay)
            self._average(state, "G", output_gram(layer) / batch.examples, decay)
        for i, grads in batch.generic.items():
            self._average(self._layer_state(i), "fisher_diagonal", grads.pow(2).sum((0, 1)) / batch.examples, decay)

    def _refresh(self) -> None:
        for i in self.adapters:
            state = self._layer_state(i)
            if "A" not in state:
                continue
            if self.damping_policy.mode == "eigen":
                state["eig_A"] = symmetric_eigh(state["A"])
                state["eig_G"] = symmetric_eigh(state["G"])
            else:
                self._factored_inverses(state, self.damping_of(i))

    @staticmethod
    def _factored_inverses(state: dict, damping: float) -> None:
        a, g = state["A"], state["G"]
        mean_a = a.diagonal(dim1=-2, dim2=-1).mean(-1)
        mean_g = g.diagonal(dim1=-2, dim2=-1).mean(-1)
        pi = torch.where((mean_a > 0) & (mean_g > 0), (mean_a / mean_g.clamp_min(1e-30)).sqrt(), torch.ones_like(mean_a))
        gamma = damping**0.5
        state["A_inv"] = damped_inverse(a, pi * gamma)
        state["G_inv"] = damped_inverse(g, gamma / pi)

    def _layer_direction(self, i: int, matrix: Tensor) -> Tensor:
        state = self._layer_state(i)
        if self.damping_policy.mode == "eigen":
            values_a, vectors_a = state["eig_A"]
            values_g, vectors_g = state["eig_G"]
            scale = values_g.unsqueeze(-1) * values_a.unsqueeze(-2) + self.damping_of(i)
            return vectors_g @ ((vectors_g.mT @ matrix @ vectors_a) / scale) @ vectors_a.mT
        return state["G_inv"] @ right_multiply(matrix, state["A_inv"], self.adapters[i].has_bias)

    def _direction(self, grads: Tensor) -> Tensor:
        pieces = []
        for i, block in enumerate(self.blocks):
            grad = grads[block.slice]
            if i in self.adapters:
                adapter = self.adapters[i]
                if "A" not in self._layer_state(i):
                    raise RuntimeError("no curvature statistics yet: the first step must be a statistics step")
                pieces.append(adapter.from_matrix(self._layer_direction(i, adapter.to_matrix(grad))))
            else:
                pieces.append(other_direction(self.other, grad, self._layer_state(i), self.damping_of(i)))
        return torch.cat(pieces)

    def _extra_state(self) -> dict:
        return {"stat_updates": self.stat_updates}

    def _load_extra_state(self, extra: dict) -> None:
        self.stat_updates = int(extra.pop("stat_updates", 0))
