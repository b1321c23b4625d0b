"""K-FAC: each layer block approximated by one Kronecker product per group.

With the joint matrix M = [W | b] flattened row-major, a layer block is ≈ G ⊗ A where
A = E[ā āᵀ] [G, D, D] (bias folded in as the last input coordinate) and
G = E[Σ g gᵀ] [G, O, O] (see :mod:`natgrad.statistics` for the normalisation). Then
(G ⊗ A) vec(M) = vec(G M A), and with eigendecompositions G = Q_G Λ_G Q_Gᵀ,
A = Q_A Λ_A Q_Aᵀ the damped inverse is exact:
(G ⊗ A + εI)⁻¹ vec(M) = vec(Q_G [(Q_Gᵀ M Q_A) / (λ_G λ_Aᵀ + ε)] Q_Aᵀ).
"""

from __future__ import annotations

from functools import cached_property

from torch import Tensor

from ..layers.base import LayerAdapter
from ..linalg import check_invertible, symmetric_eigh
from ._layer_ops import from_matrices, matrix_order_to_flat, per_group_kron, to_matrices
from .base import BlockDiagonalFisher, BlockOperator


class KFACBlock(BlockOperator):
    """One layer's G ⊗ A; ``input_factor`` A [G, D, D], ``output_factor`` G [G, O, O]."""

    def __init__(self, adapter: LayerAdapter, input_factor: Tensor, output_factor: Tensor) -> None:
        self.adapter = adapter
        self.input_factor = input_factor
        self.output_factor = output_factor
        self.size = adapter.size

    @cached_property
    def eigen(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(λ_A, Q_A, λ_G, Q_G), eigenvalues clamped at 0."""
        values_a, vectors_a = symmetric_eigh(self.input_factor)
        values_g, vectors_g = symmetric_eigh(self.output_factor)
        return values_a, vectors_a, values_g, vectors_g

    def mv(self, v: Tensor) -> Tensor:
        m = to_matrices(self.adapter, v)
        return from_matrices(self.adapter, self.output_factor @ m @ self.input_factor)

    def solve(self, v, damping, tol, max_iter) -> Tensor:
        values_a, vectors_a, values_g, vectors_g = self.eigen
        scale = values_g.unsqueeze(-1) * values_a.unsqueeze(-2)  # [G, O, D]
        check_invertible(scale, damping, size=scale.shape[-2] + scale.shape[-1])
        m = vectors_g.mT @ to_matrices(self.adapter, v) @ vectors_a
        return from_matrices(self.adapter, vectors_g @ (m / (scale + damping)) @ vectors_a.mT)

    def to_dense(self) -> Tensor:
        return matrix_order_to_flat(self.adapter, per_group_kron(self.output_factor, self.input_factor))

    def diagonal(self) -> Tensor:
        diag = self.output_factor.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * self.input_factor.diagonal(
            dim1=-2, dim2=-1
        ).unsqueeze(-2)
        return self.adapter.from_matrix(diag)

    def trace(self) -> Tensor:
        return (self.output_factor.diagonal(dim1=-2, dim2=-1).sum(-1) * self.input_factor.diagonal(
            dim1=-2, dim2=-1
        ).sum(-1)).sum()


class KFACFisher(BlockDiagonalFisher):
    """Block-diagonal Fisher with one :class:`KFACBlock` per layer (``F.operators``)."""
