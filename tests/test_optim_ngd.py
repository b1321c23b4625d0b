"""natgrad.optim.NGD: with its defaults one step on a batch is exactly
θ ← θ − lr (F_batch + damping I)⁻¹ ∇L_batch with F the Fisher of that batch, checked against
the brute-force dense float64 Fisher of tests/reference.py for every estimator with a
deterministic reference ("exact", "empirical"), the three likelihoods and the structures.

Tolerances: direct solves 1e-9 relative; the matrix-free structures ("implicit", and
"kron_sum") solve by conjugate gradient to a relative residual τ = H.CG_TOL, so the error of
x = (F + λI)⁻¹ b is at most τ ||b|| / λ (λ_min(F + λI) ≥ λ); a factor 10 of slack is added.
"""

from __future__ import annotations

import pytest
import torch

import helpers as H
import reference as ref
from test_optim_helpers import (
    DT, data, flat_params, grad_of, layer_slices, mlp, nll, optim, step_change,
)


ITERATIVE = ("implicit", "kron_sum")


def solve(F, b, lam):
    return torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=DT), b)


def check(change, lr, expected, grad, lam, structure, what):
    actual = change / lr
    if structure in ITERATIVE:
        err = float((actual - expected).abs().max())
        bound = 10 * H.CG_TOL * float(grad.norm()) / lam + 1e-12 * float(expected.abs().max())
        assert err <= bound, f"{what}: max error {err:.3e} > CG bound {bound:.3e}"
    else:
        H.assert_rel_close(actual, expected, 1e-9, what)


@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
@pytest.mark.parametrize("structure", ["dense", "implicit", "auto"])
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_one_step_with_defaults(estimator, structure, likelihood):
    O = optim()
    model = mlp(40)
    x, y = data(model, 6, likelihood=likelihood)
    F = ref.fisher_dense(model, x, y, likelihood, estimator)
    grad = grad_of(model, x, y, likelihood)
    opt = O.NGD(model, likelihood=likelihood, estimator=estimator, structure=structure)
    lr, lam = opt.param_groups[0]["lr"], opt.param_groups[0]["damping"]
    assert lr > 0 and lam > 0
    change = step_change(opt, model, x, y, likelihood)
    check(change, lr, solve(F, grad, lam), grad, lam, structure, f"NGD {structure} {estimator} {likelihood}")


@pytest.mark.parametrize("structure", ["dense", "implicit"])
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_each_step_uses_only_its_own_batch(estimator, structure):
    O = optim()
    model = mlp(41)
    lr, lam = 0.7, 0.03
    opt = O.NGD(model, lr=lr, damping=lam, estimator=estimator, structure=structure)
    for k in range(3):
        x, y = data(model, 5 + k, seed=70 + k)
        F = ref.fisher_dense(model, x, y, "categorical", estimator)
        grad = grad_of(model, x, y)
        change = step_change(opt, model, x, y)
        check(change, lr, solve(F, grad, lam), grad, lam, structure, f"step {k}")


@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_every_structure_solves_with_its_projection_of_the_batch_fisher(structure):
    O = optim()
    model = mlp(42)
    x, y = data(model, 7)
    lam, lr = 0.05, 0.5
    expected_F = H.expected_matrix(model, x, y, "categorical", "exact", structure)
    grad = grad_of(model, x, y)
    opt = O.NGD(model, lr=lr, damping=lam, estimator="exact", structure=structure)
    change = step_change(opt, model, x, y)
    check(change, lr, solve(expected_F, grad, lam), grad, lam, structure, f"structure {structure}")


def test_conv_model_dense():
    O = optim()
    model = H.cnn(43)
    x, y = data(model, 4)
    F = ref.fisher_dense(model, x, y, "categorical", "exact")
    grad = grad_of(model, x, y)
    opt = O.NGD(model, lr=0.3, damping=0.1, estimator="exact", structure="dense")
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change / 0.3, solve(F, grad, 0.1), 1e-9, "cnn")


def test_empirical_with_plain_loss_backward():
    O = optim()
    model = mlp(44)
    x, y = data(model, 6)
    F = ref.fisher_empirical(model, x, y, "categorical")
    grad = grad_of(model, x, y)
    opt = O.NGD(model, lr=0.3, damping=0.1, estimator="empirical")
    before = flat_params(model)
    opt.zero_grad()
    nll(model(x), y).backward()
    opt.step()
    H.assert_rel_close((before - flat_params(model)) / 0.3, solve(F, grad, 0.1), 1e-9, "plain backward")


