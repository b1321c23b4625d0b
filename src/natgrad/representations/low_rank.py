"""The Fisher of one batch kept as its gradient rows: F = UᵀU / N, U [M, P], M = N·K rows.

When a batch has fewer rows than the model has parameters (M < P), F has rank ≤ M and its P×P
matrix is mostly redundant. Products cost 2MP; solves use the Woodbury identity

    (UᵀU/N + εI)⁻¹ v = (v − Uᵀ (NεI + UUᵀ)⁻¹ U v) / ε,

one Cholesky of an M×M matrix (M³/3 and M²P to form it) instead of the P×P one (P³/3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import Block
from .base import FisherMatrix
from .dense import cholesky_solve


def low_rank_is_cheaper(rows: int, size: int) -> bool:
    """M²P + M³/3 (UUᵀ and its Cholesky) < P³/3 (the P×P Cholesky). Conservative: forming the
    P×P matrix itself (up to M·P² more) is not counted."""
    return rows * rows * size + rows**3 / 3 < size**3 / 3


class LowRankFisher(FisherMatrix):
    """F = UᵀU / ``examples`` with ``rows`` U [M, P] in flat parameter order."""

    def __init__(self, blocks: tuple[Block, ...], rows: Tensor, examples: int) -> None:
        super().__init__(blocks, rows.dtype, rows.device)
        self.rows = rows
        self.examples = examples

    def _mv(self, v: Tensor) -> Tensor:
        return self.rows.T @ (self.rows @ v) / self.examples

    def _solve(self, v, damping, tol, max_iter) -> Tensor:
        if damping == 0:  # no Woodbury form; singular anyway when M < P (a clear error)
            return cholesky_solve(self._to_dense(), v, 0.0)
        small = self.rows @ self.rows.T
        small.diagonal().add_(self.examples * damping)
        factor, info = torch.linalg.cholesky_ex(small)
        if int(info) != 0:
            raise ValueError(f"F + {damping:g} I is not numerically positive definite; increase damping")
        return (v - self.rows.T @ torch.cholesky_solve(self.rows @ v, factor)) / damping

    def _to_dense(self) -> Tensor:
        return self.rows.T @ self.rows / self.examples

    def _diagonal(self) -> Tensor:
        return self.rows.square().sum(0) / self.examples

    def _trace(self) -> Tensor:
        return self.rows.square().sum() / self.examples
