"""The exact layer blocks kept in factored form (a sum of Kronecker products), matrix-free.

For a layer with joint matrix M [G, O, D] the exact block is
F_l = (1/N) Σ_n Σ_k vec(Γ_nk) vec(Γ_nk)ᵀ,  Γ_nk = Σ_t g_nkt ā_ntᵀ,
i.e. (1/N) Σ_n Σ_{t,t'} [ā_nt ā_nt'ᵀ] ⊗ [Σ_k g_nkt g_nkt'ᵀ] — for a Linear layer (T = 1)
exactly (1/N) Σ_n [h;1][h;1]ᵀ ⊗ J_aᵀ D J_a, the factored formula with the bias. A product
needs only the stored ā and g:
F_l vec(V) = (1/N) Σ_nk ⟨Γ_nk, V⟩ Γ_nk with ⟨Γ_nk, V⟩ = Σ_t g_nktᵀ V ā_nt.
Solves run conjugate gradient block by block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers.base import LayerAdapter
from ..linalg import conjugate_gradient, default_tolerance
from ._layer_ops import from_matrices, to_matrices
from .base import BlockDiagonalFisher, BlockOperator

_CHUNK_ELEMENTS = 2**25  # bound on per-example gradient entries materialised at once


class KronSumBlock(BlockOperator):
    """``inputs`` ā [N, T, G, D], ``grads`` g [N, K, T, G, O], ``examples`` N (the mean's divisor)."""

    def __init__(self, adapter: LayerAdapter, inputs: Tensor, grads: Tensor, examples: int) -> None:
        self.adapter = adapter
        self.inputs = inputs
        self.grads = grads
        self.examples = examples
        self.size = adapter.size

    def mv(self, v: Tensor) -> Tensor:
        m = to_matrices(self.adapter, v)  # [m, G, O, D]
        mapped = torch.einsum("ntgd,mgod->mntgo", self.inputs, m)  # V ā_nt
        inner = torch.einsum("nktgo,mntgo->mnk", self.grads, mapped)  # ⟨Γ_nk, V⟩
        weighted = torch.einsum("mnk,nktgo->mntgo", inner, self.grads)
        result = torch.einsum("mntgo,ntgd->mgod", weighted, self.inputs) / self.examples
        return from_matrices(self.adapter, result)

    def solve(self, v, damping, tol, max_iter) -> Tensor:
        tol = default_tolerance(v.dtype) if tol is None else tol
        max_iter = 2 * self.size + 10 if max_iter is None else max_iter
        return conjugate_gradient(self.mv, v, damping, tol, max_iter)

    def _chunks(self):
        n, k = self.grads.shape[:2]
        step = max(1, _CHUNK_ELEMENTS // max(1, k * self.size))
        for i in range(0, n, step):
            yield self.adapter.per_example_gradients(self.inputs[i : i + step], self.grads[i : i + step])

    def to_dense(self) -> Tensor:
        dense = self.inputs.new_zeros(self.size, self.size)
        for u in self._chunks():
            flat = u.reshape(-1, self.size)
            dense += flat.T @ flat
        return dense / self.examples

    def diagonal(self) -> Tensor:
        diag = self.inputs.new_zeros(self.size)
        for u in self._chunks():
            diag += u.pow(2).sum((0, 1))
        return diag / self.examples


class KronSumFisher(BlockDiagonalFisher):
    """Block-diagonal Fisher whose blocks are the exact layer blocks in factored form."""
