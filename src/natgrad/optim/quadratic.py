"""The exact-Fisher quadratic model of Martens & Grosse (§6.4, §7), on the user's own graph.

M(δ) = ½ δᵀ (F + λ' I) δ + ∇ᵀδ with F the exact Fisher of the current batch. Only quadratic
forms aᵀ F b = (1/N) Σ_n (J_n a)ᵀ D_n (J_n b) are needed, and J v comes from the graph that
produced the output (:class:`~natgrad.linearized.LinearizedOutput`): no second forward.
Across ranks, the sums Σ_n (J_n a)ᵀ D_n (J_n b) and N are all-reduced: F is that of the union
of the ranks' batches (the gradient is already the global one).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..distributed import Communicator
from ..likelihoods import Likelihood
from ..linalg import weighted_dot
from ..linearized import LinearizedOutput


Coefficients = tuple[float, float]


@dataclass
class QuadraticModel:
    """The 2×2 model over δ = c₁Δ + c₂δ₀ in plain floats (a few arithmetic operations, no tensor
    dispatch): ``matrix`` ((a, b), (b, c)) with λ', ``linear`` = (∇ᵀΔ, ∇ᵀδ₀)."""

    matrix: tuple[Coefficients, Coefficients]
    linear: Coefficients

    def optimum(self, use_momentum: bool) -> Coefficients:
        """Coefficients minimising the model; μ = 0 when there is no previous step."""
        (a, b), (_, c) = self.matrix
        g0, g1 = self.linear
        if use_momentum:
            det = a * c - b * b
            if det > 1e-12 * a * c:
                return (-(c * g0 - b * g1) / det, -(a * g1 - b * g0) / det)
        return (-g0 / a if a > 0 else 0.0, 0.0)

    def trust_region_scale(self, coeff: Coefficients, bound: float) -> float:
        """Factor ≤ 1 keeping ½ δᵀ(F + λ'I)δ ≤ ``bound`` (a KL trust region on the step)."""
        size = 0.5 * self._form(coeff)
        return min(1.0, (bound / size) ** 0.5) if size > 0 else 1.0

    def value(self, coeff: Coefficients) -> float:
        """M(δ) − M(0) for δ = coeff[0] Δ + coeff[1] δ₀."""
        return 0.5 * self._form(coeff) + self.linear[0] * coeff[0] + self.linear[1] * coeff[1]

    def _form(self, coeff: Coefficients) -> float:
        (a, b), (_, c) = self.matrix
        x, y = coeff
        return a * x * x + 2 * b * x * y + c * y * y


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
    linear = [0.0, 0.0]
    entries = {(0, 0): 0.0, (0, 1): 0.0, (1, 1): 0.0}
    for i in range(size):
        linear[i] = float(grad @ vectors[i])
    for (i, j), total in zip(pairs, sums):
        entries[i, j] = total / n + weighted_dot(vectors[i], damping, vectors[j])
    matrix = ((entries[0, 0], entries[0, 1]), (entries[0, 1], entries[1, 1]))
    return QuadraticModel(matrix, (linear[0], linear[1]))
