"""Conditioning diagnostics: per layer, how well conditioned the Fisher's layer block is.

Why PRONG works (Desjardins et al. 2015, §4.1): it whitens every layer's input, so the input
factor of the layer's K-FAC block, ``A = E[ā āᵀ]`` with ``ā = [h_e; 1]``, is the identity up
to ε, while plain SGD sees ``A = E[[h; 1][h; 1]ᵀ]`` of raw activations, whose condition number
is typically orders of magnitude larger. :func:`condition_numbers` measures it::

    cond = natgrad.diagnostics.condition_numbers(model, x_train[:1000])
    cond["0"]["input_factor"], cond["0"]["kfac_block"]

Definitions (``L`` a layer with a natgrad layer adapter — ``nn.Linear``, ``nn.Conv2d`` and the
whitened layers — and trainable parameters; every matrix is the mean over the examples):

* ``input_factor``: ``cond(A + δI)``, ``A = (1/(N·T)) Σ ā āᵀ`` ``[D, D]`` (``D`` = inputs,
  +1 with a bias; ``T`` = positions of a convolution), K-FAC's input factor as
  :func:`natgrad.fisher` computes it; for a whitened layer ``ā = [U (h − μ); 1]``.
* ``output_factor``: ``cond(G + δI)``, ``G = (1/N) Σ g gᵀ`` ``[O, O]``, the factor of the
  back-propagated output gradients under the model's distribution (``estimator``).
* ``kfac_block``: ``cond(G ⊗ A + δI) = (λ_max(A) λ_max(G) + δ) / (λ_min(A) λ_min(G) + δ)``
  (the eigenvalues of a Kronecker product are the products of the factors'); with ``δ = 0``
  this is ``cond(A) · cond(G)``.
* ``exact_block`` (with ``exact=True``): ``cond(F_L + δI)`` of the exact layer block
  ``F_L = (1/N) Σ_n E_y[vec(∇_L) vec(∇_L)ᵀ]`` (``[P, P]``, ``P`` = the layer's parameters,
  from ``natgrad.fisher(..., structure="block_diagonal")``): costs ``P²`` memory and a ``P³``
  eigendecomposition per layer, so meant for small layers.

``cond(M) = λ_max / λ_min`` from the eigenvalues of the symmetric positive semi-definite ``M``
(computed in float64). Eigenvalues at or below the rounding level of ``M``'s dtype,
``size(M) · u · λ_max`` (``u`` the machine epsilon; numpy's ``matrix_rank`` tolerance), count as
0: a singular matrix (constant inputs such as MNIST's border pixels, dead units) has
``cond = inf`` when ``δ = 0`` — never NaN — and ``(λ_max + δ)/δ`` with damping ``δ > 0``.
Grouped convolutions (one ``(A, G)`` pair per group) take the extreme eigenvalues over groups.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .fisher import fisher
from .linalg import rounding_floor

__all__ = ["condition_number", "condition_numbers"]

QUANTITIES = ("input_factor", "output_factor", "kfac_block", "exact_block")


def _check_damping(damping) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"damping must be a number >= 0, got {type(damping).__name__}")
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0 (cond(M + damping·I)), got {damping!r}")
    return float(damping)


def _extreme_eigenvalues(matrices: Tensor) -> tuple[float, float]:
    """``(λ_min, λ_max)`` over a batch of symmetric PSD matrices ``[..., D, D]``, in float64,
    eigenvalues at or below ``D · u · λ_max`` (``u`` of the input dtype) set to 0."""
    if matrices.dim() == 2:
        matrices = matrices.unsqueeze(0)
    m = matrices.detach().to(torch.float64)
    lam = torch.linalg.eigvalsh((m + m.mT) / 2)
    if not bool(torch.isfinite(lam).all()):
        raise ValueError("the matrix has non-finite entries: no condition number")
    lam_max = max(float(lam.max()), 0.0)
    floor = rounding_floor(lam_max, matrices.shape[-1], matrices.dtype)
    lam_min = float(lam.min())
    return (0.0 if lam_min <= floor else lam_min), lam_max


def _ratio(top: float, bottom: float, damping: float) -> float:
    if bottom + damping <= 0.0:
        return math.inf
    return (top + damping) / (bottom + damping)


def condition_number(matrix: Tensor, damping: float = 0.0) -> float:
    """``cond(M + damping·I)`` of a symmetric positive semi-definite ``matrix`` ``[D, D]`` (or a
    batch ``[B, D, D]``, read as the block-diagonal matrix), with the convention of this
    module: ``inf`` for a singular ``M`` without damping, never NaN."""
    damping = _check_damping(damping)
    if not isinstance(matrix, Tensor) or matrix.dim() not in (2, 3) or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError("matrix must be a square tensor [D, D] or a batch of them [B, D, D]")
    if matrix.shape[-1] == 0:
        raise ValueError("matrix is empty: no condition number")
    lam_min, lam_max = _extreme_eigenvalues(matrix)
    return _ratio(lam_max, lam_min, damping)


def condition_numbers(
    model: nn.Module,
    inputs,
    likelihood="categorical",
    *,
    estimator: str = "exact",
    damping: float = 0.0,
    exact: bool = False,
) -> dict[str, dict[str, float]]:
    """Per layer, the condition numbers of the K-FAC factors and block of ``model``'s Fisher on
    ``inputs`` (see the module docstring for the definitions and the singular convention).

    Args:
        model: the network (plain or whitened, :func:`natgrad.nn.whiten`); in eval mode if it
            has batch normalisation (per-example quantities need independent examples).
        inputs: what :func:`natgrad.fisher` takes: inputs (a tensor or batches), or
            ``(inputs, targets)`` (needed for ``estimator="empirical"``).
        likelihood: the model's output distribution, as for :func:`natgrad.fisher`.
        estimator: "exact" (default), "mc" or "empirical", as for :func:`natgrad.fisher`.
        damping: δ ≥ 0 added to every matrix before its condition number (default 0).
        exact: also the condition number of the exact layer block (``exact_block``).

    Returns:
        ``{layer name: {"input_factor", "output_factor", "kfac_block"[, "exact_block"]: float}}``
        in the order of :func:`natgrad.fisher`'s blocks.

    Raises:
        natgrad.UnsupportedLayerError: a module with trainable parameters has no natgrad layer
            adapter (K-FAC needs one), e.g. batch normalisation's affine parameters — freeze
            them (``requires_grad_(False)``) to leave them out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    damping = _check_damping(damping)
    if not isinstance(exact, bool):
        raise TypeError("exact must be a boolean")
    kfac = fisher(model, inputs, likelihood, estimator=estimator, structure="kfac")
    result: dict[str, dict[str, float]] = {}
    for block, operator in zip(kfac.blocks, kfac.operators):
        a_min, a_max = _extreme_eigenvalues(operator.input_factor)
        g_min, g_max = _extreme_eigenvalues(operator.output_factor)
        result[block.name] = {
            "input_factor": _ratio(a_max, a_min, damping),
            "output_factor": _ratio(g_max, g_min, damping),
            "kfac_block": _ratio(a_max * g_max, a_min * g_min, damping),
        }
    if exact:
        dense = fisher(model, inputs, likelihood, estimator=estimator, structure="block_diagonal")
        for block, operator in zip(dense.blocks, dense.operators):
            f_min, f_max = _extreme_eigenvalues(operator.to_dense())
            result.setdefault(block.name, {})["exact_block"] = _ratio(f_max, f_min, damping)
    return result
