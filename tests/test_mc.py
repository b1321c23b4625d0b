"""The Monte-Carlo Fisher converges to the exact one at the rate its variance dictates.

For S samples per input, F_mc - F is a mean of N·S independent zero-mean matrices, so
E||P(F_mc) - P(F)||²_F = (1/(N² S)) Σ_n Var_n for any linear projection P (dense, blocks,
diagonal). The reference computes Var_n exactly (enumeration of y for categorical /
bernoulli, Isserlis' theorem for the Gaussian). We require the observed error to be within
K_SIGMA root-mean-square errors: for a sum of many independent terms the chance of a
larger deviation is far below 1e-6 (Chebyshev alone gives 1/K_SIGMA² = 4 %, the
concentration of a Frobenius norm of many terms makes it astronomically smaller), and the
seed is fixed, so the test is deterministic.

Each test also checks its own power: the bound must be small against ||F|| (so a wrong
scaling by a factor >= 1.5, or a sum instead of a mean over samples, fails) and against the distance to the
empirical Fisher (so using the data labels instead of sampled ones fails).
"""

import math

import pytest
import torch

import helpers as H
import reference as ref

K_SIGMA = 5.0
S = 200
N = 6


def mc_fisher(model, x, y, likelihood, structure, samples, seed=0, variance=1.0):
    torch.manual_seed(seed)
    return H.lib().fisher(model, (x, y), likelihood=H.lik_arg(likelihood, variance),
                          estimator="mc", structure=structure, samples=samples)


def check_power(bound, exact, empirical):
    assert bound <= 0.5 * float(exact.norm()), "test too weak: raise S"
    assert bound <= 0.5 * float((empirical - exact).norm()), "test cannot tell mc from empirical"


MASKS = {
    "dense": lambda m: None,
    "implicit": lambda m: None,
    "block_diagonal": ref.block_mask,
    "kron_sum": ref.block_mask,
    "diagonal": ref.diag_mask,
}


@pytest.mark.parametrize("structure", list(MASKS))
@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
def test_mc_linear_structures_within_variance_bound(likelihood, structure):
    var = 0.8 if likelihood == "gaussian" else 1.0
    model = H.mlp(20)
    x, y = H.make_data(model, likelihood, N)
    mask = MASKS[structure](model)
    err2, exact = ref.mc_expected_sq_error_dense(model, x, likelihood, S, var, mask)
    bound = K_SIGMA * math.sqrt(err2)
    emp = ref.fisher_empirical(model, x, y, likelihood, var)
    check_power(bound, exact, emp if mask is None else emp * mask)
    got = mc_fisher(model, x, y, likelihood, structure, S, variance=var).to_dense()
    err = float((got - exact).norm())
    assert err <= bound, (
        f"mc {structure}/{likelihood}: ||F_mc - F||_F = {err:.4g} > {K_SIGMA}·rms = {bound:.4g} "
        f"(rms {math.sqrt(err2):.4g}, ||F|| {float(exact.norm()):.4g})")


@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_mc_kfac_within_variance_bound(model_name, likelihood):
    """Only G is random in K-FAC: ||(G_mc - G) ⊗ A|| = ||G_mc - G|| ||A|| per layer."""
    model = H.mlp(21) if model_name == "mlp" else H.cnn(21)
    n = N if model_name == "mlp" else 3
    x, y = H.make_data(model, likelihood, n)
    err2, factors = ref.mc_expected_sq_error_kfac(model, x, likelihood, S)
    exact = ref.kfac_dense(model, factors)
    emp = ref.kfac_dense(model, ref.kfac_factors(model, x, y, likelihood, "empirical"))
    bound = K_SIGMA * math.sqrt(err2)
    check_power(bound, exact, emp)
    got = mc_fisher(model, x, y, likelihood, "kfac", S).to_dense()
    err = float((got - exact).norm())
    assert err <= bound, f"mc kfac: error {err:.4g} > bound {bound:.4g}"


@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
def test_mc_ekfac_trace_within_variance_bound(likelihood):
    """trace(EKFAC) = Σ s = (1/N) Σ_{n,k} ||Γ_nk||² = trace(F_mc): linear in the samples."""
    model = H.mlp(22)
    x, y = H.make_data(model, likelihood, N)
    err2, tr_exact = ref.mc_expected_sq_error_trace(model, x, likelihood, 4 * S)
    bound = K_SIGMA * math.sqrt(err2)
    tr_emp = float(torch.trace(ref.fisher_empirical(model, x, y, likelihood)))
    assert bound <= 0.5 * tr_exact and bound <= 0.5 * abs(tr_emp - tr_exact), "test too weak"
    F = mc_fisher(model, x, y, likelihood, "ekfac", 4 * S)
    got = float(F.trace())
    assert abs(got - tr_exact) <= bound, f"ekfac mc trace {got:.6g} vs {tr_exact:.6g} ± {bound:.3g}"
    # and EKFAC's trace equals trace of the mc Fisher it was built from: per block, the same
    # sampled columns give the same sum of squares, whatever the eigenbasis.
    assert abs(float(F.to_dense().trace()) - got) <= 1e-10 * got


