"""Accumulate batches into finished statistics and hand them to a representation.

One builder per structure: ``add(batch)`` for every batch, then ``finish(comm)``. F is the mean
over all N examples — of every rank when a :class:`~natgrad.distributed.Communicator` is given:
the sums (not the means) are all-reduced, symmetric ones as upper triangles, with the example
counts, so R ranks give the Fisher of the union of their data; K-FAC normalises as in KFC (Grosse & Martens 2016, "expand"):
A = (1/(N·T)) Σ_{n,t} ā_nt ā_ntᵀ and G = (1/N) Σ_{n,k,t} g_nkt g_nktᵀ, so that for T = 1
(Linear) A ⊗ G is E[ā āᵀ] ⊗ E[J_aᵀ D J_a].
"""

from __future__ import annotations

import torch
from torch import Tensor

from .collect import BatchData, LayerData
from .distributed import Communicator
from .gram import add_block_diagonal_of_gram, add_block_gram
from .layout import Block
from .linalg import gram as symmetric_gram
from .linalg import symmetric_eigh
from .representations.base import BlockDiagonalFisher, FisherMatrix
from .representations.dense import DenseBlock, DenseFisher
from .representations.diagonal import DiagonalFisher
from .representations.ekfac import EKFACBlock, EKFACFisher
from .representations.kfac import KFACBlock, KFACFisher
from .representations.kron_sum import KronSumBlock, KronSumFisher

_CHUNK_ELEMENTS = 2**25


