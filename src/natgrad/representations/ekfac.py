"""EKFAC (George et al. 2018): K-FAC's eigenbasis, with the diagonal re-fit to the data.

Block = (Q_G ⊗ Q_A) diag(s) (Q_G ⊗ Q_A)ᵀ with s = E_{n,k}[(Q_Gᵀ Γ_nk Q_A)²] elementwise
(``scales`` [G, O, D], Γ_nk the per-example gradient of the joint matrix). For a fixed basis
this s minimises the Frobenius distance to the exact block, so EKFAC is never farther from it
than K-FAC (whose diagonal is λ_G λ_Aᵀ). Damping is exact: divide by s + ε.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers.base import LayerAdapter
from ..linalg import check_invertible
from ._layer_ops import from_matrices, matrix_order_to_flat, to_matrices
from .base import BlockDiagonalFisher, BlockOperator


class EKFACBlock(BlockOperator):
    """Eigenbases ``input_basis`` Q_A [G, D, D], ``output_basis`` Q_G [G, O, O], ``scales`` [G, O, D]."""

    def __init__(self, adapter: LayerAdapter, input_basis: Tensor, output_basis: Tensor, scales: Tensor) -> None:
        self.adapter = adapter
        self.input_basis = input_basis
        self.output_basis = output_basis
        self.scales = scales
        self.size = adapter.size

    def _in_basis(self, v: Tensor) -> Tensor:
        return self.output_basis.mT @ to_matrices(self.adapter, v) @ self.input_basis

    def _from_basis(self, m: Tensor) -> Tensor:
        return from_matrices(self.adapter, self.output_basis @ m @ self.input_basis.mT)

    def mv(self, v: Tensor) -> Tensor:
        return self._from_basis(self.scales * self._in_basis(v))

    def solve(self, v, damping, tol, max_iter) -> Tensor:
        check_invertible(self.scales, damping, size=self.scales.shape[-2] + self.scales.shape[-1])
        return self._from_basis(self._in_basis(v) / (self.scales + damping))

    def to_dense(self) -> Tensor:
        blocks = []
        for q_a, q_g, s in zip(self.input_basis, self.output_basis, self.scales):
            q = torch.kron(q_g, q_a)
            blocks.append((q * s.reshape(1, -1)) @ q.T)
        return matrix_order_to_flat(self.adapter, torch.block_diag(*blocks))

    def diagonal(self) -> Tensor:
        return self.adapter.from_matrix(self.output_basis.pow(2) @ self.scales @ self.input_basis.pow(2).mT)

    def trace(self) -> Tensor:
        return self.scales.sum()


class EKFACFisher(BlockDiagonalFisher):
    """Block-diagonal Fisher with one :class:`EKFACBlock` per layer (``F.operators``)."""
