"""Brute-force float64 reference, the dense part: the flat parameter vector, per-example
log-likelihoods, Jacobians and output Fishers, the dense Fisher (exact and empirical) and its
projections onto the generic structures. See :mod:`reference` for the conventions."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as TF
from torch import nn

LIKELIHOODS = ("categorical", "gaussian", "bernoulli")


# --------------------------------------------------------------------------------------
# parameters and the flat vector
# --------------------------------------------------------------------------------------
def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for _, p in trainable(model))


def param_offsets(model: nn.Module) -> dict[str, slice]:
    """Parameter name -> slice of the flat vector."""
    out, offset = {}, 0
    for name, p in trainable(model):
        out[name] = slice(offset, offset + p.numel())
        offset += p.numel()
    return out


def module_slices(model: nn.Module) -> list[tuple[str, list[str], slice]]:
    """(module name, its trainable parameter names, slice) per module owning trainable params,
    in flat order. Derived from the parameter names only."""
    out: list[tuple[str, list[str], slice]] = []
    for name, sl in param_offsets(model).items():
        owner = name.rpartition(".")[0]
        if out and out[-1][0] == owner and out[-1][2].stop == sl.start:
            out[-1] = (owner, out[-1][1] + [name], slice(out[-1][2].start, sl.stop))
        else:
            out.append((owner, [name], sl))
    return out


def flat_grad(scalar: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
    )


def per_example_output(model: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    return model(x[n : n + 1])[0]


# --------------------------------------------------------------------------------------
# log-likelihoods, per example
# --------------------------------------------------------------------------------------
def log_lik(f: torch.Tensor, y: torch.Tensor, likelihood: str, variance: float = 1.0):
    """log p(y | f) (up to an additive constant) for one example's output ``f``."""
    if likelihood == "categorical":
        return torch.log_softmax(f, dim=-1)[int(y)]
    if likelihood == "gaussian":
        return -0.5 * ((y - f) ** 2).sum() / variance
    if likelihood == "bernoulli":
        return -TF.binary_cross_entropy_with_logits(f, y.to(f.dtype), reduction="sum")
    raise ValueError(likelihood)


