"""The Fisher of one batch kept as its gradient rows: F = UᵀU / N, U [M, P], M = N·K rows.

When a batch has fewer rows than the model has parameters (M < P), F has rank ≤ M and its P×P
matrix is mostly redundant. Products cost 2MP; solves use the Woodbury identity

    (UᵀU/N + εI)⁻¹ v = (v − Uᵀ (NεI + UUᵀ)⁻¹ U v) / ε,

one Cholesky of an M×M matrix (M³/3 and M²P to form it) instead of the P×P one (P³/3).

U is kept block by block (a block = one layer's columns). :class:`ExplicitRows` stores the
block's rows [M, size]. :class:`FactoredRows` keeps a layer a = W h + b on [N, in] factored:
its row m is the outer product Γ_m = g_m ā_mᵀ of the output gradient g_m [O] and the input
ā_m = [h; 1] [D], so U v = Σ_{o,d} g_mo V_od ā_md, Uᵀ w = Σ_m w_m g_m ā_mᵀ and
(UUᵀ)_mn = (g_m·g_n)(ā_m·ā_n): M(O + D) numbers instead of M·O·D, M²(O + D) for the Gram.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers.base import LayerAdapter
from ..layout import Block
from ..linalg import check_invertible
from .base import FisherMatrix
from .dense import cholesky_solve


def low_rank_is_cheaper(rows: int, size: int) -> bool:
    """M²P + M³/3 (UUᵀ and its Cholesky) < P³/3 (the P×P Cholesky). Conservative: forming the
    P×P matrix itself (up to M·P² more) and the factored layers' cheaper Gram are not counted."""
    return rows * rows * size + rows**3 / 3 < size**3 / 3


class ExplicitRows:
    """One block's rows, stored: ``rows`` [M, size]."""

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows

    @property
    def count(self) -> int:
        """M, the number of rows."""
        return self.rows.shape[0]

    def times(self, v: Tensor) -> Tensor:
        """U_b V for V [size, m] -> [M, m]."""
        return self.rows @ v

    def transpose_times(self, w: Tensor) -> Tensor:
        """U_bᵀ W for W [M, m] -> [size, m]."""
        return self.rows.T @ w

    def gram(self, dtype: torch.dtype) -> Tensor:
        """U_b U_bᵀ [M, M], computed in ``dtype``."""
        rows = self.rows.to(dtype)
        return rows @ rows.T

    def square_sums(self) -> Tensor:
        """Σ_m U_b[m]² [size]."""
        return self.rows.square().sum(0)

    def materialise(self) -> Tensor:
        return self.rows


class FactoredRows:
    """A single-matrix layer's rows Γ_m = g_m ā_mᵀ: ``grads`` g [M, O], ``inputs`` ā [M, D]
    (the adapter's joint-matrix layout, one group)."""

    def __init__(self, adapter: LayerAdapter, grads: Tensor, inputs: Tensor) -> None:
        self.adapter = adapter
        self.grads = grads
        self.inputs = inputs

    @property
    def count(self) -> int:
        return self.grads.shape[0]

    def times(self, v: Tensor) -> Tensor:
        matrices = self.adapter.to_matrix(v.T)[:, 0]  # [m, O, D]
        return ((self.grads @ matrices) * self.inputs).sum(-1).T  # [m, M, D] -> [M, m]

    def transpose_times(self, w: Tensor) -> Tensor:
        matrices = (self.grads.T * w.T.unsqueeze(1)) @ self.inputs  # [m, O, M] @ [M, D]
        return self.adapter.from_matrix(matrices.unsqueeze(1)).T

    def gram(self, dtype: torch.dtype) -> Tensor:
        grads, inputs = self.grads.to(dtype), self.inputs.to(dtype)
        return (grads @ grads.T) * (inputs @ inputs.T)

    def square_sums(self) -> Tensor:
        return self.adapter.from_matrix((self.grads.square().T @ self.inputs.square()).unsqueeze(0))

    def materialise(self) -> Tensor:
        return self.adapter.from_matrix((self.grads.unsqueeze(2) * self.inputs.unsqueeze(1)).unsqueeze(1))


RowBlock = ExplicitRows | FactoredRows


class LowRankFisher(FisherMatrix):
    """F = UᵀU / ``examples`` with U's columns block by block in ``parts`` (one per block, the
    same M rows in each)."""

    def __init__(self, blocks: tuple[Block, ...], parts: list[RowBlock], examples: int) -> None:
        if len(parts) != len(blocks):
            raise ValueError(f"one row block per parameter block: got {len(parts)} for {len(blocks)}")
        first = parts[0].rows if isinstance(parts[0], ExplicitRows) else parts[0].grads
        super().__init__(blocks, first.dtype, first.device)
        self.parts = parts
        self.examples = examples

    def _times(self, v: Tensor) -> Tensor:
        """U V [M, m]."""
        return sum(part.times(v[b.slice]) for b, part in zip(self.blocks, self.parts))

    def _transpose_times(self, w: Tensor) -> Tensor:
        """Uᵀ W [P, m]."""
        return torch.cat([part.transpose_times(w) for part in self.parts], dim=0)

    def _mv(self, v: Tensor) -> Tensor:
        return self._transpose_times(self._times(v)) / self.examples

    def _solve(self, v, damping, tol, max_iter) -> Tensor:
        if damping == 0:  # no Woodbury form
            if self.parts[0].count < self.size:
                check_invertible(0.0, 0.0)  # rank ≤ M < P: singular, without forming P×P
            return cholesky_solve(self._to_dense(), v, 0.0)
        # NεI + UUᵀ is positive definite, but float32 rounding of UUᵀ (~u·max) can swamp Nε
        # and break its Cholesky: the M×M system is formed and solved in float64
        small = sum(part.gram(torch.float64) for part in self.parts)
        small.diagonal().add_(self.examples * damping)
        factor, info = torch.linalg.cholesky_ex(small)
        if int(info) != 0:
            raise ValueError(f"F + {damping:g} I is not numerically positive definite; increase damping")
        coefficients = torch.cholesky_solve(self._times(v).to(torch.float64), factor).to(self.dtype)
        return (v - self._transpose_times(coefficients)) / damping

    def _to_dense(self) -> Tensor:
        rows = torch.cat([part.materialise() for part in self.parts], dim=1)
        return rows.T @ rows / self.examples

    def _diagonal(self) -> Tensor:
        return torch.cat([part.square_sums() for part in self.parts]) / self.examples

    def _trace(self) -> Tensor:
        return self._diagonal().sum()
