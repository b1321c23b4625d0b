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
from .linalg import gram as symmetric_gram

_CHUNK_ELEMENTS = 2**25
_EXPAND_ELEMENTS = 2**20  # entries of a diagonal block expanded from its pair sums at once


def add_block_gram(batch: BatchData, i: int, j: int, out: Tensor, accumulate: bool) -> None:
    """``out`` (+)= Σ_n Σ_k u^i_nk u^j_nkᵀ, [size_i, size_j] in flat parameter order.

    ``out`` may be a view (a block of the dense matrix): every path writes into it directly.
    With ``accumulate`` the block is added, otherwise it overwrites ``out``. Simple Linear
    layers use the factored products on diagonal blocks, and on off-diagonal ones when K > 1
    (for K = 1 the per-example product has the same FLOPs and no pair tensors to build).
    """
    li, lj = batch.layers.get(i), batch.layers.get(j)
    if li is not None and lj is not None and li.simple and lj.simple:
        bias_i, bias_j = li.adapter.has_bias, lj.adapter.has_bias
        if i == j:
            _put_symmetric(out, _linear_gram_same(li), li.grads.shape[-1], li.inputs.shape[-1], bias_i, accumulate)
        elif li.grads.shape[1] > 1:
            _put_joint(out, _linear_gram_pair(li, lj), bias_i, bias_j, accumulate)
        else:  # K = 1: per-example gradients, a chunk of examples at a time
            product = out.new_zeros(out.shape)
            step = _rows_per_chunk(li.adapter.size + lj.adapter.size)
            for s in range(0, li.raw_inputs.shape[0], step):
                ui, uj = (LayerData(layer.adapter, layer.raw_inputs[s : s + step], layer.grads[s : s + step]).per_example()
                          for layer in (li, lj))
                product.addmm_(ui.flatten(0, 1).T, uj.flatten(0, 1))
            _store(out, product, accumulate)
        return
    ui = batch.per_example(i).flatten(0, 1)
    if i == j:
        product = symmetric_gram(ui)
    else:
        product = ui.T @ batch.per_example(j).flatten(0, 1)
    _store(out, product, accumulate)


def _store(out: Tensor, value: Tensor, accumulate: bool) -> None:
    if accumulate:
        out.add_(value)
    else:
        out.copy_(value)


def add_block_diagonal_of_gram(batch: BatchData, i: int, out: Tensor) -> None:
    """out += diag of Σ_n Σ_k u_nk u_nkᵀ for block i (``out`` [size_i], a view is fine).

    On simple layers the weight part is Σ_n (Σ_k g²) ⊗ h², one product accumulated in place into
    the [O, D_in] view of ``out``, and the bias part Σ_n Σ_k g² (ā's last entry is 1).
    """
    layer = batch.layers.get(i)
    if layer is None or not layer.simple:
        out += batch.per_example(i).pow(2).sum((0, 1))
        return
    g = layer.grads[:, :, 0, 0, :]  # [N, K, O], usually a view of a contiguous [K, N, O]
    g2 = g[:, 0].square()  # Σ_k g² [N, O], one fused pass per k
    for k in range(1, g.shape[1]):
        g2.addcmul_(g[:, k], g[:, k])
    h2 = layer.raw_inputs[:, 0, 0, :].square()  # [N, D_in]
    adapter = layer.adapter
    out[: adapter.weight_numel].view(adapter.out_features, -1).addmm_(g2.T, h2)
    if adapter.has_bias:
        out[adapter.weight_numel :] += g2.sum(0)


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
    return z.view(o_i, o_j, d_i, d_j)


def _linear_gram_same(layer: LayerData) -> Tensor:
    a = layer.inputs[:, 0, 0, :]
    g = layer.grads[:, :, 0, 0, :]
    o, d = g.shape[-1], a.shape[-1]
    z = a.new_zeros(o * (o + 1) // 2, d * (d + 1) // 2)
    step = _rows_per_chunk(o * o + d * d)
    for s in range(0, a.shape[0], step):
        x = _upper_pair_products(g[s : s + step].permute(2, 1, 0))  # [o(o+1)/2, n]
        y = _upper_pair_products(a[s : s + step].T.unsqueeze(1))  # [d(d+1)/2, n]
        z.addmm_(x, y.T)
    return z


def _upper_pair_products(v: Tensor) -> Tensor:
    """Σ_k v[p, k, n] v[q, k, n] for every pair p ≤ q (triu order): v [P, K, N] -> [P(P+1)/2, N].

    Built one row stripe p at a time into a contiguous result: N stays the fast dimension, so
    the stripes are plain broadcast products (3x faster than an outer product and a gather).
    """
    count, k, n = v.shape
    v = v.contiguous()
    out = v.new_empty(count * (count + 1) // 2, n)
    offset = 0
    for p in range(count):
        rows = out[offset : offset + count - p]
        if k == 1:
            torch.mul(v[p], v[p:, 0], out=rows)
        else:
            torch.sum(v[p] * v[p:], dim=1, out=rows)
        offset += count - p
    return out


def _put_symmetric(out: Tensor, z: Tensor, o: int, d: int, bias: bool, accumulate: bool) -> None:
    """Expand the pair sums z [o(o+1)/2, d(d+1)/2] of a diagonal block to T[o, p, d, e] (symmetric
    in (o, p) and in (d, e)) and write it into ``out``, a few rows of o at a time (small
    temporaries instead of two copies of the whole block)."""
    rows, cols = _pair_table(o).to(z.device), _pair_table(d).to(z.device).reshape(-1)
    step = max(1, _EXPAND_ELEMENTS // (o * d * d))
    for start in range(0, o, step):
        t = z.index_select(0, rows[start : start + step].reshape(-1)).index_select(1, cols)
        _put_joint(out, t.view(-1, o, d, d), bias, bias, accumulate, first=start, total=o)


def _put_joint(out: Tensor, t: Tensor, bias_i: bool, bias_j: bool, accumulate: bool,
               first: int = 0, total: int | None = None) -> None:
    """Write T[o, p, d, e] = F[(o, d), (p, e)] (joint-matrix indices, d = D_in is the bias
    coordinate) into the flat-order block ``out``: strided copies into views, no gathers.
    ``t`` may hold only the rows o = first, …, first + len(t) − 1 of ``total``."""
    count, o_j, d_i, d_j = t.shape
    o_i = count if total is None else total
    w_i, w_j = d_i - int(bias_i), d_j - int(bias_j)
    rows, cols = o_i * w_i, o_j * w_j
    chunk = slice(first, first + count)
    parts = [(out[:rows, :cols].view(o_i, w_i, o_j, w_j)[chunk], t[:, :, :w_i, :w_j].permute(0, 2, 1, 3))]
    if bias_j:
        parts.append((out[:rows, cols:].view(o_i, w_i, o_j)[chunk], t[:, :, :w_i, w_j].permute(0, 2, 1)))
    if bias_i:
        parts.append((out[rows:, :cols].view(o_i, o_j, w_j)[chunk], t[:, :, w_i, :w_j]))
    if bias_i and bias_j:
        parts.append((out[rows:, cols:][chunk], t[:, :, w_i, w_j]))
    for target, source in parts:
        _store(target, source, accumulate)


@lru_cache(maxsize=32)
def _pair_table(n: int) -> Tensor:
    i, j = torch.triu_indices(n, n)
    table = torch.empty(n, n, dtype=torch.long)
    table[i, j] = torch.arange(i.numel())
    table[j, i] = torch.arange(i.numel())
    return table
