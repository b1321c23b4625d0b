"""After any successful call (and any use of the returned matrix) the model is unchanged:
no hooks left, same training modes, requires_grad flags, parameter values, buffers and .grad
(None stays None)."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import helpers as H


def prepare(model):
    """Mixed state: one module in eval mode, the rest training; a .grad set on one
    parameter, None elsewhere; one frozen parameter."""
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)
    params[1].requires_grad_(False)  # a bias of the first layer
    return model


@pytest.mark.parametrize("structure", H.STRUCTURES)
@pytest.mark.parametrize("estimator", H.ESTIMATORS)
def test_unchanged_mlp(estimator, structure):
    natgrad = H.lib()
    model = prepare(H.mlp(40, sizes=(5, 4, 4, 3)))
    model.train()
    model[2].eval()  # Tanh in eval: a mixed training state to preserve
    if structure in H.KRON_STRUCTURES:
        # a half-frozen Linear is outside the K-FAC contract: freeze the whole first layer
        model[0].weight.requires_grad_(False)
    x, y = H.make_data(model, "categorical", 5)
    snap = H.snapshot(model)
    F = natgrad.fisher(model, DataLoader(TensorDataset(x, y), batch_size=2),
                       likelihood="categorical", estimator=estimator, structure=structure,
                       **(dict(samples=2) if estimator == "mc" else {}))
    H.assert_unchanged(model, snap)
    # using the matrix (matrix-free ones run the model here) leaves it unchanged, too
    v = torch.ones(F.size, dtype=H.DT)
    F @ v
    F.solve(v, damping=0.1)
    natgrad.natural_gradient(F, v, 0.1)
    F.diagonal()
    F.trace()
    F.to_dense()
    H.assert_unchanged(model, snap)


@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_unchanged_cnn_in_eval_mode(structure):
    natgrad = H.lib()
    model = H.cnn(41).eval()
    x, y = H.make_data(model, "gaussian", 3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    snap = H.snapshot(model)
    F = natgrad.fisher(model, (x, y), likelihood="gaussian", estimator="empirical",
                       structure=structure)
    F @ torch.ones(F.size, dtype=H.DT)
    H.assert_unchanged(model, snap)


@pytest.mark.parametrize("structure", H.GENERIC_STRUCTURES)
def test_unchanged_batchnorm_eval(structure):
    """BatchNorm in eval mode: running statistics (buffers) untouched, still eval."""
    natgrad = H.lib()
    model = H.batchnorm_net(42, train=False)
    x, _ = H.make_data(model, "categorical", 4)
    snap = H.snapshot(model)
    F = natgrad.fisher(model, x, structure=structure)
    F.solve(torch.ones(F.size, dtype=H.DT), 0.1)
    H.assert_unchanged(model, snap)


def test_grad_mode_preserved_under_no_grad():
    """Called inside torch.no_grad(), the Fisher is still computed and grad mode is kept."""
    natgrad = H.lib()
    model = H.mlp(43)
    x, _ = H.make_data(model, "categorical", 4)
    with torch.no_grad():
        F = natgrad.fisher(model, x, structure="kfac")
        assert not torch.is_grad_enabled()
        G = natgrad.fisher(model, x, structure="implicit")
        G @ torch.ones(G.size, dtype=H.DT)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    import reference as ref
    want = ref.kfac_dense(model, ref.kfac_factors(model, x, None, "categorical", "exact"))
    H.assert_rel_close(F.to_dense(), want, H.RTOL, "kfac under no_grad")
    H.assert_rel_close(G.to_dense(), ref.fisher_exact(model, x, "categorical"), H.RTOL,
                       "implicit under no_grad")


def test_model_unchanged_after_error_midway():
    """A failure on the second batch (hooks already installed) still cleans up."""
    natgrad = H.lib()
    model = H.mlp(44)
    x, y = H.make_data(model, "categorical", 5)
    y = y.clone()
    y[4] = 7  # out of range, in the second batch
    snap = H.snapshot(model)
    for structure in H.STRUCTURES:
        with pytest.raises((TypeError, ValueError, NotImplementedError)):
            natgrad.fisher(model, DataLoader(TensorDataset(x, y), batch_size=3),
                           estimator="empirical", structure=structure)
        H.assert_unchanged(model, snap)
