"""The full Fisher, matrix-free: F v = (1/N) Σ_n J_nᵀ D̃_n J_n v with no P×P storage.

J_n v comes from forward-mode AD (``torch.func.jvp``), Jᵀ u from the reverse-mode pullback
kept from construction (``torch.func.vjp``: the forward is not recomputed per product).
D̃_n is the output curvature of the estimator: the closed-form D for ``exact``, Σ_k v_k v_kᵀ for
``mc``/``empirical`` with the vectors fixed at construction (so F is one fixed matrix).
Solves use conjugate gradient; ``to_dense``/``diagonal`` push the identity through products
(P products: meant for checking small models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.func import jvp

from ..layout import Block
from .base import FisherMatrix


@dataclass
class ImplicitBatch:
    """One batch: its inputs, the pullback of f at them, and u ↦ D̃ u on the output."""

    inputs: Tensor
    pullback: Callable[[Tensor], tuple[dict[str, Tensor]]]
    curvature: Callable[[Tensor], Tensor]


class ImplicitFisher(FisherMatrix):
    """``function(params, x)`` evaluates the model with ``params`` ({name: tensor}) substituted."""

    def __init__(
        self,
        blocks: tuple[Block, ...],
        function: Callable[[dict[str, Tensor], Tensor], Tensor],
        params: dict[str, Tensor],
        batches: list[ImplicitBatch],
        examples: int,
    ) -> None:
        first = next(iter(params.values()))
        super().__init__(blocks, first.dtype, first.device)
        self.function = function
        self.params = params
        self.batches = batches
        self.examples = examples
        self._shapes = [(name, p.shape, p.numel()) for name, p in params.items()]

    def _unflatten(self, v: Tensor) -> dict[str, Tensor]:
        pieces = torch.split(v, [numel for _, _, numel in self._shapes])
        return {name: piece.view(shape) for (name, shape, _), piece in zip(self._shapes, pieces)}

    def _flatten(self, grads: dict[str, Tensor]) -> Tensor:
        return torch.cat([grads[name].reshape(-1) for name, _, _ in self._shapes])

    def _product(self, v: Tensor) -> Tensor:
        tangent = self._unflatten(v)
        total = torch.zeros_like(v)
        for batch in self.batches:
            _, jv = jvp(lambda p: self.function(p, batch.inputs), (self.params,), (tangent,))
            (pulled,) = batch.pullback(batch.curvature(jv))
            total += self._flatten(pulled)
        return total / self.examples

    def _mv(self, v: Tensor) -> Tensor:
        return torch.stack([self._product(v[:, j]) for j in range(v.shape[1])], dim=1)
