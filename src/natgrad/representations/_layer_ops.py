"""Helpers shared by the per-layer block operators (K-FAC, EKFAC, Kronecker sum)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layers.base import LayerAdapter


def to_matrices(adapter: LayerAdapter, v: Tensor) -> Tensor:
    """Columns of v [size, m] -> joint matrices [m, G, O, D]."""
    return adapter.to_matrix(v.T)


def from_matrices(adapter: LayerAdapter, matrices: Tensor) -> Tensor:
    """Joint matrices [m, G, O, D] -> columns [size, m]."""
    return adapter.from_matrix(matrices).T


def matrix_order_to_flat(adapter: LayerAdapter, dense: Tensor) -> Tensor:
    """A [size, size] matrix indexed in joint-matrix order (g, o, d) -> flat parameter order."""
    inverse = torch.argsort(adapter.flat_index().to(dense.device))
    return dense[inverse][:, inverse]


def per_group_kron(left: Tensor, right: Tensor) -> Tensor:
    """block_diag over groups of kron(left_g, right_g); left [G, O, O], right [G, D, D]."""
    return torch.block_diag(*[torch.kron(l, r) for l, r in zip(left, right)])
