"""J v and Jᵀ u on the graph that produced an output, with no second forward pass.

Jᵀ u is an ordinary backward (:func:`batched_vjp` for several u at once). For J v, g(u) = Jᵀ u is built once with ``create_graph`` for a
dummy u (it is linear in u), and ∂(g(u)·v)/∂u = J v is one more backward through that graph
(the double-backward trick).
"""

from __future__ import annotations

import torch
from torch import Tensor


def batched_vjp(output: Tensor, inputs: list[Tensor], vectors: list[Tensor], retain_graph: bool) -> list[Tensor]:
    """∂⟨output, v_k⟩/∂x for every input x and vector v_k: [K, *x.shape] per input (zeros where
    ``output`` does not depend on x).

    Several vectors go through one vmapped backward (``is_grads_batched``); graphs with an
    operation vmap cannot batch fall back to one backward per vector.
    """
    count = len(vectors)
    if count > 1:
        try:
            grads = torch.autograd.grad(output, inputs, torch.stack(vectors), retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
        except RuntimeError:
            pass
        else:
            return [x.new_zeros((count,) + x.shape) if g is None else g for x, g in zip(inputs, grads)]
    columns: list[list[Tensor]] = [[] for _ in inputs]
    for k, v in enumerate(vectors):
        grads = torch.autograd.grad(output, inputs, v, retain_graph=retain_graph or k < count - 1, allow_unused=True)
        for column, x, g in zip(columns, inputs, grads):
            column.append(torch.zeros_like(x) if g is None else g)
    return [column[0].unsqueeze(0) if count == 1 else torch.stack(column) for column in columns]


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
        """[J v for v in vectors], through one vmapped double backward when there are several."""
        self._build_pullback()
        return [jv.detach() for jv in batched_vjp(self._pullback, [self._dummy], vectors, retain_graph=True)[0]]

    def jvp(self, v: Tensor) -> Tensor:
        return self.jvps([v])[0]

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
