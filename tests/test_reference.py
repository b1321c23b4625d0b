"""Checks of the brute-force reference itself (no natgrad involved).

Every quantity the library is compared against is computed here along two independent
paths, or checked against an identity that the definition implies, so a mistake in the
reference cannot silently become "the expected value".
"""

import math

import pytest
import torch

import helpers as H
import reference as ref

MODELS = {
    "mlp": lambda: H.mlp(0),
    "cnn": lambda: H.cnn(0),
    "cnn_exotic": lambda: H.cnn_exotic(0),
    "token_pool": lambda: H.token_mlp(0, pool=True),
    "token_seq": lambda: H.token_mlp(0, pool=False),
    "token4d": lambda: H.token4d(0),
    "cnn_padmodes": lambda: H.cnn_padmodes(0),
}


@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_dense_two_paths_agree(model_name, estimator, likelihood):
    """Enumeration of y / per-example autograd == Jᵀ V Vᵀ J with closed-form columns."""
    model = MODELS[model_name]()
    x, y = H.make_data(model, likelihood, 4)
    a = ref.fisher_dense(model, x, y, likelihood, estimator, variance=0.7)
    b = ref.fisher_via_columns(model, x, y, likelihood, estimator, variance=0.7)
    H.assert_rel_close(a, b, 1e-12, "reference paths")
    assert torch.allclose(a, a.T, rtol=0, atol=1e-15)
    assert float(a.abs().max()) > 1e-3


def test_gaussian_exact_is_jtj_over_variance():
    model = H.mlp(1)
    x, _ = H.make_data(model, "gaussian", 3)
    F = ref.fisher_exact(model, x, "gaussian", variance=2.5)
    JtJ = sum(ref.jacobian(model, x, n)[0].T @ ref.jacobian(model, x, n)[0] for n in range(3))
    H.assert_rel_close(F, JtJ / (2.5 * 3), 1e-13, "gaussian")


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
def test_gamma_is_layer_gradient(model_name, likelihood):
    """Σ_t g_t ā_tᵀ, placed with the index map, is the layer slice of J_θᵀ v_k: checks the
    patch extraction, the bias column and the flat ordering used by the K-FAC reference."""
    if model_name == "token_seq" and likelihood == "categorical":
        pytest.skip("sequence output is not categorical logits [N, C]")
    model = MODELS[model_name]()
    x, y = H.make_data(model, likelihood, 2)
    samples, layers = ref.layer_samples(model, x, y, likelihood, "exact")
    slices = {name: sl for name, _, sl in ref.module_slices(model)}
    for n in range(2):
        J, f = ref.jacobian(model, x, n)
        V = ref.output_columns(f, None, likelihood, "exact")
        full = (J.T @ V).T  # [K, P]
        for name, m in layers:
            sl = slices[name]
            idx = ref.layer_index_map(m)
            got = torch.zeros(V.shape[1], sl.stop - sl.start, dtype=H.DT)
            for g, ids in enumerate(idx):
                gam = ref.per_example_gamma(samples[name][n], m, g)  # [K, o, d]
                got[:, torch.tensor(ids)] = gam.reshape(gam.shape[0], -1)
            H.assert_rel_close(got, full[:, sl], 1e-12, f"Γ of {name}")


def test_kfac_reference_exact_for_one_example():
    model = H.mlp(2)
    x, y = H.make_data(model, "categorical", 1)
    for likelihood in H.LIKELIHOODS:
        factors = ref.kfac_factors(model, x, y, likelihood, "exact")
        K = ref.kfac_dense(model, factors)
        F = ref.block_diagonal(ref.fisher_exact(model, x, likelihood), model)
        H.assert_rel_close(K, F, 1e-12, "kfac N=1")


def test_kfac_reference_uses_means():
    """A averages over examples and positions, G sums over columns/positions, means over N:
    check one entry against a hand-written loop for the token model."""
    model = H.token_mlp(3, pool=False)
    x, _ = H.make_data(model, "gaussian", 3)
    factors = ref.kfac_factors(model, x, None, "gaussian", "exact")
    A, G = factors["l1"][0]
    hs = x  # l1 input is x itself
    A_loop = torch.zeros(4, 4, dtype=H.DT)
    for n in range(3):
        for t in range(3):
            a = torch.cat([hs[n, t], torch.ones(1, dtype=H.DT)])
            A_loop += torch.outer(a, a)
    H.assert_rel_close(A, A_loop / 9, 1e-13, "A")
    # G of the output layer with D = I: (1/N) Σ_n Σ_t Σ_c e_c e_cᵀ restricted = T·I
    _, G2 = factors["l2"][0]
    H.assert_rel_close(G2, 3 * torch.eye(2, dtype=H.DT), 1e-13, "G of last layer")


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "cnn_exotic", "token_seq"])
@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
def test_ekfac_reference_properties(model_name, likelihood):
    """trace(EKFAC block) = trace(F block), and EKFAC is at least as close as K-FAC."""
    if model_name == "token_seq" and likelihood == "categorical":
        pytest.skip("sequence output is not categorical logits [N, C]")
    model = MODELS[model_name]()
    x, y = H.make_data(model, likelihood, 3)
    E, factors = ref.ekfac_dense(model, x, y, likelihood, "exact")
    K = ref.kfac_dense(model, factors)
    F = ref.block_diagonal(ref.fisher_exact(model, x, likelihood), model)
    for _, _, sl in ref.module_slices(model):
        assert math.isclose(float(torch.trace(E[sl, sl])), float(torch.trace(F[sl, sl])),
                            rel_tol=1e-11)
    assert float((F - E).norm()) <= float((F - K).norm()) * (1 + 1e-12)
    assert torch.allclose(E, E.T, atol=1e-14)


@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
def test_mc_variance_formula_by_simulation(likelihood):
    """The exact Monte-Carlo error formula agrees with a direct simulation (S = 1)."""
    model = H.mlp(4, sizes=(3, 3, 2))
    x, _ = H.make_data(model, likelihood, 2)
    var = 0.6
    err2, mean = ref.mc_expected_sq_error_dense(model, x, likelihood, 1, var)
    F = ref.fisher_exact(model, x, likelihood, var)
    H.assert_rel_close(mean, F, 1e-12, "mean of the outcome distribution")
    g = torch.Generator().manual_seed(5)
    Js = [ref.jacobian(model, x, n) for n in range(2)]
    R = 4000
    acc = 0.0
    for _ in range(R):
        Fs = 0
        for J, f in Js:
            if likelihood == "categorical":
                p = torch.softmax(f, 0)
                k = int(torch.multinomial(p, 1, generator=g))
                v = torch.eye(f.numel(), dtype=H.DT)[k] - p
            elif likelihood == "gaussian":
                v = torch.randn(f.numel(), generator=g, dtype=H.DT) / math.sqrt(var)
            else:
                p = torch.sigmoid(f)
                v = torch.bernoulli(p, generator=g) - p
            gr = J.T @ v
            Fs = Fs + torch.outer(gr, gr) / 2
        acc += float((Fs - F).pow(2).sum())
    # relative standard error of a mean of R heavy-ish tailed terms: generous 15 %
    assert abs(acc / R - err2) <= 0.15 * err2, (acc / R, err2)
