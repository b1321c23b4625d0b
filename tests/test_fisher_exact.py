"""Every structure × deterministic estimator × likelihood against the brute-force reference.

dense / block_diagonal / diagonal / kron_sum / implicit are projections of the reference
dense Fisher; kfac is compared to G ⊗ A built from the reference factors, ekfac to the
reference EKFAC block. All in float64 with a relative tolerance of H.RTOL.
"""

import functools

import pytest
import torch

import helpers as H
import reference as ref

N_EXAMPLES = {"mlp": 6, "cnn": 4}
MODELS = {"mlp": lambda: H.mlp(0), "cnn": lambda: H.cnn(0)}
VARIANCE = 1.0  # the grid uses the likelihood names; non-unit variance: test_gaussian_variance


@functools.lru_cache(maxsize=None)
def case(model_name, likelihood):
    model = MODELS[model_name]()
    x, y = H.make_data(model, likelihood, N_EXAMPLES[model_name])
    return model, x, y


@functools.lru_cache(maxsize=None)
def expected(model_name, likelihood, estimator, structure):
    model, x, y = case(model_name, likelihood)
    if structure not in ("kfac", "ekfac"):
        dense = expected(model_name, likelihood, estimator, "dense") if structure != "dense" \
            else ref.fisher_dense(model, x, y, likelihood, estimator)
        return H.project(dense, model, structure) if structure != "dense" else dense
    return H.expected_matrix(model, x, y, likelihood, estimator, structure)


@pytest.mark.parametrize("structure", H.STRUCTURES)
@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_matches_reference(model_name, estimator, likelihood, structure):
    natgrad = H.lib()
    model, x, y = case(model_name, likelihood)
    data = (x, y) if estimator == "empirical" else x
    F = natgrad.fisher(model, data, likelihood=likelihood, estimator=estimator,
                       structure=structure)
    want = expected(model_name, likelihood, estimator, structure)
    got = F.to_dense()
    assert got.shape == want.shape and got.dtype == torch.float64
    H.assert_rel_close(got, want, H.RTOL, f"{structure}/{estimator}/{likelihood}/{model_name}")
    H.assert_rel_close(F.diagonal(), torch.diagonal(want), H.RTOL, "diagonal()")


@pytest.mark.parametrize("structure", H.STRUCTURES)
@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
def test_targets_ignored_by_exact(structure, likelihood):
    """The exact Fisher needs no labels: (x, y) and x alone give the same matrix."""
    natgrad = H.lib()
    model, x, y = case("mlp", likelihood)
    a = natgrad.fisher(model, x, likelihood=likelihood, estimator="exact", structure=structure)
    b = natgrad.fisher(model, (x, y), likelihood=likelihood, estimator="exact",
                       structure=structure)
    H.assert_rel_close(b.to_dense(), expected("mlp", likelihood, "exact", structure), H.RTOL,
                       "with targets")
    H.assert_rel_close(a.to_dense(), b.to_dense(), H.RTOL, "x vs (x, y)")


@pytest.mark.parametrize("structure", H.STRUCTURES)
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_gaussian_variance(structure, estimator):
    """Gaussian(variance=σ²): exact = JᵀJ/σ², empirical = Σ J ᵀ(y-f)(y-f)ᵀJ/(σ⁴ N)."""
    natgrad = H.lib()
    var = 2.5
    model = H.mlp(3)
    x, y = H.make_data(model, "gaussian", 5)
    data = (x, y) if estimator == "empirical" else x
    F = natgrad.fisher(model, data, likelihood=natgrad.Gaussian(variance=var),
                       estimator=estimator, structure=structure)
    want = H.expected_matrix(model, x, y, "gaussian", estimator, structure, variance=var)
    H.assert_rel_close(F.to_dense(), want, H.RTOL, f"gaussian σ²={var} {structure}")
    if estimator == "exact" and structure == "dense":
        JtJ = sum(ref.jacobian(model, x, n)[0].T @ ref.jacobian(model, x, n)[0] for n in range(5))
        H.assert_rel_close(F.to_dense(), JtJ / (var * 5), H.RTOL, "JᵀJ/σ²")


@pytest.mark.parametrize("structure", H.STRUCTURES)
@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
def test_likelihood_objects_equal_names(structure, likelihood):
    natgrad = H.lib()
    obj = {"categorical": natgrad.Categorical(), "gaussian": natgrad.Gaussian(),
           "bernoulli": natgrad.Bernoulli()}[likelihood]
    model, x, y = case("mlp", likelihood)
    F = natgrad.fisher(model, (x, y), likelihood=obj, estimator="empirical", structure=structure)
    H.assert_rel_close(F.to_dense(), expected("mlp", likelihood, "empirical", structure), H.RTOL,
                       "likelihood object")


