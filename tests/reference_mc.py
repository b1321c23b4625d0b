"""Brute-force float64 reference, the statistical part: the exact expected squared error of
the Monte-Carlo Fisher (dense, trace, K-FAC), by enumerating the outcomes or by Isserlis'
theorem. See :mod:`reference` for the conventions."""

from __future__ import annotations

import torch

from reference_dense import jacobian, score_outcomes
from reference_kron import _group_cols, kfac_factors, layer_samples


# --------------------------------------------------------------------------------------
# Monte-Carlo variance (exact, by enumeration or Isserlis' theorem)
# --------------------------------------------------------------------------------------
def _outcome_variance(f, likelihood, variance, quad):
    """E||X - E X||² and E X for one example, X = quad(v, v) with v = d log p(y|f)/df,
    y ~ p(y|f); ``quad(u, w)`` is bilinear, returning a tensor."""
    if likelihood == "gaussian":
        C = f.numel()
        eye = torch.eye(C, dtype=torch.float64)
        # v = z / σ with z ~ N(0, I): X = Σ_ij z_i z_j K_ij, K_ij = quad(e_i, e_j) / σ²
        K = [[quad(eye[i], eye[j]) / variance for j in range(C)] for i in range(C)]
        mean = sum(K[i][i] for i in range(C))
        var = sum(
            float((K[i][j] * (K[i][j] + K[j][i])).sum()) for i in range(C) for j in range(C)
        )
        return var, mean
    outcomes = score_outcomes(f, likelihood)
    mean = sum(p * quad(v, v) for p, v in outcomes)
    second = sum(p * float(quad(v, v).pow(2).sum()) for p, v in outcomes)
    return second - float(mean.pow(2).sum()), mean


def mc_expected_sq_error_dense(model, x, likelihood, samples, variance=1.0, mask=None):
    """E ||M∘(F_mc - F)||_F² for the Monte-Carlo Fisher with ``samples`` draws per input;
    M a 0/1 mask (None = dense). Also returns the exact M∘F (the mean) as a check."""
    N = x.shape[0]
    total, meansum = 0.0, 0
    for n in range(N):
        J, f = jacobian(model, x, n)

        def quad(u, w, J=J):
            out = torch.outer(J.T @ u, J.T @ w)
            return out if mask is None else out * mask

        var, mean = _outcome_variance(f.reshape(-1), likelihood, variance, quad)
        total += var
        meansum = meansum + mean
    return total / (N * N * samples), meansum / N


def mc_expected_sq_error_trace(model, x, likelihood, samples, variance=1.0):
    """E (tr F_mc - tr F)² and tr F."""
    N = x.shape[0]
    total, meansum = 0.0, 0.0
    for n in range(N):
        J, f = jacobian(model, x, n)

        def quad(u, w, J=J):
            return ((J.T @ u) * (J.T @ w)).sum().reshape(1)

        var, mean = _outcome_variance(f.reshape(-1), likelihood, variance, quad)
        total += var
        meansum += float(mean)
    return total / (N * N * samples), meansum / N


def mc_expected_sq_error_kfac(model, x, likelihood, samples, variance=1.0):
    """E ||KFAC_mc - KFAC_exact||_F² where only G is sampled:
    Σ_layers Σ_groups ||A_g||² E||G_mc,g - G_g||². Also returns the exact factors."""
    smp, layers = layer_samples(model, x, None, likelihood, "exact", variance)
    factors = kfac_factors(model, x, None, likelihood, "exact", variance, samples=smp)
    N = x.shape[0]
    total = 0.0
    for name, m in layers:
        for g, (A, G) in enumerate(factors[name]):
            _, rows = _group_cols(m, g)
            var_g = 0.0
            for s in smp[name]:
                Ja = s["Ja"][:, :, rows]  # [C, T, out_g]

                def quad(u, w, Ja=Ja):
                    gu = torch.einsum("c,cto->to", u, Ja)
                    gw = torch.einsum("c,cto->to", w, Ja)
                    return gu.T @ gw

                var, _ = _outcome_variance(s["f"].reshape(-1), likelihood, variance, quad)
                var_g += var
            total += float(A.pow(2).sum()) * var_g / (N * N * samples)
    return total, factors
