"""The interface every Fisher representation shares, with generic fallbacks.

``F @ v`` / ``F.mv(v)``, ``F.solve(v, damping)`` = (F + damping I)⁻¹ v, ``F.to_dense()``,
``F.diagonal()``, ``F.trace()``. Vectors are flat, in ``parameters_to_vector`` order of the
trainable parameters, shape ``[P]`` or ``[P, m]`` for m vectors at once. A subclass implements
``_mv`` on ``[P, m]`` and overrides the rest where its structure makes it cheaper.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..layout import Block, check_vector
from ..linalg import check_damping, conjugate_gradient, default_tolerance

_DENSE_CHUNK = 256  # columns of the identity pushed through _mv at once by the fallbacks


class FisherMatrix(ABC):
    """A P×P Fisher information matrix in some storage structure."""

    def __init__(self, blocks: tuple[Block, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.blocks = blocks
        self.size = blocks[-1].stop
        self.dtype = dtype
        self.device = device

    # public interface -------------------------------------------------------------------
    def mv(self, v: Tensor) -> Tensor:
        """F v for v [P] or [P, m]."""
        check_vector(v, self.size, self.dtype)
        return self._columns(self._mv, v)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.mv(v)

    def solve(self, v: Tensor, damping: float, tol: float | None = None, max_iter: int | None = None) -> Tensor:
        """(F + damping I)⁻¹ v for v [P] or [P, m]; iterative structures take ``tol``/``max_iter``."""
        check_vector(v, self.size, self.dtype)
        damping = check_damping(damping)
        return self._columns(lambda x: self._solve(x, damping, tol, max_iter), v)

    def to_dense(self) -> Tensor:
        """The P×P matrix in flat parameter order."""
        return self._to_dense()

    def diagonal(self) -> Tensor:
        """diag(F), shape [P]."""
        return self._diagonal()

    def trace(self) -> Tensor:
        """tr(F), a 0-d tensor."""
        return self._trace()

    # generic fallbacks --------------------------------------------------------------------
    @abstractmethod
    def _mv(self, v: Tensor) -> Tensor:
        """F V for V [P, m]."""

    def _solve(self, v: Tensor, damping: float, tol: float | None, max_iter: int | None) -> Tensor:
        tol = default_tolerance(self.dtype) if tol is None else tol
        max_iter = 2 * self.size + 10 if max_iter is None else max_iter
        return conjugate_gradient(self._mv, v, damping, tol, max_iter)

    def _to_dense(self) -> Tensor:
        eye = torch.eye(self.size, dtype=self.dtype, device=self.device)
        columns = [self._mv(eye[:, i : i + _DENSE_CHUNK]) for i in range(0, self.size, _DENSE_CHUNK)]
        dense = torch.cat(columns, dim=1)
        return 0.5 * (dense + dense.T)

    def _diagonal(self) -> Tensor:
        return self._to_dense().diagonal().clone()

    def _trace(self) -> Tensor:
        return self._diagonal().sum()

    @staticmethod
    def _columns(fn, v: Tensor) -> Tensor:
        return fn(v.unsqueeze(1)).squeeze(1) if v.dim() == 1 else fn(v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, blocks={len(self.blocks)}, dtype={self.dtype})"


class BlockOperator(ABC):
    """One diagonal block (one layer) of a block-diagonal Fisher, acting on ``[size, m]``."""

    size: int

    @abstractmethod
    def mv(self, v: Tensor) -> Tensor: ...

    @abstractmethod
    def solve(self, v: Tensor, damping: float, tol: float | None, max_iter: int | None) -> Tensor: ...

    @abstractmethod
    def to_dense(self) -> Tensor: ...

    @abstractmethod
    def diagonal(self) -> Tensor: ...

    def trace(self) -> Tensor:
        return self.diagonal().sum()


class BlockDiagonalFisher(FisherMatrix):
    """F ≈ diag(F_1, …, F_L): one :class:`BlockOperator` per :class:`~natgrad.layout.Block`."""

    def __init__(
        self,
        blocks: tuple[Block, ...],
        operators: list[BlockOperator],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(blocks, dtype, device)
        self.operators = operators

    def _per_block(self, fn, v: Tensor) -> Tensor:
        return torch.cat([fn(op, v[b.slice]) for b, op in zip(self.blocks, self.operators)], dim=0)

    def _mv(self, v: Tensor) -> Tensor:
        return self._per_block(lambda op, x: op.mv(x), v)

    def _solve(self, v: Tensor, damping: float, tol: float | None, max_iter: int | None) -> Tensor:
        return self._per_block(lambda op, x: op.solve(x, damping, tol, max_iter), v)

    def _to_dense(self) -> Tensor:
        return torch.block_diag(*[op.to_dense() for op in self.operators])

    def _diagonal(self) -> Tensor:
        return torch.cat([op.diagonal() for op in self.operators])

    def _trace(self) -> Tensor:
        return sum((op.trace() for op in self.operators), torch.zeros((), dtype=self.dtype, device=self.device))

    def block(self, name: str) -> BlockOperator:
        """The operator of the block (module) called ``name``."""
        for b, op in zip(self.blocks, self.operators):
            if b.name == name:
                return op
        raise KeyError(f"no block named {name!r}; blocks are {[b.name for b in self.blocks]}")
