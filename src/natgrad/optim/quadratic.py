"""The exact-Fisher quadratic model of Martens & Grosse (§6.4, §7), on the user's own graph.

M(δ) = ½ δᵀ (F + λ' I) δ + ∇ᵀδ with F the exact Fisher of the current batch. Only quadratic
forms aᵀ F b = (1/N) Σ_n (J_n a)ᵀ D_n (J_n b) are needed, and J v comes from the graph that
produced the output (:class:`~natgrad.linearized.LinearizedOutput`): no second forward.
Across ranks, the sums Σ_n (J_n a)ᵀ D_n (J_n b) and N are all-reduced: F is that of the union
of the ranks' batches (the gradient is already the global one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..distributed import Communicator
from ..likelihoods import Likelihood
from ..linalg import weighted_dot
from ..linearized import LinearizedOutput


@dataclass
class QuadraticModel:
    """The 2×2 model over δ = c₁Δ + c₂δ₀: ``matrix`` (with λ'), ``linear`` = [∇ᵀΔ, ∇ᵀδ₀]."""

    matrix: Tensor  # [2, 2] float64
    linear: Tensor  # [2] float64

    def optimum(self, use_momentum: bool) -> Tensor:
        """Coefficients minimising the model; μ = 0 when there is no previous step."""
        if use_momentum:
            det = torch.linalg.det(self.matrix)
            if float(det) > 1e-12 * float(self.matrix.diagonal().prod()):
                return -torch.linalg.solve(self.matrix, self.linear)
        coeff = torch.zeros(2, dtype=self.matrix.dtype)
        if float(self.matrix[0, 0]) > 0:
            coeff[0] = -self.linear[0] / self.matrix[0, 0]
        return coeff

    def trust_region_scale(self, coeff: Tensor, bound: float) -> float:
        """Factor ≤ 1 keeping ½ δᵀ(F + λ'I)δ ≤ ``bound`` (a KL trust region on the step)."""
        size = float(0.5 * coeff @ self.matrix @ coeff)
        return min(1.0, (bound / size) ** 0.5) if size > 0 else 1.0

    def value(self, coeff: Tensor) -> float:
        """M(δ) − M(0) for δ = coeff[0] Δ + coeff[1] δ₀."""
        return float(0.5 * coeff @ self.matrix @ coeff + self.linear @ coeff)


def quadratic_model(
    linearized: LinearizedOutput,
    likelihood: Likelihood,
    direction: Tensor,
    previous: Tensor | None,
    grad: Tensor,
    damping: float | Tensor,
    comm: Communicator | None = None,
) -> QuadraticModel:
    """Build the model on the batch whose output ``linearized`` holds (its graph alive);
    ``damping`` λ' is a number or one value per parameter (flat); ``comm``: the ranks whose
    batches make up the global batch."""
    vectors = [direction] if previous is None else [direction, previous]
    # in the parameters' dtype: under autocast the output and its J·v are in a lower precision
    jvps = [jv.to(direction.dtype) for jv in linearized.jvps(vectors)]
    n = linearized.output.shape[0]
    out = linearized.output.detach().to(direction.dtype)
    fisher_jvps = [likelihood.fisher_vector(out, jv) for jv in jvps]
    size = len(vectors)
    pairs = [(i, j) for i in range(size) for j in range(i, size)]
    sums = [float((jvps[i] * fisher_jvps[j]).sum()) for i, j in pairs]
    if comm is not None:
        *sums, n = comm.all_reduce_numbers(sums + [n], "quadratic model")
    matrix = torch.zeros(2, 2, dtype=torch.float64)
    linear = torch.zeros(2, dtype=torch.float64)
    for i in range(size):
        linear[i] = float(grad @ vectors[i])
    for (i, j), total in zip(pairs, sums):
        matrix[i, j] = matrix[j, i] = total / n + weighted_dot(vectors[i], damping, vectors[j])
    return QuadraticModel(matrix, linear)
