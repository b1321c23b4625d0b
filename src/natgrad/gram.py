"""Blocks of Σ_n Σ_k u_nk u_nkᵀ (u = per-example gradients) without stacking per-example gradients
where the layer structure allows it.

For two Linear layers on [N, in] inputs the per-example gradient of layer l is g^l_nk ⊗ ā^l_n
(row-major), so the (l, m) block is
    Σ_n (Σ_k g^l_nk g^m_nkᵀ) ⊗ (ā^l_n ā^m_nᵀ),
one matrix product over examples of [N, O_l·O_m] by [N, D_l·D_m] — K times fewer FLOPs than
stacking K per-example gradients. On a diagonal block both factors are symmetric, so only the
pairs o ≤ p and d ≤ e are computed (¼ of the products) and the block is gathered from them.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .collect import BatchData, LayerData

_CHUNK_ELEMENTS = 2**25


def block_gram(batch: BatchData, i: int, j: int) -> Tensor:
    """Σ_n Σ_k u^i_nk u^j_nkᵀ, shape [size_i, size_j], in flat parameter order."""
    li, lj = batch.layers.get(i), batch.layers.get(j)
    if li is not None and lj is not None and li.simple and lj.simple:
        return _linear_gram_same(li) if i == j else _linear_gram_pair(li, lj)
    ui, uj = batch.per_example(i), batch.per_example(j)
    return ui.reshape(-1, ui.shape[-1]).T @ uj.reshape(-1, uj.shape[-1])


def block_diagonal_of_gram(batch: BatchData, i: int) -> Tensor:
    """diag of Σ_n Σ_k u_nk u_nkᵀ for block i: Σ_n (Σ_k g²) ⊗ ā² on simple layers."""
    layer = batch.layers.get(i)
    if layer is not None and layer.simple:
        g2 = layer.grads[:, :, 0, 0, :].pow(2).sum(1)  # [N, O]
        a2 = layer.inputs[:, 0, 0, :].pow(2)  # [N, D]
        return layer.adapter.from_matrix((g2.T @ a2).unsqueeze(0))
    return batch.per_example(i).pow(2).sum((0, 1))


def _rows_per_chunk(width: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, width))


def _linear_gram_pair(li: LayerData, lj: LayerData) -> Tensor:
    a_i, a_j = li.inputs[:, 0, 0, :], lj.inputs[:, 0, 0, :]
    g_i, g_j = li.grads[:, :, 0, 0, :], lj.grads[:, :, 0, 0, :]
    (o_i, d_i), (o_j, d_j) = (g_i.shape[-1], a_i.shape[-1]), (g_j.shape[-1], a_j.shape[-1])
    z = a_i.new_zeros(o_i * o_j, d_i * d_j)
    step = _rows_per_chunk(o_i * o_j + d_i * d_j)
    for s in range(0, a_i.shape[0], step):
        x = torch.einsum("nko,nkp->nop", g_i[s : s + step], g_j[s : s + step]).flatten(1)
        y = torch.einsum("nd,ne->nde", a_i[s : s + step], a_j[s : s + step]).flatten(1)
        z += x.T @ y
    block = z.view(o_i, o_j, d_i, d_j).permute(0, 2, 1, 3).reshape(o_i * d_i, o_j * d_j)
    rows = _matrix_to_flat(li)
    cols = _matrix_to_flat(lj)
    return block[rows][:, cols]


def _linear_gram_same(layer: LayerData) -> Tensor:
    a = layer.inputs[:, 0, 0, :]
    g = layer.grads[:, :, 0, 0, :]
    o, d = g.shape[-1], a.shape[-1]
    io, jo = torch.triu_indices(o, o, device=a.device)
    id_, jd = torch.triu_indices(d, d, device=a.device)
    z = a.new_zeros(io.numel(), id_.numel())
    step = _rows_per_chunk(g.shape[1] * io.numel() + id_.numel())
    for s in range(0, a.shape[0], step):
        gs, as_ = g[s : s + step], a[s : s + step]
        x = (gs[:, :, io] * gs[:, :, jo]).sum(1)
        y = as_[:, id_] * as_[:, jd]
        z += x.T @ y
    index = _symmetric_gather_index(o, d, tuple(layer.adapter.flat_index().tolist())).to(a.device)
    return z.reshape(-1)[index]


def _matrix_to_flat(layer: LayerData) -> Tensor:
    """Row selector taking joint-matrix order (o, d) to flat parameter order."""
    return torch.argsort(layer.adapter.flat_index()).to(layer.grads.device)


@lru_cache(maxsize=16)
def _symmetric_gather_index(o: int, d: int, flat_index: tuple[int, ...]) -> Tensor:
    """[P, P] positions into the (o≤p, d≤e) pair products giving the block in flat order."""
    pair_o = _pair_table(o)
    pair_d = _pair_table(d)
    inverse = torch.argsort(torch.tensor(flat_index))
    rows_o, rows_d = inverse // d, inverse % d
    n_d = d * (d + 1) // 2
    return pair_o[rows_o[:, None], rows_o[None, :]] * n_d + pair_d[rows_d[:, None], rows_d[None, :]]


def _pair_table(n: int) -> Tensor:
    i, j = torch.triu_indices(n, n)
    table = torch.empty(n, n, dtype=torch.long)
    table[i, j] = torch.arange(i.numel())
    table[j, i] = torch.arange(i.numel())
    return table