class _Builder:
    def __init__(self, blocks: tuple[Block, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.blocks = blocks
        self.dtype = dtype
        self.device = device
        self.examples = 0

    def add(self, batch: BatchData) -> None:
        self.examples += batch.examples
        self._add(batch)

    def _add(self, batch: BatchData) -> None:
        raise NotImplementedError

    def _reduce_examples(self, comm: Communicator | None) -> None:
        if comm is not None:
            (total,) = comm.all_reduce_numbers([self.examples], "example count")
            self.examples = int(total)

    def finish(self, comm: Communicator | None = None) -> FisherMatrix:
        raise NotImplementedError


class DenseBuilder(_Builder):
    """All blocks (``structure='dense'``) or only the diagonal ones (``'block_diagonal'``).

    The sums are written straight into their final storage — the upper blocks of one P×P
    matrix, or one matrix per block — and the lower blocks are mirrored once in ``finish``.
    """

    def __init__(self, blocks, dtype, device, diagonal_only: bool) -> None:
        super().__init__(blocks, dtype, device)
        self.diagonal_only = diagonal_only
        count = len(blocks)
        self.pairs = [(i, j) for i in range(count) for j in ([i] if diagonal_only else range(i, count))]
        self.dense: Tensor | None = None
        self.sums: dict[tuple[int, int], Tensor]  # views into self.dense, or one matrix per block
        if diagonal_only:
            self.sums = {(i, i): torch.empty(b.size, b.size, dtype=dtype, device=device) for i, b in enumerate(blocks)}
        else:
            size = blocks[-1].stop
            self.dense = torch.empty(size, size, dtype=dtype, device=device)
            self.sums = {(i, j): self.dense[blocks[i].slice, blocks[j].slice] for i, j in self.pairs}
        self.started = False

    def _add(self, batch: BatchData) -> None:
        for i, j in self.pairs:
            add_block_gram(batch, i, j, self.sums[i, j], accumulate=self.started)
        self.started = True

    def finish(self, comm: Communicator | None = None) -> FisherMatrix:
        self._reduce_examples(comm)
        if comm is not None:
            reduced = comm.all_reduce([self.sums[k] for k in self.pairs], [i == j for i, j in self.pairs],
                                      "Fisher blocks")
            for key, value in zip(self.pairs, reduced):
                self.sums[key].copy_(value)
        if self.diagonal_only:
            operators = [DenseBlock(self.sums[i, i].div_(self.examples)) for i in range(len(self.blocks))]
            return BlockDiagonalFisher(self.blocks, operators, self.dtype, self.device)
        for i, j in self.pairs:
            if i != j:
                self.dense[self.blocks[j].slice, self.blocks[i].slice] = self.sums[i, j].T
        return DenseFisher(self.blocks, self.dense.div_(self.examples))


class DiagonalBuilder(_Builder):
    def __init__(self, blocks, dtype, device) -> None:
        super().__init__(blocks, dtype, device)
        self.total = torch.zeros(blocks[-1].stop, dtype=dtype, device=device)

    def _add(self, batch: BatchData) -> None:
        for i, block in enumerate(self.blocks):
            add_block_diagonal_of_gram(batch, i, self.total[block.slice])

    def finish(self, comm: Communicator | None = None) -> FisherMatrix:
        self._reduce_examples(comm)
        if comm is not None:
            (self.total,) = comm.all_reduce([self.total], what="Fisher diagonal")
        return DiagonalFisher(self.blocks, self.total / self.examples)


def input_gram(layer: LayerData) -> Tensor:
    """Σ_{n,t} ā ā ᵀ per group: [G, D, D]; the bias row/column are sums, not a product.

    The products are written straight into the [G, D, D] result (no concatenation of ā).
    """
    n, t, g, d = layer.raw_inputs.shape
    x = layer.raw_inputs.reshape(n * t, g, d)
    size = d + 1 if layer.adapter.has_bias else d
    out = x.new_empty(g, size, size)
    if g == 1:
        symmetric_gram(x[:, 0, :], out=out[0, :d, :d])
    else:
        x = x.transpose(0, 1)
        out[:, :d, :d] = x.mT @ x
    if layer.adapter.has_bias:
        sums = x.sum(0) if g == 1 else x.sum(1)  # [G, D_in]
        out[:, :d, d] = sums.reshape(g, d)
        out[:, d, :d] = sums.reshape(g, d)
        out[:, d, d] = float(n * t)
    return out


def output_gram(layer: LayerData) -> Tensor:
    """Σ_{n,k,t} g gᵀ per group: [G, O, O]."""
    g, o = layer.grads.shape[-2:]
    grads = layer.grads
    if not grads.is_contiguous() and grads.transpose(0, 1).is_contiguous():
        grads = grads.transpose(0, 1)  # the sum runs over all rows: any row order will do
    y = grads.reshape(-1, g, o)
    if g == 1:
        return symmetric_gram(y[:, 0, :]).unsqueeze(0)
    y = y.transpose(0, 1)
    return y.mT @ y


class KFACBuilder(_Builder):
    """Sums of the Kronecker factors; ``keep`` also stores the layer data (for EKFAC)."""

    def __init__(self, blocks, dtype, device) -> None:
        super().__init__(blocks, dtype, device)
        self.input_sums: dict[int, Tensor] = {}
        self.output_sums: dict[int, Tensor] = {}
        self.positions: dict[int, int] = {}
        self.adapters: dict = {}

    def _add(self, batch: BatchData) -> None:
        for i, layer in batch.layers.items():
            a, g = input_gram(layer), output_gram(layer)
            if i in self.input_sums:
                self.input_sums[i] += a
                self.output_sums[i] += g
            else:
                self.input_sums[i], self.output_sums[i] = a, g
                self.positions[i] = layer.raw_inputs.shape[1]
                self.adapters[i] = layer.adapter

    def reduce(self, comm: Communicator | None) -> None:
        """Sum the factors and example counts over the ranks of ``comm`` (one bucketed call)."""
        self._reduce_examples(comm)
        if comm is None:
            return
        keys = list(self.input_sums)
        tensors = [self.input_sums[i] for i in keys] + [self.output_sums[i] for i in keys]
        reduced = comm.all_reduce(tensors, [True] * len(tensors), "Kronecker factors")
        self.input_sums = dict(zip(keys, reduced[: len(keys)]))
        self.output_sums = dict(zip(keys, reduced[len(keys) :]))

    def factors(self) -> dict[int, tuple[Tensor, Tensor]]:
        """{block index: (A [G, D, D], G [G, O, O])}; divides the sums in place (call once, last)."""
        return {
            i: (self.input_sums[i].div_(self.examples * self.positions[i]), self.output_sums[i].div_(self.examples))
            for i in self.input_sums
        }

    def finish(self, comm: Communicator | None = None) -> FisherMatrix:
        self.reduce(comm)
        factors = self.factors()
        operators = [KFACBlock(self.adapters[i], *factors[i]) for i in range(len(self.blocks))]
        return KFACFisher(self.blocks, operators, self.dtype, self.device)


class StoredBuilder(_Builder):
    """Keeps every batch's layer data: the Kronecker-sum blocks and EKFAC need all of it."""

    def __init__(self, blocks, dtype, device, ekfac: bool) -> None:
        super().__init__(blocks, dtype, device)
        self.ekfac = ekfac
        self.kfac = KFACBuilder(blocks, dtype, device) if ekfac else None
        self.stored: dict[int, list[LayerData]] = {i: [] for i in range(len(blocks))}

    def _add(self, batch: BatchData) -> None:
        if self.kfac is not None:
            self.kfac.add(batch)
        for i, layer in batch.layers.items():
            self.stored[i].append(layer)

    def _joined(self, i: int) -> LayerData:
        parts = self.stored[i]
        if len(parts) == 1:
            return parts[0]
        return LayerData(
            parts[0].adapter, torch.cat([p.raw_inputs for p in parts]), torch.cat([p.grads for p in parts])
        )

    def finish(self, comm: Communicator | None = None) -> FisherMatrix:
        """Kron-sum: every rank's layer data is gathered (the exact blocks need each example's
        term). EKFAC: the factors are reduced, every rank takes the same eigenbases, and the
        second moments in them are reduced in a second round."""
        self._reduce_examples(comm)
        layers = [self._joined(i) for i in range(len(self.blocks))]
        if not self.ekfac:
            if comm is not None:
                layers = [LayerData(l.adapter, comm.all_gather_rows(l.raw_inputs, "layer inputs"),
                                    comm.all_gather_rows(l.grads, "layer output gradients")) for l in layers]
            operators = [KronSumBlock(l.adapter, l.inputs, l.grads, self.examples) for l in layers]
            return KronSumFisher(self.blocks, operators, self.dtype, self.device)
        self.kfac.reduce(comm)
        factors = self.kfac.factors()
        bases, moments = [], []
        for i, layer in enumerate(layers):
            _, basis_a = symmetric_eigh(factors[i][0])
            _, basis_g = symmetric_eigh(factors[i][1])
            bases.append((basis_a, basis_g))
            moments.append(eigenbasis_second_moments(layer, basis_a, basis_g))
        if comm is not None:
            moments = comm.all_reduce(moments, what="EKFAC second moments")
        operators = [EKFACBlock(layer.adapter, a, g, m / self.examples) for layer, (a, g), m in zip(layers, bases, moments)]
        return EKFACFisher(self.blocks, operators, self.dtype, self.device)


def projected_inputs(layer: LayerData, basis_a: Tensor) -> Tensor:
    """ā Q_A [N, D] of a simple layer (one position, one group; ``basis_a`` [1, D, D]):
    h Q_A[:D_in] + Q_A[D_in] (the bias row), so ā is never formed."""
    h, q_a = layer.raw_inputs[:, 0, 0, :], basis_a[0]
    return torch.addmm(q_a[-1], h, q_a[:-1]) if layer.adapter.has_bias else h @ q_a


def eigenbasis_second_moments(layer: LayerData, basis_a: Tensor, basis_g: Tensor,
                              projected: Tensor | None = None) -> Tensor:
    """Σ_{n,k} (Q_Gᵀ Γ_nk Q_A)² elementwise, [G, O, D]; Γ_nk = Σ_t g_nkt ā_ntᵀ.

    Simple layers (one position, one group): Σ_n (Σ_k (Q_Gᵀ g_nk)²) ((Q_Aᵀ ā_n)²)ᵀ, three matrix
    products, the first one :func:`projected_inputs` (pass it as ``projected`` if already computed).
    """
    if layer.simple:
        # ā Q_A [N, D], squared in place unless the caller keeps it
        a2 = projected_inputs(layer, basis_a).square_() if projected is None else projected.square()
        q_g = basis_g[0]
        grads = layer.grads[:, :, 0, 0, :]  # [N, K, O], a view of a contiguous [K, N, O]
        g2 = (grads[:, 0] @ q_g).square_()
        for k in range(1, grads.shape[1]):
            g2.add_((grads[:, k] @ q_g).square_())
        return (g2.T @ a2).unsqueeze(0)
    a = torch.einsum("ntgd,gde->ntge", layer.inputs, basis_a)
    g = torch.einsum("nktgo,gop->nktgp", layer.grads, basis_g)
    n, k = g.shape[:2]
    groups, o, d = g.shape[3], g.shape[4], a.shape[3]
    total = a.new_zeros(groups, o, d)
    step = max(1, _CHUNK_ELEMENTS // max(1, k * groups * o * d))
    for s in range(0, n, step):
        total += torch.einsum("ntgd,nktgo->nkgod", a[s : s + step], g[s : s + step]).pow(2).sum((0, 1))
    return total
