"""The full Fisher, matrix-free: F v = (1/N) Σ_n J_nᵀ D̃_n J_n v with no P×P storage.

J_n v comes from forward-mode AD (``torch.func.jvp``), Jᵀ u from the reverse-mode pullback
kept from construction (``torch.func.vjp``: the forward is not recomputed per product). For
modules without forward-mode AD (e.g. CPU flash attention) J v is taken by reverse-over-reverse
on the pullback instead. Parameters, buffers and modes are copied at construction, so later
changes to the model do not change F.
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
    output_like: Tensor  # zeros of the output's shape


def jvp_by_double_vjp(pullback, output_like: Tensor, v: Tensor, flatten) -> Tensor:
    """J v = ∂(Jᵀu · v)/∂u, differentiating the (linear) pullback with respect to u."""
    with torch.enable_grad():
        u = output_like.clone().requires_grad_(True)
        (pulled,) = pullback(u)
        (jv,) = torch.autograd.grad(flatten(pulled), u, v)
    return jv


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
        self._reverse_only = False

    def _unflatten(self, v: Tensor) -> dict[str, Tensor]:
        pieces = torch.split(v, [numel for _, _, numel in self._shapes])
        return {name: piece.view(shape) for (name, shape, _), piece in zip(self._shapes, pieces)}

    def _flatten(self, grads: dict[str, Tensor]) -> Tensor:
        return torch.cat([grads[name].reshape(-1) for name, _, _ in self._shapes])

    def _jvp(self, batch: ImplicitBatch, tangent: dict[str, Tensor], v: Tensor) -> Tensor:
        if not self._reverse_only:
            try:
                return jvp(lambda p: self.function(p, batch.inputs), (self.params,), (tangent,))[1]
            except NotImplementedError:  # a module without forward-mode AD
                self._reverse_only = True
        return jvp_by_double_vjp(batch.pullback, batch.output_like, v, self._flatten)

    def _product(self, v: Tensor) -> Tensor:
        tangent = self._unflatten(v)
        total = torch.zeros_like(v)
        for batch in self.batches:
            (pulled,) = batch.pullback(batch.curvature(self._jvp(batch, tangent, v)))
            total += self._flatten(pulled)
        return total / self.examples

    def _mv(self, v: Tensor) -> Tensor:
        return torch.stack([self._product(v[:, j]) for j in range(v.shape[1])], dim=1)
