"""J v and Jᵀ u on the graph that produced an output, with no second forward pass.

Jᵀ u is an ordinary backward. For J v, g(u) = Jᵀ u is built once with ``create_graph`` for a
dummy u (it is linear in u), and ∂(g(u)·v)/∂u = J v is one more backward through that graph
(the double-backward trick).
"""

from __future__ import annotations

import torch
from torch import Tensor


class LinearizedOutput:
    """``output`` [N, *out] of ``params`` (its graph must be alive); vectors are flat."""

    def __init__(self, output: Tensor, params: list[Tensor]) -> None:
        self.output = output
        self.params = params
        self._dummy: Tensor | None = None
        self._pullback: Tensor | None = None

    def vjp(self, u: Tensor) -> Tensor:
        grads = torch.autograd.grad(self.output, self.params, u, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(self.params, grads)])

    def jvps(self, vectors: list[Tensor]) -> list[Tensor]:
        """[J v for v in vectors], all through one vmapped double backward when there are several
        (the loop when the graph has an operation vmap cannot batch)."""
        if len(vectors) > 1:
            self._build_pullback()
            try:
                (jv,) = torch.autograd.grad(self._pullback, self._dummy, torch.stack(vectors), retain_graph=True,
                                            allow_unused=True, is_grads_batched=True)
            except RuntimeError:
                pass
            else:
                return [torch.zeros_like(self.output) for _ in vectors] if jv is None else list(jv.detach().unbind(0))
        return [self.jvp(v) for v in vectors]

    def jvp(self, v: Tensor) -> Tensor:
        self._build_pullback()
        (jv,) = torch.autograd.grad(self._pullback, self._dummy, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.output) if jv is None else jv.detach()

    def _build_pullback(self) -> None:
        if self._dummy is None:
            with torch.enable_grad():
                self._dummy = torch.zeros_like(self.output, requires_grad=True)
                grads = torch.autograd.grad(
                    self.output, self.params, self._dummy, create_graph=True, allow_unused=True
                )
                self._pullback = torch.cat(
                    [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(self.params, grads)]
                )