def test_mc_samples_reduce_error():
    """More samples per input, smaller error (S=4 vs S=400): the samples argument is used."""
    model = H.mlp(23)
    x, y = H.make_data(model, "categorical", N)
    exact = ref.fisher_exact(model, x, "categorical")
    errs = {}
    for s in (4, 400):
        err2, _ = ref.mc_expected_sq_error_dense(model, x, "categorical", s)
        got = mc_fisher(model, x, y, "categorical", "dense", s, seed=1).to_dense()
        errs[s] = float((got - exact).norm())
        assert errs[s] <= K_SIGMA * math.sqrt(err2)
    # rms ratio is 10; a factor 2.5 is missed only by a > 4·rms deviation or a < rms/4 error
    # at S = 4, both of negligible probability for the fixed seed
    assert errs[400] < errs[4] / 2.5, errs


def test_mc_differs_between_seeds_and_repeats_with_seed():
    model = H.mlp(24)
    x, y = H.make_data(model, "categorical", N)
    a = mc_fisher(model, x, y, "categorical", "dense", 2, seed=5).to_dense()
    b = mc_fisher(model, x, y, "categorical", "dense", 2, seed=5).to_dense()
    c = mc_fisher(model, x, y, "categorical", "dense", 2, seed=6).to_dense()
    assert torch.equal(a, b), "mc is not reproducible under torch.manual_seed"
    assert not torch.equal(a, c), "mc does not sample (same result for different seeds)"


@pytest.mark.slow
@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
def test_mc_many_samples(likelihood):
    big = 5000
    model = H.mlp(25)
    x, y = H.make_data(model, likelihood, N)
    err2, exact = ref.mc_expected_sq_error_dense(model, x, likelihood, big)
    got = mc_fisher(model, x, y, likelihood, "dense", big).to_dense()
    err = float((got - exact).norm())
    assert err <= K_SIGMA * math.sqrt(err2)
    assert err <= 0.05 * float(exact.norm())
    kerr2, factors = ref.mc_expected_sq_error_kfac(model, x, likelihood, big)
    kexact = ref.kfac_dense(model, factors)
    kgot = mc_fisher(model, x, y, likelihood, "kfac", big).to_dense()
    assert float((kgot - kexact).norm()) <= K_SIGMA * math.sqrt(kerr2)
    # EKFAC is nonlinear in the samples (eigenbases); with many samples it approaches the
    # exact EKFAC: allow 10x the relative error of the dense estimate.
    eexact, _ = ref.ekfac_dense(model, x, None, likelihood, "exact")
    egot = mc_fisher(model, x, y, likelihood, "ekfac", big).to_dense()
    rel = float((egot - eexact).norm()) / float(eexact.norm())
    assert rel <= 10 * K_SIGMA * math.sqrt(err2) / float(exact.norm()), rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_categorical_sampler_frequencies(dtype):
    """Class frequencies of many draws match softmax(logits) within K_SIGMA binomial standard
    deviations, and a class of probability 0 (logit -inf) is never drawn, in any position."""
    lik = H.lib().likelihoods.get_likelihood("categorical")
    draws = 200_000
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0, float("-inf")],
                           [float("-inf"), 1.0, 1.0, float("-inf"), -3.0]], dtype=dtype)
    p = torch.softmax(logits.double(), dim=1)
    torch.manual_seed(3)
    y = lik.sample(logits.repeat_interleave(draws, 0)).reshape(2, draws)
    assert y.dtype == torch.long and y.shape == (2, draws)
    freq = torch.nn.functional.one_hot(y, 5).double().mean(1)
    sd = (p * (1 - p) / draws).sqrt()
    assert bool(((freq - p).abs() <= K_SIGMA * sd).all()), (freq, p)
    assert bool((freq[p == 0] == 0).all()), "a zero-probability class was drawn"
    # power: any class drawn 20 % too often or too rarely fails
    assert bool(((K_SIGMA * sd)[p > 0] < 0.2 * p[p > 0]).all())
