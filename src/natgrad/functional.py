"""The model as a pure function of its parameters (torch.func), for what hooks cannot give:
per-example gradients of arbitrary modules, and Jacobian-vector products.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap


def snapshot(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(trainable parameters, everything else: frozen parameters and buffers), detached."""
    params, others = {}, {}
    for name, p in model.named_parameters():
        (params if p.requires_grad else others)[name] = p.detach()
    for name, b in model.named_buffers():
        others[name] = b.detach()
    return params, others


def model_function(model: nn.Module, others: dict[str, Tensor]) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """f(params, x) = model(x) with ``params`` substituted for the trainable parameters."""

    def f(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, {**others, **params}, (x,))

    return f


def per_example_gradients(
    model: nn.Module, inputs: Tensor, vectors: list[Tensor], names: list[str]
) -> dict[str, Tensor]:
    """J_nᵀ v_nk for the parameters ``names``: {name: [N, K, *shape]}.

    ``vectors`` are K tensors [N, *out]; each example runs through the model alone (batch of 1),
    so this is exact for any module that treats examples independently.
    """
    params, others = snapshot(model)
    chosen = {n: params[n] for n in names}
    fixed = {**others, **{n: p for n, p in params.items() if n not in chosen}}
    f = model_function(model, fixed)
    stacked = torch.stack(vectors, dim=1)  # [N, K, *out]

    def one_example(x: Tensor, v: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(lambda p: f(p, x.unsqueeze(0)).squeeze(0), chosen)
        return vmap(lambda u: pullback(u)[0])(v)

    return vmap(one_example)(inputs, stacked)