def test_param_group_lrs():
    O = optim()
    model = mlp(45)
    x, y = data(model, 6)
    F = ref.fisher_exact(model, x, "categorical")
    grad = grad_of(model, x, y)
    groups = [{"params": list(model[0].parameters()), "lr": 0.5},
              {"params": list(model[2].parameters()), "lr": 0.05}]
    opt = O.NGD(model, damping=0.1, estimator="exact", structure="dense", param_groups=groups)
    change = step_change(opt, model, x, y)
    direction = solve(F, grad, 0.1)
    slices = {n: sl for n, _, sl in layer_slices(model)}
    H.assert_rel_close(change[slices["0"]], 0.5 * direction[slices["0"]], 1e-9, "group 0")
    H.assert_rel_close(change[slices["2"]], 0.05 * direction[slices["2"]], 1e-9, "group 1")


def test_stat_every_reuses_the_last_fisher():
    O = optim()
    model = mlp(46)
    lam, lr = 0.1, 0.3
    opt = O.NGD(model, lr=lr, damping=lam, estimator="exact", structure="dense",
                schedule=O.Schedule(stat_every=2, inverse_every=1, decay=0.0))
    F = None
    for k in range(4):
        x, y = data(model, 6, seed=80 + k)
        if k % 2 == 0:
            F = ref.fisher_exact(model, x, "categorical")
        grad = grad_of(model, x, y)
        change = step_change(opt, model, x, y)
        H.assert_rel_close(change / lr, solve(F, grad, lam), 1e-9, f"step {k}")


def test_running_average_follows_the_schedule_formula():
    O = optim()
    model = mlp(47)
    lam, lr, decay = 0.1, 0.3, 0.9
    opt = O.NGD(model, lr=lr, damping=lam, estimator="exact", structure="dense",
                schedule=O.Schedule(stat_every=1, inverse_every=1, decay=decay))
    avg = None
    for k in range(1, 4):
        x, y = data(model, 6, seed=90 + k)
        F = ref.fisher_exact(model, x, "categorical")
        rho = min(1 - 1 / k, decay)
        avg = F if avg is None else rho * avg + (1 - rho) * F
        grad = grad_of(model, x, y)
        change = step_change(opt, model, x, y)
        H.assert_rel_close(change / lr, solve(avg, grad, lam), 1e-9, f"update {k}")


def test_running_average_needs_a_stored_structure():
    O = optim()
    with pytest.raises(ValueError):
        O.NGD(mlp(48), structure="implicit", schedule=O.Schedule(decay=0.5))


def test_model_without_kronecker_layers_is_fine_for_ngd():
    O = optim()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(6, 3), torch.nn.Flatten(), torch.nn.LayerNorm(6)).to(DT)
    x = torch.randint(0, 6, (5, 2))
    y = torch.arange(5) % 6
    params = [p for _, p in ref.trainable(model)]
    F = ref.fisher_exact(model, x, "categorical")
    grad = ref.flat_grad(nll(model(x), y), params).detach()
    opt = O.NGD(model, lr=0.3, damping=0.1, estimator="exact", structure="dense")
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change / 0.3, solve(F, grad, 0.1), 1e-9, "embedding + layernorm")


OTHER_CASES = [
    pytest.param(est, st, id=f"{est}-{st}")
    for est in ("exact", "empirical") for st in ("dense", "diagonal", "implicit")
]


@pytest.mark.parametrize("estimator,structure", OTHER_CASES)
@pytest.mark.parametrize("make_net", [H.layernorm_net, H.embed_net, H.custom_net],
                         ids=["layernorm", "embedding", "custom"])
def test_models_with_other_modules(make_net, estimator, structure):
    O = optim()
    model = make_net(49)
    x, y = H.make_data(model, "categorical", 6)
    F = H.project(ref.fisher_dense(model, x, y, "categorical", estimator), model, structure)
    params = [p for _, p in ref.trainable(model)]
    grad = ref.flat_grad(nll(model(x), y), params).detach()
    lam, lr = 0.1, 0.3
    opt = O.NGD(model, lr=lr, damping=lam, estimator=estimator, structure=structure)
    change = step_change(opt, model, x, y)
    check(change, lr, solve(F, grad, lam), grad, lam, structure, f"{make_net.__name__} {estimator} {structure}")


