"""A FisherMatrix is one fixed matrix: the Fisher of the model as it was when
natgrad.fisher was called. Changing the model afterwards (an optimizer step, switching to
training mode, BatchNorm running statistics moving) must not change F @ v, solve, to_dense.
Natural-gradient methods reuse a Fisher over several steps (K-FAC recomputes its inverse
every few iterations), so a matrix that silently follows the model is wrong there.
"""

import pytest
import torch
from torch import nn

import helpers as H


def dropout_net(seed):
    H.seeded(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 3)).to(H.DT)


def _freeze_check(F, change):
    v = torch.randn(F.size, generator=torch.Generator().manual_seed(3), dtype=H.DT)
    M = F.to_dense().clone()
    Fv, x = (F @ v).clone(), F.solve(v, 0.1).clone()
    change()
    H.assert_rel_close(F @ v, Fv, 1e-12, "F @ v after the model changed")
    H.assert_rel_close(F.to_dense(), M, 1e-12, "to_dense after the model changed")
    H.assert_rel_close(F.solve(v, 0.1), x, 1e-8, "solve after the model changed")


@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_fixed_after_parameter_update(structure):
    model = H.mlp(60)
    x, y = H.make_data(model, "categorical", 4)
    F = H.lib().fisher(model, (x, y), likelihood="categorical", estimator="empirical",
                       structure=structure)

    def step():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))

    _freeze_check(F, step)


@pytest.mark.parametrize("structure", H.GENERIC_STRUCTURES)
def test_fixed_after_switching_to_training_mode(structure):
    model = dropout_net(61).eval()
    x, _ = H.make_data(H.mlp(0), "categorical", 4)
    F = H.lib().fisher(model, x, structure=structure)
    _freeze_check(F, model.train)


@pytest.mark.parametrize("structure", H.GENERIC_STRUCTURES)
def test_fixed_after_batchnorm_statistics_move(structure):
    model = H.batchnorm_net(62, train=False)
    x, _ = H.make_data(model, "categorical", 4)
    F = H.lib().fisher(model, x, structure=structure)

    def update_stats():
        model.train()
        with torch.no_grad():
            model(3 * x + 1)
        model.eval()

    _freeze_check(F, update_stats)
