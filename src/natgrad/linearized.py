"""J v and Jᵀ u on the graph that produced an output, with no second forward pass.

Jᵀ u is an ordinary backward (:func:`batched_vjp` for several u at once). For J v, g(u) = Jᵀ u is
built once with ``create_graph`` for a dummy u (it is linear in u), and ∂(g(u)·v)/∂u = J v is one
more backward through that graph (the double-backward trick). :func:`backward_with_pullback`
builds g(u) during the user's own ``loss.backward()``, so J v then costs that one backward only.
"""

from __future__ import annotations

import warnings

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
    """``output`` [N, *out] of ``params`` (its graph must be alive); vectors are flat.

    ``pullback``: (u, g) with g = Jᵀu + c as flat [P] built with a graph in the leaf u of
    ``output``'s shape (c constant in u); built on first use of :meth:`jvps` if not given.
    """

    def __init__(self, output: Tensor, params: list[Tensor], pullback: tuple[Tensor, Tensor] | None = None) -> None:
        self.output = output
        self.params = params
        self._dummy, self._pullback = pullback if pullback is not None else (None, None)

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
                self._pullback = _flat(self.params, grads)


def _flat(params: list[Tensor], grads: list[Tensor | None]) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def backward_with_pullback(loss: Tensor, output: Tensor, params: list[Tensor]) -> LinearizedOutput | None:
    """``loss.backward()`` that also returns ``output``'s linearization with its pullback built.

    A hook swaps the gradient reaching ``output`` for a leaf u of the same value, and the
    backward runs with ``create_graph``: every gradient is then Jᵀu plus terms that do not pass
    through ``output`` (a regulariser's), as a graph in u — the pullback :meth:`LinearizedOutput.jvps`
    needs, built by the backward the user pays for anyway instead of a second one. The ``.grad``
    fields are left detached (no graph, no parameter↔gradient reference cycle) and hold the same
    values as after a plain ``loss.backward()``; previously accumulated gradients add as usual.
    The backward's own graph lives as long as the returned object (memory: about one more set of
    the backward's intermediate gradients). Returns None if no gradient reached ``output``.
    """
    leaves: list[Tensor] = []

    def swap(grad: Tensor) -> Tensor:
        leaves.append(grad.detach().requires_grad_())
        return leaves[-1]

    handle = output.register_hook(swap)
    try:
        with warnings.catch_warnings():  # the cycle it warns of is cut below
            warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
            loss.backward(create_graph=True)
    finally:
        handle.remove()
    grads = [p.grad for p in params]
    for p in params:
        if p.grad is not None and p.grad.requires_grad:
            p.grad = p.grad.detach()
    if len(leaves) != 1:
        return None
    with torch.enable_grad():
        return LinearizedOutput(output, params, (leaves[0], _flat(params, grads)))
