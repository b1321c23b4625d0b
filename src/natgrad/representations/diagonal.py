"""The diagonal of the Fisher, stored as a vector [P]."""

from __future__ import annotations

from torch import Tensor

from ..layout import Block
from ..linalg import check_invertible
from .base import FisherMatrix


class DiagonalFisher(FisherMatrix):
    """F ≈ diag(d): products and solves are elementwise."""

    def __init__(self, blocks: tuple[Block, ...], diagonal: Tensor) -> None:
        super().__init__(blocks, diagonal.dtype, diagonal.device)
        self.values = diagonal

    def _mv(self, v: Tensor) -> Tensor:
        return self.values.unsqueeze(1) * v

    def _solve(self, v, damping, tol, max_iter) -> Tensor:
        check_invertible(self.values, damping)
        return v / (self.values.unsqueeze(1) + damping)

    def _to_dense(self) -> Tensor:
        return self.values.diag()

    def _diagonal(self) -> Tensor:
        return self.values.clone()