def test_defaults_are_categorical_exact_kfac():
    natgrad = H.lib()
    model, x, y = case("mlp", "categorical")
    F = natgrad.fisher(model, x)
    H.assert_rel_close(F.to_dense(), expected("mlp", "categorical", "exact", "kfac"), H.RTOL,
                       "defaults")


def test_bernoulli_binary_targets_empirical():
    """Hard 0/1 targets (the common case) in the empirical Fisher."""
    natgrad = H.lib()
    model = H.mlp(5)
    x, _ = H.make_data(model, "bernoulli", 5)
    y = (torch.rand(5, 3, dtype=H.DT) > 0.5).to(H.DT)
    F = natgrad.fisher(model, (x, y), likelihood="bernoulli", estimator="empirical",
                       structure="dense")
    H.assert_rel_close(F.to_dense(), ref.fisher_empirical(model, x, y, "bernoulli"), H.RTOL,
                       "bernoulli hard targets")


@pytest.mark.parametrize("structure", ["dense", "kfac", "implicit"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8],
                         ids=["int32", "int16", "uint8"])
def test_categorical_targets_of_any_integer_dtype(dtype, structure):
    """Class indices stored as int32 / int16 / uint8 (MNIST's labels are uint8) are integer
    class indices: the empirical Fisher equals the one with int64 labels."""
    natgrad = H.lib()
    model, x, y = case("mlp", "categorical")
    F = natgrad.fisher(model, (x, y.to(dtype)), likelihood="categorical", estimator="empirical",
                       structure=structure)
    H.assert_rel_close(F.to_dense(), expected("mlp", "categorical", "empirical", structure),
                       H.RTOL, f"{dtype} targets")


@pytest.mark.parametrize("structure", ["dense", "kfac"])
def test_bernoulli_bool_and_gaussian_integer_targets(structure):
    natgrad = H.lib()
    model = H.mlp(6)
    x, _ = H.make_data(model, "bernoulli", 4)
    yb = torch.rand(4, 3, dtype=H.DT) > 0.5
    F = natgrad.fisher(model, (x, yb), likelihood="bernoulli", estimator="empirical",
                       structure=structure)
    want = H.expected_matrix(model, x, yb.to(H.DT), "bernoulli", "empirical", structure)
    H.assert_rel_close(F.to_dense(), want, H.RTOL, "bool bernoulli targets")
    yi = torch.randint(-2, 3, (4, 3))
    F = natgrad.fisher(model, (x, yi), likelihood="gaussian", estimator="empirical",
                       structure=structure)
    want = H.expected_matrix(model, x, yi.to(H.DT), "gaussian", "empirical", structure)
    H.assert_rel_close(F.to_dense(), want, H.RTOL, "integer gaussian targets")


@pytest.mark.parametrize("structure", ["dense", "kfac", "ekfac", "implicit"])
def test_output_sizes_two_classes_and_one_output(structure):
    natgrad = H.lib()
    for sizes, likelihood in (((5, 4, 2), "categorical"), ((5, 4, 1), "gaussian"),
                              ((5, 4, 1), "bernoulli"), ((5, 4, 7), "categorical")):
        model = H.mlp(7, sizes=sizes)
        x, y = H.make_data(model, likelihood, 4)
        for estimator in ("exact", "empirical"):
            F = natgrad.fisher(model, (x, y), likelihood=likelihood, estimator=estimator,
                               structure=structure)
            want = H.expected_matrix(model, x, y, likelihood, estimator, structure)
            H.assert_rel_close(F.to_dense(), want, H.RTOL, f"{sizes} {likelihood} {estimator}")


@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_confident_predictions(structure):
    """Large logits (p close to one-hot): D is nearly singular; still exact in float64."""
    natgrad = H.lib()
    model = H.mlp(8)
    with torch.no_grad():
        model[2].weight.mul_(30.0)
    x, y = H.make_data(model, "categorical", 5)
    F = natgrad.fisher(model, x, likelihood="categorical", estimator="exact", structure=structure)
    want = H.expected_matrix(model, x, y, "categorical", "exact", structure)
    # entries are down to ~1e-12 of the largest: compare with an absolute floor of 1e-9·max
    H.assert_rel_close(F.to_dense(), want, 1e-9, "confident")
