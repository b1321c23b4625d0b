"""The full Fisher, matrix-free: F v = (1/N) Σ_n J_nᵀ D̃_n J_n v with no P×P storage.

Each batch keeps the graph of one forward pass at construction (parameters, buffers and modes
copied then, so later changes to the model do not change F). Jᵀu is a backward through it;
J v is reverse-over-reverse on the same graph (:class:`~natgrad.linearized.LinearizedOutput`):
no forward is recomputed per product, ~1.4× a forward+backward here against ~2.3× for
forward-mode ``torch.func.jvp``, which remains the fallback for operations without a double
backward. D̃_n is the output curvature of the estimator: the closed-form D for ``exact``,
Σ_k v_k v_kᵀ for ``mc``/``empirical`` with the vectors fixed at construction (so F is one fixed
matrix). Solves use conjugate gradient; ``to_dense``/``diagonal`` push the identity through
products (P products: meant for checking small models).

Distributed (``natgrad.fisher(..., process_group=...)``): each rank keeps the batches of its own
examples and ``examples`` is the total N over the ranks; a product all-reduces the local sums
Σ_n J_nᵀ D̃_n J_n V (one all-reduce per product, all columns of V together), so every rank gets
the same F V. Products, ``solve`` (conjugate gradient then runs in lockstep: every rank sees the
same residuals), ``to_dense``, ``diagonal`` and ``trace`` are therefore collective: every rank
must call them, in the same order, with the same vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.func import jvp

from ..distributed import Communicator
from ..layout import Block
from ..linearized import LinearizedOutput
from .base import FisherMatrix


@dataclass
class ImplicitBatch:
    """One batch: its inputs, the model linearised at them, and u ↦ D̃ u on the output."""

    inputs: Tensor
    linearized: LinearizedOutput
    curvature: Callable[[Tensor], Tensor]


class ImplicitFisher(FisherMatrix):
    """``function(params, x)`` evaluates the model with ``params`` ({name: tensor}) substituted;
    every batch's ``linearized`` output was computed from these ``params``. ``examples`` is N
    (over all ranks of ``comm``, which sums every product over the ranks; ``None``: one process)."""

    def __init__(
        self,
        blocks: tuple[Block, ...],
        function: Callable[[dict[str, Tensor], Tensor], Tensor],
        params: dict[str, Tensor],
        batches: list[ImplicitBatch],
        examples: int,
        comm: Communicator | None = None,
    ) -> None:
        first = next(iter(params.values()))
        super().__init__(blocks, first.dtype, first.device)
        self.function = function
        self.params = params
        self.batches = batches
        self.examples = examples
        self.comm = comm
        self._shapes = [(name, p.shape, p.numel()) for name, p in params.items()]
        self._forward_mode = False

    def _unflatten(self, v: Tensor) -> dict[str, Tensor]:
        pieces = torch.split(v, [numel for _, _, numel in self._shapes])
        return {name: piece.view(shape) for (name, shape, _), piece in zip(self._shapes, pieces)}

    def _jvp(self, batch: ImplicitBatch, v: Tensor) -> Tensor:
        if not self._forward_mode:
            try:
                return batch.linearized.jvp(v)
            except (RuntimeError, NotImplementedError):  # an operation without double backward
                self._forward_mode = True
        params = {n: p.detach() for n, p in self.params.items()}
        return jvp(lambda p: self.function(p, batch.inputs), (params,), (self._unflatten(v),))[1]

    def _local_sum(self, v: Tensor) -> Tensor:
        """Σ_n J_nᵀ D̃_n J_n v over this process's batches, v [P]."""
        total = torch.zeros_like(v)
        with torch.enable_grad():
            for batch in self.batches:
                total += batch.linearized.vjp(batch.curvature(self._jvp(batch, v)))
        return total

    def _mv(self, v: Tensor) -> Tensor:
        total = torch.stack([self._local_sum(v[:, j]) for j in range(v.shape[1])], dim=1)
        if self.comm is not None:
            (total,) = self.comm.all_reduce([total], what="implicit Fisher product")
        return total / self.examples
