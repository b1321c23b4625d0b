"""Explicit matrices: the full P×P Fisher, and one dense block of a block-diagonal one."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import Block
from ..linalg import check_invertible
from .base import BlockOperator, FisherMatrix


def cholesky_solve(matrix: Tensor, v: Tensor, damping: float) -> Tensor:
    """(matrix + damping I)⁻¹ v through a Cholesky factorisation; clear error if singular."""
    damped = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        check_invertible(0.0, damping)
        raise ValueError(
            f"F + {damping:g} I is not numerically positive definite; increase damping"
        )
    return torch.cholesky_solve(v, factor)


class DenseFisher(FisherMatrix):
    """The full matrix, stored: ``matrix`` [P, P]."""

    def __init__(self, blocks: tuple[Block, ...], matrix: Tensor) -> None:
        super().__init__(blocks, matrix.dtype, matrix.device)
        self.matrix = matrix

    def _mv(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def _solve(self, v, damping, tol, max_iter) -> Tensor:
        return cholesky_solve(self.matrix, v, damping)

    def _to_dense(self) -> Tensor:
        return self.matrix.clone()

    def _diagonal(self) -> Tensor:
        return self.matrix.diagonal().clone()


class DenseBlock(BlockOperator):
    """One layer's block stored explicitly, ``matrix`` [size, size]."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix
        self.size = matrix.shape[0]

    def mv(self, v: Tensor) -> Tensor:
        return self.matrix @ v

    def solve(self, v, damping, tol, max_iter) -> Tensor:
        return cholesky_solve(self.matrix, v, damping)

    def to_dense(self) -> Tensor:
        return self.matrix.clone()

    def diagonal(self) -> Tensor:
        return self.matrix.diagonal().clone()
