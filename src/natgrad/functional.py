"""The model as a pure function of its parameters (torch.func), for what hooks cannot give:
per-example gradients of arbitrary modules, and Jacobian-vector products.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel


def snapshot(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(trainable parameters, everything else: frozen parameters and buffers), detached copies:
    later changes to the model do not reach a function built from them."""
    params, others = {}, {}
    for name, p in model.named_parameters():
        (params if p.requires_grad else others)[name] = p.detach().clone()
    for name, b in model.named_buffers():
        others[name] = b.detach().clone()
    return params, others


@contextmanager
def modes(model: nn.Module, recorded: list[tuple[nn.Module, bool]]) -> Iterator[None]:
    """Run with the train/eval modes ``recorded`` earlier, restoring the current ones after."""
    current = [(m, m.training) for m, _ in recorded]
    try:
        for module, training in recorded:
            module.training = training
        yield
    finally:
        for module, training in current:
            module.training = training


def model_function(model: nn.Module, others: dict[str, Tensor]) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """f(params, x) = model(x) with ``params`` substituted for the trainable parameters and the
    modules in the train/eval modes they have now. Attention runs on PyTorch's composite
    ("math") kernel, the one with forward-mode and higher-order derivatives.

    Tied parameters: each (module, attribute) slot is substituted once, with ``tie_weights``
    off — a parameter held by a second module gets the same tensor under that module's name,
    a module registered under two names is one slot (torch's own weight tying left such a
    module holding the substitute tensor instead of its Parameter after the call).
    """
    recorded = [(m, m.training) for m in model.modules()]
    aliases = _tied_aliases(model)

    def f(params: dict[str, Tensor], x: Tensor) -> Tensor:
        values = {**others, **params}
        values.update({alias: values[name] for alias, name in aliases.items() if name in values})
        with modes(model, recorded), sdpa_kernel([SDPBackend.MATH]):
            return functional_call(model, values, (x,), tie_weights=False)

    return f


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{name in a second module: the parameter's name in ``named_parameters()``} for parameters
    held by more than one module object (a module registered twice is not listed: one slot)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    seen: set[tuple[int, str]] = set()
    aliases = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False, remove_duplicate=False):
            if (id(module), attr) in seen:
                continue
            seen.add((id(module), attr))
            name = f"{prefix}.{attr}" if prefix else attr
            if name != canonical[id(param)]:
                aliases[name] = canonical[id(param)]
    return aliases


def per_example_gradients(
    model: nn.Module, inputs: Tensor, vectors: list[Tensor], names: list[str]
) -> dict[str, Tensor]:
    """J_nᵀ v_nk for the parameters ``names``: {name: [N, K, *shape]}.

    ``vectors`` are K tensors [N, *out]; each example runs through the model alone (batch of 1),
    so this is exact for any module that treats examples independently. Vectorised with
    ``vmap``; modules vmap cannot batch (e.g. recurrent layers) take a loop over examples.
    """
    params, others = snapshot(model)
    chosen = {n: params[n] for n in names}
    fixed = {**others, **{n: p for n, p in params.items() if n not in chosen}}
    f = model_function(model, fixed)
    stacked = torch.stack(vectors, dim=1)  # [N, K, *out]

    def one_example(x: Tensor, v: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(lambda p: f(p, x.unsqueeze(0)).squeeze(0), chosen)
        return vmap(lambda u: pullback(u)[0])(v)

    try:
        return vmap(one_example)(inputs, stacked)
    except (RuntimeError, NotImplementedError):
        return _loop_per_example(f, chosen, inputs, stacked)


def _loop_per_example(f, chosen: dict[str, Tensor], inputs: Tensor, stacked: Tensor) -> dict[str, Tensor]:
    results: dict[str, list[Tensor]] = {n: [] for n in chosen}
    with torch.enable_grad():
        leaves = {n: p.detach().requires_grad_(True) for n, p in chosen.items()}
        for x, v in zip(inputs, stacked):
            output = f(leaves, x.unsqueeze(0)).squeeze(0)
            columns = [
                torch.autograd.grad(output, list(leaves.values()), u, retain_graph=True, allow_unused=True)
                for u in v
            ]
            for j, name in enumerate(leaves):
                results[name].append(
                    torch.stack([torch.zeros_like(leaves[name]) if c[j] is None else c[j] for c in columns])
                )
    return {n: torch.stack(r) for n, r in results.items()}