def jacobian(model: nn.Module, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(J_n [C, P] = d f_n.flatten() / d θ, f_n detached) for example n."""
    params = [p for _, p in trainable(model)]
    f = per_example_output(model, x, n)
    flat = f.reshape(-1)
    rows = [flat_grad(flat[c], params) for c in range(flat.numel())]
    return torch.stack(rows), f.detach()


def output_fisher(f: torch.Tensor, likelihood: str, variance: float = 1.0) -> torch.Tensor:
    """D(f) [C, C]: the Fisher of the output distribution for one example (f flattened)."""
    flat = f.reshape(-1)
    if likelihood == "categorical":
        p = torch.softmax(flat, 0)
        return torch.diag(p) - torch.outer(p, p)
    if likelihood == "gaussian":
        return torch.eye(flat.numel(), dtype=f.dtype) / variance
    if likelihood == "bernoulli":
        p = torch.sigmoid(flat)
        return torch.diag(p * (1 - p))
    raise ValueError(likelihood)


def score_outcomes(f: torch.Tensor, likelihood: str):
    """Discrete output distributions: list of (probability, v = d log p(y|f)/d f flattened)."""
    flat = f.reshape(-1)
    if likelihood == "categorical":
        p = torch.softmax(flat, 0)
        eye = torch.eye(flat.numel(), dtype=f.dtype)
        return [(float(p[y]), eye[y] - p) for y in range(flat.numel())]
    if likelihood == "bernoulli":
        p = torch.sigmoid(flat)
        out = []
        for bits in itertools.product((0.0, 1.0), repeat=flat.numel()):
            y = torch.tensor(bits, dtype=f.dtype)
            prob = float(torch.prod(torch.where(y > 0, p, 1 - p)))
            out.append((prob, y - p))
        return out
    raise ValueError(f"{likelihood} has no discrete outcome list")


def output_columns(f, y, likelihood: str, estimator: str, variance: float = 1.0):
    """V [C, K] with Σ_k v_k v_kᵀ = D (exact) or V = d log p(y|f)/d f (empirical)."""
    flat = f.reshape(-1).detach()
    if estimator == "exact":
        if likelihood == "categorical":
            p = torch.softmax(flat, 0)
            eye = torch.eye(flat.numel(), dtype=f.dtype)
            return torch.stack([p[k].sqrt() * (eye[k] - p) for k in range(flat.numel())], 1)
        if likelihood == "gaussian":
            return torch.eye(flat.numel(), dtype=f.dtype) / math.sqrt(variance)
        if likelihood == "bernoulli":
            p = torch.sigmoid(flat)
            return torch.diag((p * (1 - p)).sqrt())
    if estimator == "empirical":
        g = flat.clone().requires_grad_(True)
        (v,) = torch.autograd.grad(log_lik(g.view_as(f), y, likelihood, variance), g)
        return v.unsqueeze(1)
    raise ValueError((likelihood, estimator))


# --------------------------------------------------------------------------------------
# dense Fisher
# --------------------------------------------------------------------------------------
def fisher_exact(model: nn.Module, x: torch.Tensor, likelihood: str, variance: float = 1.0):
    """(1/N) Σ_n J_nᵀ D_n J_n. Categorical: by enumerating y, Σ_y p(y|x) g_y g_yᵀ with
    g_y = ∇θ log p(y|x) by autograd. Gaussian / Bernoulli: per-example Jacobians."""
    params = [p for _, p in trainable(model)]
    P = num_params(model)
    F = torch.zeros(P, P, dtype=torch.float64)
    N = x.shape[0]
    for n in range(N):
        if likelihood == "categorical":
            f = per_example_output(model, x, n)
            assert f.dim() == 1
            logp = torch.log_softmax(f, 0)
            probs = logp.detach().exp()
            for y in range(f.numel()):
                g = flat_grad(logp[y], params)
                F += probs[y] * torch.outer(g, g)
        else:
            J, f = jacobian(model, x, n)
            flat = f.reshape(-1)
            if likelihood == "gaussian":
                F += J.T @ J / variance
            elif likelihood == "bernoulli":
                p = torch.sigmoid(flat)
                F += J.T @ torch.diag(p * (1 - p)) @ J
            else:
                raise ValueError(likelihood)
    return F / N


def per_example_grads(model, x, y, likelihood: str, variance: float = 1.0) -> torch.Tensor:
    """g_n = ∇θ log p(y_n | x_n), [N, P]."""
    params = [p for _, p in trainable(model)]
    rows = []
    for n in range(x.shape[0]):
        f = per_example_output(model, x, n)
        rows.append(flat_grad(log_lik(f, y[n], likelihood, variance), params))
    return torch.stack(rows)


def fisher_empirical(model, x, y, likelihood: str, variance: float = 1.0):
    G = per_example_grads(model, x, y, likelihood, variance)
    return G.T @ G / x.shape[0]


def fisher_dense(model, x, y, likelihood, estimator, variance=1.0):
    if estimator == "exact":
        return fisher_exact(model, x, likelihood, variance)
    if estimator == "empirical":
        return fisher_empirical(model, x, y, likelihood, variance)
    raise ValueError(estimator)


def fisher_via_columns(model, x, y, likelihood, estimator, variance=1.0):
    """(1/N) Σ_n Σ_k (J_nᵀ v_nk)(J_nᵀ v_nk)ᵀ: a second, independent path used to check
    :func:`fisher_dense` itself."""
    P = num_params(model)
    F = torch.zeros(P, P, dtype=torch.float64)
    for n in range(x.shape[0]):
        J, f = jacobian(model, x, n)
        V = output_columns(f, None if y is None else y[n], likelihood, estimator, variance)
        B = J.T @ V
        F += B @ B.T
    return F / x.shape[0]


# --------------------------------------------------------------------------------------
# projections of a dense matrix onto the structures
# --------------------------------------------------------------------------------------
def block_diagonal(F: torch.Tensor, model: nn.Module) -> torch.Tensor:
    out = torch.zeros_like(F)
    for _, _, sl in module_slices(model):
        out[sl, sl] = F[sl, sl]
    return out


def block_mask(model: nn.Module) -> torch.Tensor:
    P = num_params(model)
    return block_diagonal(torch.ones(P, P, dtype=torch.float64), model)


def diag_mask(model: nn.Module) -> torch.Tensor:
    return torch.eye(num_params(model), dtype=torch.float64)
