"""Bad input raises TypeError / ValueError / NotImplementedError (never AssertionError or a
bare RuntimeError), and the model is left exactly as it was."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import helpers as H

ALLOWED = (TypeError, ValueError, NotImplementedError)


def _with(fn):
    """Build a case from a function of (model, x, y) returning the overriding kwargs."""
    def make():
        model = H.mlp(30)
        x, y = H.make_data(model, "categorical", 5)
        args = dict(data=(x, y), likelihood="categorical", estimator="exact", structure="dense")
        args.update(fn(model, x, y))
        return model, args
    return make


class Flat1D(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 1)

    def forward(self, x):
        return self.lin(x).squeeze(1)  # [N]: no class dimension


def _nan_in_second_batch(model, x, y):
    x2 = x.clone()
    x2[4, 1] = float("nan")
    return dict(data=DataLoader(TensorDataset(x2, y), batch_size=3), structure="kfac")


def _batchnorm_train(structure):
    def make():
        model = H.batchnorm_net(31, train=True)
        x, _ = H.make_data(model, "categorical", 5)
        return model, dict(data=x, likelihood="categorical", estimator="exact",
                           structure=structure)
    return make


def _shared(structure):
    def make():
        model = H.shared_net(32)
        x, _ = H.make_data(model, "categorical", 5)
        return model, dict(data=x, likelihood="categorical", estimator="exact",
                           structure=structure)
    return make


def _flat_output():
    torch.manual_seed(33)
    model = Flat1D().to(H.DT)
    x = torch.randn(5, 5, dtype=H.DT)
    return model, dict(data=x, likelihood="categorical", estimator="exact", structure="dense")


CASES = {
    "unknown_structure": _with(lambda m, x, y: dict(structure="full")),
    "unknown_estimator": _with(lambda m, x, y: dict(estimator="fisher")),
    "unknown_likelihood": _with(lambda m, x, y: dict(likelihood="poisson")),
    "likelihood_wrong_type": _with(lambda m, x, y: dict(likelihood=3)),
    "structure_wrong_type": _with(lambda m, x, y: dict(structure=None)),
    "empirical_without_targets": _with(lambda m, x, y: dict(data=x, estimator="empirical")),
    "empirical_without_targets_kfac": _with(
        lambda m, x, y: dict(data=x, estimator="empirical", structure="kfac")),
    "mismatched_lengths": _with(lambda m, x, y: dict(data=(x, y[:4]), estimator="empirical")),
    "mismatched_lengths_exact": _with(lambda m, x, y: dict(data=(x[:4], y))),
    "target_too_large": _with(lambda m, x, y: dict(data=(x, torch.tensor([0, 1, 3, 0, 1])),
                                                   estimator="empirical")),
    "target_negative": _with(lambda m, x, y: dict(data=(x, torch.tensor([0, 1, -1, 0, 1])),
                                                  estimator="empirical", structure="kfac")),
    "target_not_integer": _with(lambda m, x, y: dict(
        data=(x, torch.tensor([0.5, 1, 2, 0, 1], dtype=H.DT)), estimator="empirical")),
    "categorical_target_shape": _with(lambda m, x, y: dict(
        data=(x, torch.zeros(5, 2, dtype=torch.long)), estimator="empirical")),
    "gaussian_target_shape": _with(lambda m, x, y: dict(
        data=(x, torch.zeros(5, 2, dtype=H.DT)), likelihood="gaussian", estimator="empirical")),
    "bernoulli_target_shape": _with(lambda m, x, y: dict(
        data=(x, torch.zeros(5, 4, dtype=H.DT)), likelihood="bernoulli", estimator="empirical")),
    "nan_input": _with(lambda m, x, y: dict(data=x.clone().index_fill_(0, torch.tensor([2]),
                                                                        float("nan")))),
    "inf_input_mc": _with(lambda m, x, y: dict(
        data=x.clone().index_fill_(0, torch.tensor([0]), float("inf")), estimator="mc")),
    # tanh maps ±inf to ±1: the output is finite, the inputs themselves must be checked
    "inf_input_finite_output_kfac": _with(lambda m, x, y: dict(
        data=(x.clone().index_fill_(1, torch.tensor([0]), float("inf")), y), structure="kfac")),
    "wrong_feature_size": _with(lambda m, x, y: dict(data=(torch.randn(5, x.shape[1] + 1, dtype=H.DT), y))),
    "integer_inputs_implicit": _with(lambda m, x, y: dict(data=(x.long(), y), structure="implicit")),
    "targets_out_of_range_exact": _with(lambda m, x, y: dict(data=(x, y + 100))),
    "float_targets_categorical_mc": _with(lambda m, x, y: dict(data=(x, y.to(H.DT) + 0.5), estimator="mc")),
    "nan_in_second_batch": _with(_nan_in_second_batch),
    "empty_tensor": _with(lambda m, x, y: dict(data=x[:0])),
    "empty_pair": _with(lambda m, x, y: dict(data=(x[:0], y[:0]), estimator="empirical")),
    "empty_loader": _with(lambda m, x, y: dict(data=DataLoader(TensorDataset(x[:0], y[:0]),
                                                               batch_size=2))),
    "empty_list": _with(lambda m, x, y: dict(data=[])),
    "data_is_string": _with(lambda m, x, y: dict(data="x")),
    "samples_zero": _with(lambda m, x, y: dict(estimator="mc", samples=0)),
    "samples_negative": _with(lambda m, x, y: dict(estimator="mc", samples=-2)),
    "batchnorm_train_dense": _batchnorm_train("dense"),
    "batchnorm_train_diagonal": _batchnorm_train("diagonal"),
    "batchnorm_train_implicit": _batchnorm_train("implicit"),
    "shared_linear_kfac": _shared("kfac"),
    "shared_linear_ekfac": _shared("ekfac"),
    "shared_linear_kron_sum": _shared("kron_sum"),
    "output_1d_categorical": _flat_output,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_and_leaves_model(case):
    natgrad = H.lib()
    model, args = CASES[case]()
    # some state to preserve: a gradient on one parameter, None on the others
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.25)
    snap = H.snapshot(model)
    data = args.pop("data")
    with pytest.raises(ALLOWED):
        natgrad.fisher(model, data, **args)
    H.assert_unchanged(model, snap)


def test_inf_input_message():
    model = H.mlp(30)
    x, y = H.make_data(model, "categorical", 5)
    x[1, 0] = float("inf")
    with pytest.raises(ValueError, match="inputs contain NaN or Inf"):
        H.lib().fisher(model, (x, y), structure="kfac")


def test_model_failure_is_a_value_error_naming_the_inputs():
    model = H.mlp(30)
    x, y = H.make_data(model, "categorical", 5)
    with pytest.raises(ValueError, match=r"model failed on inputs of shape \(5, 3\)") as info:
        H.lib().fisher(model, (x[:, :3], y), structure="dense")
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own message is kept


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_samples_without_mc_warns_and_changes_nothing(estimator):
    model = H.mlp(30)
    x, y = H.make_data(model, "categorical", 5)
    plain = H.lib().fisher(model, (x, y), estimator=estimator, structure="dense").to_dense()
    with pytest.warns(UserWarning, match="samples=4 has no effect"):
        F = H.lib().fisher(model, (x, y), estimator=estimator, structure="dense", samples=4)
    assert torch.equal(F.to_dense(), plain)


def test_negative_variance():
    natgrad = H.lib()
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ALLOWED):
            natgrad.Gaussian(variance=bad)


@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_bad_solve_and_matvec_arguments(structure):
    natgrad = H.lib()
    model = H.mlp(34)
    x, _ = H.make_data(model, "categorical", 4)
    F = natgrad.fisher(model, x, structure=structure)
    P = F.size
    snap = H.snapshot(model)
    with pytest.raises(ALLOWED):
        F.solve(torch.ones(P, dtype=H.DT), damping=-1.0)
    with pytest.raises(ALLOWED):
        natgrad.natural_gradient(F, torch.ones(P, dtype=H.DT), float("nan"))
    with pytest.raises(ALLOWED):
        F @ torch.ones(P + 1, dtype=H.DT)
    with pytest.raises(ALLOWED):
        F.solve(torch.ones(P - 1, dtype=H.DT), damping=0.1)
    H.assert_unchanged(model, snap)


def test_errors_name_the_problem():
    """Messages are useful: they name the bad value."""
    natgrad = H.lib()
    model, args = CASES["unknown_structure"]()
    with pytest.raises(ALLOWED) as info:
        natgrad.fisher(model, args.pop("data"), **args)
    assert "full" in str(info.value)
    model, args = CASES["unknown_likelihood"]()
    with pytest.raises(ALLOWED) as info:
        natgrad.fisher(model, args.pop("data"), **args)
    assert "poisson" in str(info.value)
