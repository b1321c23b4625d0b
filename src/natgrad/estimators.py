"""Which Fisher: the vectors back-propagated from the network output.

Every estimator is a list of K vectors v_k [N, *out] with
F = (1/N) Σ_n Σ_k J_nᵀ v_nk v_nkᵀ J_n (J_n = ∂f(x_n)/∂θ):

* ``exact``: v_k = columns of a square root of the output Fisher D (closed-form expectation
  over y; C − 1 columns for softmax, one per output value otherwise);
* ``mc``: v_k = ∂(−log p(y_k|f))/∂f / √S for S draws y_k ~ p(y|f) (``samples`` = S);
* ``empirical``: v = ∂(−log p(y|f))/∂f with the data's labels y.
"""

from __future__ import annotations

import math

from torch import Tensor

from .errors import warn
from .likelihoods import Likelihood

ESTIMATORS = ("exact", "mc", "empirical")


def check_estimator(estimator: str, samples: int) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if estimator != "mc" and samples != 1:
        warn(f"samples={samples} has no effect: only estimator='mc' draws samples, "
             f"{estimator!r} uses {'the closed-form expectation' if estimator == 'exact' else 'the labels'}")


def backprop_vectors(
    likelihood: Likelihood, estimator: str, output: Tensor, targets: Tensor | None, samples: int
) -> list[Tensor]:
    """The K vectors v_k [N, *out] of the estimator at the (detached) ``output``."""
    output = output.detach()
    if estimator == "exact":
        return list(likelihood.sqrt_fisher_columns(output))
    if estimator == "mc":
        scale = 1.0 / math.sqrt(samples)
        return [likelihood.score(output, likelihood.sample(output)) * scale for _ in range(samples)]
    if targets is None:  # guarded earlier; kept for direct callers
        raise ValueError("the empirical Fisher needs targets")
    return [likelihood.score(output, targets)]


def outer_curvature(vectors: Tensor):
    """u ↦ Σ_k v_k (v_k · u) per example, the output curvature of ``vectors`` [K, N, *out]."""

    def apply(u: Tensor) -> Tensor:
        dims = tuple(range(2, vectors.dim()))
        inner = (vectors * u.unsqueeze(0)).sum(dims, keepdim=True)
        return (vectors * inner).sum(0)

    return apply
