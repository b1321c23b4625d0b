"""J·v on a live graph (natgrad.linearized), against torch.func.jvp of the model in float64.

Two ways to get the pullback g(u) = Jᵀu: built by an extra backward (LinearizedOutput alone), or
by the user's own loss.backward() (backward_with_pullback, what the optimizers' quadratic model
uses). The latter must also leave .grad exactly as a plain backward would: same values, no graph.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

from natgrad.linearized import LinearizedOutput, backward_with_pullback

DT = torch.float64


def model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(7, 4, dtype=DT)
    y = torch.randint(0, 3, (7,))
    return model, x, y


def reference_jvp(model: nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J v by forward-mode AD on a functional copy of the model (v flat, named_parameters order)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents, offset = {}, 0
    for n in names:
        size = params[n].numel()
        tangents[n] = v[offset : offset + size].view_as(params[n])
        offset += size
    return jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))[1]


def plain_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: float) -> list[torch.Tensor]:
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y) + extra * sum(p.pow(2).sum() for p in params)
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("regulariser", [0.0, 0.3])
def test_backward_with_pullback_grads_and_jvps(regulariser):
    model, x, y = model_and_batch()
    params = list(model.parameters())
    expected = plain_grads(model, x, y, regulariser)
    previous = [torch.randn_like(p) for p in params]  # accumulated from an earlier backward
    for p, g in zip(params, previous):
        p.grad = g.clone()
    out = model(x)
    loss = nn.functional.cross_entropy(out, y) + regulariser * sum(p.pow(2).sum() for p in params)
    linearized = backward_with_pullback(loss, out, params)
    for p, g, old in zip(params, expected, previous):
        assert p.grad.grad_fn is None and not p.grad.requires_grad
        torch.testing.assert_close(p.grad, old + g, rtol=1e-12, atol=1e-12)
    size = sum(p.numel() for p in params)
    vectors = [torch.randn(size, dtype=DT) for _ in range(2)]
    got = linearized.jvps(vectors)
    single = linearized.jvp(vectors[0])  # the one-vector path (no vmap)
    for v, jv in zip(vectors + vectors[:1], got + [single]):
        # the regulariser's gradient does not pass through the output: J v is the model's alone
        torch.testing.assert_close(jv, reference_jvp(model, x, v), rtol=1e-10, atol=1e-12)


def test_linearized_output_builds_its_own_pullback():
    model, x, _ = model_and_batch(1)
    params = list(model.parameters())
    out = model(x)
    v = torch.randn(sum(p.numel() for p in params), dtype=DT)
    torch.testing.assert_close(LinearizedOutput(out, params).jvp(v), reference_jvp(model, x, v), rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in params)


def test_backward_with_pullback_without_the_output_in_the_loss():
    model, x, _ = model_and_batch(2)
    params = list(model.parameters())
    out = model(x)
    loss = sum(p.pow(2).sum() for p in params)
    assert backward_with_pullback(loss, out, params) is None
    for p in params:
        torch.testing.assert_close(p.grad, 2 * p.detach(), rtol=1e-12, atol=1e-12)
        assert not p.grad.requires_grad
