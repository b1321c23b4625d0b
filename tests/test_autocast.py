"""natgrad under ``torch.autocast`` (bfloat16 on CPU): a float32 model whose layers compute
in bfloat16. The issue asks for factors in the model's dtype: the statistics must be float32
(bfloat16 has no Cholesky and too few bits for a curvature estimate), computed from the
activations and output gradients the bfloat16 forward and backward actually produced.

The reference factors are accumulated in float64 from those tensors, captured with plain hooks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import helpers as H
from test_optim_helpers import optim

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5))


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 20, generator=g), torch.randint(0, 5, (n,), generator=g)


def _step(opt, model, x, y):
    opt.zero_grad()
    with torch.autocast(**BF16):
        out = model(x)
        loss = Fn.cross_entropy(out, y)
    opt.backward(loss, out)
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("name", ["KFAC", "EKFAC", "NGD"])
@pytest.mark.parametrize("estimator", ["mc", "empirical"])
def test_training_under_autocast_keeps_float32_state_and_learns(name, estimator):
    O = optim()
    model = _model()
    x, y = _data()
    opt = getattr(O, name)(model, likelihood="categorical", estimator=estimator)
    losses = [_step(opt, model, x, y) for _ in range(8)]
    for p in model.parameters():
        assert p.dtype == torch.float32 and bool(torch.isfinite(p).all())
    for state in opt.state.values():
        for key, value in state.items():
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    assert v.dtype == torch.float32, f"{name} state {key!r} is {v.dtype}"
    if name == "NGD":  # no per-parameter state: its Fisher of the last batch
        assert opt.fisher_matrix.dtype == torch.float32
    else:
        assert opt.state
    assert losses[-1] < 0.8 * losses[0], losses


def _reference_factors(model, x, y):
    """A = (1/N) Σ ā āᵀ and the empirical G = (1/N) Σ (N ∂L/∂a)(N ∂L/∂a)ᵀ per Linear layer, in
    float64, from the inputs and output gradients of one autocast forward and backward."""
    inputs, grads, handles = {}, {}, []
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            def hook(mod, args, out, name=name):
                inputs[name] = args[0].detach()
                out.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach()))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.autocast(**BF16):
            loss = Fn.cross_entropy(model(x), y)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    n = x.shape[0]
    factors = {}
    for name in inputs:
        a = torch.cat([inputs[name].double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
        g = grads[name].double() * n
        factors[name] = (a.T @ a / n, g.T @ g / n, inputs[name].dtype)
    return factors


def test_kfac_factors_under_autocast_are_the_bf16_activations_statistics_in_float32():
    """One empirical statistics step (decay 0): A and G equal the float64 reference of the bf16
    tensors to float32 accuracy (the bf16 values are exact in float32; only the products with
    N and the sums round). N = 50 is not a power of two, so scaling by N in bf16 would show."""
    O = optim()
    model = _model()
    x, y = _data(50)
    reference = _reference_factors(model, x, y)
    assert reference["2"][2] == torch.bfloat16  # the second layer really saw bf16 inputs
    opt = O.KFAC(model, likelihood="categorical", estimator="empirical", schedule=O.Schedule(decay=0.0),
                 step_policy=O.StepPolicy(rescale="none"))
    _step(opt, model, x, y)
    for name, (A, G, _) in reference.items():
        state = opt.state[getattr(model, name).weight]
        assert state["A"].dtype == state["G"].dtype == torch.float32
        H.assert_rel_close(state["A"][0], A, 1e-5, f"A of layer {name}")
        H.assert_rel_close(state["G"][0], G, 1e-5, f"G of layer {name}")


def test_low_precision_gradients_are_not_preconditioned_through_their_factors(monkeypatch):
    """Under autocast ``.grad`` is a bfloat16 product: recomputing it as gᵀā in float32 would give
    a different (more precise) gradient than the one ``step()`` was handed, so every layer is
    preconditioned from ``.grad`` itself — here checked on a small batch, where the factored form
    would otherwise be chosen."""
    O = optim()
    factored = []
    original = O.KFAC._layer_direction

    def spy(self, i, grad):
        if isinstance(grad, tuple):
            factored.append(i)
        return original(self, i, grad)

    monkeypatch.setattr(O.KFAC, "_layer_direction", spy)
    model = nn.Sequential(nn.Linear(40, 48), nn.Tanh(), nn.Linear(48, 30))
    x, y = torch.randn(3, 40), torch.tensor([0, 1, 2])
    opt = O.KFAC(model, likelihood="categorical")
    _step(opt, model, x, y)
    _step(opt, model, x, y)
    assert factored == []
    opt.zero_grad()  # the control: the same step without autocast takes the factored form
    out = model(x)
    opt.backward(Fn.cross_entropy(out, y), out)
    opt.step()
    assert sorted(factored) == [0, 1]


@pytest.mark.parametrize("structure", ["kfac", "diagonal", "dense"])
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_fisher_under_autocast_is_float32_and_close_to_the_full_precision_one(structure, estimator):
    """natgrad.fisher inside an autocast region returns a float32 matrix whose entries differ from
    the float32 computation only by bf16 rounding of the activations and output gradients (2⁻⁹
    relative per value, ~4e-3 for a product of two; measured 0.8–2.3e-3 of the largest entry):
    1e-2 of the largest entry."""
    import natgrad

    model = _model()
    x, y = _data()
    plain = natgrad.fisher(model, (x, y), estimator=estimator, structure=structure).to_dense()
    with torch.autocast(**BF16):
        low = natgrad.fisher(model, (x, y), estimator=estimator, structure=structure).to_dense()
    assert low.dtype == torch.float32
    err = float((low - plain).abs().max() / plain.abs().max())
    assert err < 1e-2, err
    assert err > 0  # the computation did run in bfloat16