def test_param_group_damping_is_honoured_or_refused():
    O = optim()
    model = mlp(50)
    x, y = data(model, 6)
    F = ref.fisher_exact(model, x, "categorical")
    grad = grad_of(model, x, y)
    groups = [{"params": list(model[0].parameters()), "damping": 0.01},
              {"params": list(model[2].parameters()), "damping": 1.0}]
    try:
        opt = O.NGD(model, lr=1.0, estimator="exact", structure="dense", param_groups=groups)
    except ValueError as error:  # refusing per-group damping clearly is acceptable too
        assert "damping" in str(error)
        return
    lam = torch.cat([torch.full((p.numel(),), g["damping"], dtype=DT) for g in groups for p in g["params"]])
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change, torch.linalg.solve(F + torch.diag(lam), grad), 1e-9, "per-group damping")


def test_empirical_with_an_unused_layer():
    O = optim()
    model = H.unused_net(51)
    x, y = H.make_data(model, "categorical", 6)
    F = ref.fisher_empirical(model, x, y, "categorical")
    grad = grad_of(model, x, y)
    opt = O.NGD(model, lr=0.3, damping=0.1, estimator="empirical", structure="dense")
    change = step_change(opt, model, x, y)
    H.assert_rel_close(change / 0.3, solve(F, grad, 0.1), 1e-9, "unused layer, empirical")


@pytest.mark.parametrize("estimator", ["exact", "mc"])
def test_unused_layer_mc_and_exact(estimator):
    O = optim()
    model = H.unused_net(51)
    x, y = H.make_data(model, "categorical", 6)
    opt = O.NGD(model, lr=0.3, damping=0.1, estimator=estimator, structure="dense")
    offsets = ref.param_offsets(model)
    F = ref.fisher_exact(model, x, "categorical")
    grad = grad_of(model, x, y)
    change = step_change(opt, model, x, y)
    assert float(change[offsets["unused.weight"]].abs().max()) == 0.0
    if estimator == "exact":
        H.assert_rel_close(change / 0.3, solve(F, grad, 0.1), 1e-9, "unused layer, exact")


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_module_registered_twice_steps_exactly_and_keeps_its_parameters(estimator):
    """A Linear object at two places of a Sequential goes through the generic per-example path:
    the step is the reference's, and the module still holds the optimizer's Parameters after
    it (a plain tensor there would silently freeze those weights)."""
    O = optim()
    model = H.registered_twice_net(51)
    inner = model[2]
    weight, bias = inner.weight, inner.bias
    lam, lr = 0.05, 0.5
    opt = O.NGD(model, lr=lr, damping=lam, estimator=estimator)
    for seed in (1, 2):
        x, y = data(model, 6, seed=seed)
        F = ref.fisher_dense(model, x, y, "categorical", estimator)
        grad = grad_of(model, x, y)
        change = step_change(opt, model, x, y)
        H.assert_rel_close(change / lr, solve(F, grad, lam), 1e-9, f"step with seed {seed}")
        assert inner.weight is weight and inner.bias is bias and model[4] is inner


def test_defaults_do_not_diverge_on_the_mnist_mlp():
    """NGD(model) on mnist-mlp (784-256-128-10 ReLU, batches of 128 of the MNIST test split):
    with lr 0.3 and damping 0.3 training diverged to NaN within 150 steps on this seed (the
    one-sample MC Fisher has rank ≤ 128 of 235k parameters). The defaults lr 1, damping 1 damp
    the Fisher's own directions more; a large model may still want a smaller lr (one seed of
    three diverges here with them)."""
    from pathlib import Path

    import torch.nn.functional as TF

    from natgrad.tasks import get_task

    mnist_dir = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
    if not mnist_dir.is_dir():
        pytest.skip("no MNIST files next to the repository")
    task = get_task("mnist-mlp")
    d = task.load(mnist_dir=mnist_dir)
    torch.manual_seed(0)
    model = task.model_fn()
    opt = optim().NGD(model, likelihood="categorical")
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(d.x_train), (128,), generator=g)
        out = model(d.x_train[idx])
        opt.zero_grad()
        opt.backward(TF.cross_entropy(out, d.y_train[idx]), out)
        opt.step()
    with torch.no_grad():
        loss = float(TF.cross_entropy(model(d.x_train), d.y_train))
    assert loss < 0.5, loss  # ln 10 = 2.3 at the start
