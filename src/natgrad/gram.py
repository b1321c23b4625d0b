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
    return _flat_block(z.view(o_i, o_j, d_i, d_j), li.adapter.has_bias, lj.adapter.has_bias)


def _linear_gram_same(layer: LayerData) -> Tensor:
    a = layer.inputs[:, 0, 0, :]
    g = layer.grads[:, :, 0, 0, :]
    o, d = g.shape[-1], a.shape[-1]
    pairs_o, pairs_d = _upper_pairs(o, a.device), _upper_pairs(d, a.device)
    z = a.new_zeros(pairs_o.numel(), pairs_d.numel())
    step = _rows_per_chunk(o * o + d * d)
    for s in range(0, a.shape[0], step):
        gs, as_ = g[s : s + step], a[s : s + step]
        x = torch.einsum("nko,nkp->nop", gs, gs).flatten(1).index_select(1, pairs_o)
        y = torch.einsum("nd,ne->nde", as_, as_).flatten(1).index_select(1, pairs_d)
        z += x.T @ y
    # Expand the pairs to the 4-index tensor T[o, p, d, e] (symmetric in (o, p) and in (d, e)).
    full = z.index_select(0, _pair_table(o).to(a.device).reshape(-1))
    full = full.index_select(1, _pair_table(d).to(a.device).reshape(-1))
    return _flat_block(full.view(o, o, d, d), layer.adapter.has_bias, layer.adapter.has_bias)


def _flat_block(t: Tensor, bias_i: bool, bias_j: bool) -> Tensor:
    """T[o, p, d, e] = F[(o, d), (p, e)] in joint-matrix indices -> the block in flat order
    (weights row-major, then biases) by slicing off the bias coordinate: no gathers."""
    o_i, o_j, d_i, d_j = t.shape
    w_i, w_j = d_i - int(bias_i), d_j - int(bias_j)
    rows = [torch.cat(
        [t[:, :, :w_i, :w_j].permute(0, 2, 1, 3).reshape(o_i * w_i, o_j * w_j)]
        + ([t[:, :, :w_i, w_j].permute(0, 2, 1).reshape(o_i * w_i, o_j)] if bias_j else []),
        dim=1,
    )]
    if bias_i:
        rows.append(torch.cat(
            [t[:, :, w_i, :w_j].reshape(o_i, o_j * w_j)] + ([t[:, :, w_i, w_j]] if bias_j else []), dim=1
        ))
    return torch.cat(rows, dim=0)


def _upper_pairs(n: int, device: torch.device) -> Tensor:
    """Flat indices i·n + j of the pairs i ≤ j, in triu order."""
    i, j = torch.triu_indices(n, n, device=device)
    return i * n + j


@lru_cache(maxsize=32)
def _pair_table(n: int) -> Tensor:
    i, j = torch.triu_indices(n, n)
    table = torch.empty(n, n, dtype=torch.long)
    table[i, j] = torch.arange(i.numel())
    table[j, i] = torch.arange(i.numel())
    return table
