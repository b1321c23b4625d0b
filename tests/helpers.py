"""Small float64 models, data and comparison helpers shared by the test files.

The models are defined in :mod:`helpers_models` and re-exported here (``import helpers as H``)."""

from __future__ import annotations

import torch
from torch import nn

import reference as ref
from helpers_models import (DT, EmbedNet, Reversed, Tied, Token4D, TokenMLP, Unused,
                            attention_net, batchnorm_net, cnn, cnn_exotic, cnn_inplace,
                            cnn_padmodes, conv1d_net, custom_net, embed_net, groupnorm_net,
                            layernorm_net, linear_subclass_net, mlp, recurrent_net,
                            registered_twice_net, reversed_net, seeded, shared_net, tied_net,
                            token4d, token_mlp, unused_net)

__all__ = ["STRUCTURES", "GENERIC_STRUCTURES", "KRON_STRUCTURES", "ESTIMATORS", "LIKELIHOODS",
           "RTOL", "CG_TOL", "lib", "inputs_for", "targets_for", "make_data", "lik_arg",
           "expected_matrix", "project", "rel_err", "assert_rel_close", "snapshot",
           "assert_unchanged", "DT", "seeded", "mlp", "cnn", "cnn_exotic", "cnn_padmodes",
           "cnn_inplace", "tied_net", "recurrent_net", "attention_net", "conv1d_net",
           "groupnorm_net", "linear_subclass_net", "token4d", "unused_net", "layernorm_net",
           "batchnorm_net", "custom_net", "embed_net", "token_mlp", "reversed_net", "shared_net",
           "registered_twice_net"]

STRUCTURES = ("dense", "block_diagonal", "diagonal", "kron_sum", "kfac", "ekfac", "implicit")
GENERIC_STRUCTURES = ("dense", "block_diagonal", "diagonal", "implicit")
KRON_STRUCTURES = ("kron_sum", "kfac", "ekfac")
ESTIMATORS = ("exact", "mc", "empirical")
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")

# float64 comparisons of two computations of the same sums: rounding is ~1e-16 per operation,
# sums have < 10^3 terms and the eigendecompositions in EKFAC lose at most eps/gap; 1e-9
# relative (to the largest entry) leaves many orders of magnitude of head-room and still
# catches any wrong term, factor or permutation (those are O(1) relative).
RTOL = 1e-9
# Relative residual of the library's conjugate gradient in float64 (natgrad.linalg
# default_tolerance). Structures solved directly beat it by orders of magnitude.
CG_TOL = 1e-10


def lib():
    import natgrad

    return natgrad


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def inputs_for(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "input_shape"):
        return torch.randn(n, *model.input_shape, generator=g, dtype=DT)
    if isinstance(model, EmbedNet):
        return torch.randint(0, 6, (n, 4), generator=g)
    if isinstance(model, TokenMLP):
        return torch.randn(n, 3, 3, generator=g, dtype=DT)
    if isinstance(model, Token4D):
        return torch.randn(n, 2, 3, 3, generator=g, dtype=DT)
    if isinstance(model, (Reversed, Unused, Tied)):
        return torch.randn(n, 5, generator=g, dtype=DT)
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    if isinstance(first, nn.Conv2d):
        if first.in_channels == 2:
            return torch.randn(n, 2, 5, 5, generator=g, dtype=DT)
        return torch.randn(n, 4, 7, 9, generator=g, dtype=DT)
    return torch.randn(n, first.in_features, generator=g, dtype=DT)


def targets_for(model, x, likelihood, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = model(x)
    if likelihood == "categorical":
        return torch.randint(0, out.shape[1], (x.shape[0],), generator=g)
    if likelihood == "gaussian":
        # noise larger than σ = 1, so the empirical Fisher is far from the exact one
        return out + 2.0 * torch.randn(out.shape, generator=g, dtype=DT)
    if likelihood == "bernoulli":
        # soft targets in [0, 1], with some exact 0 and 1
        y = torch.rand(out.shape, generator=g, dtype=DT)
        y[0] = (y[0] > 0.5).to(DT)
        return y
    raise ValueError(likelihood)


def make_data(model, likelihood, n, seed=1):
    x = inputs_for(model, n, seed)
    return x, targets_for(model, x, likelihood, seed + 1)


def lik_arg(likelihood, variance=1.0):
    """What is passed as ``likelihood=``: the name, or an object for a non-unit variance."""
    if likelihood == "gaussian" and variance != 1.0:
        return lib().Gaussian(variance=variance)
    return likelihood


# --------------------------------------------------------------------------------------
# expected matrices from the reference
# --------------------------------------------------------------------------------------
def expected_matrix(model, x, y, likelihood, estimator, structure, variance=1.0):
    if structure == "kfac":
        factors = ref.kfac_factors(model, x, y, likelihood, estimator, variance)
        return ref.kfac_dense(model, factors)
    if structure == "ekfac":
        return ref.ekfac_dense(model, x, y, likelihood, estimator, variance)[0]
    F = ref.fisher_dense(model, x, y, likelihood, estimator, variance)
    return project(F, model, structure)


def project(F, model, structure):
    if structure in ("dense", "implicit"):
        return F
    if structure in ("block_diagonal", "kron_sum"):
        return ref.block_diagonal(F, model)
    if structure == "diagonal":
        return torch.diag(torch.diagonal(F))
    raise ValueError(structure)


# --------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------
def rel_err(actual, expected):
    """max |a - e| / max |e| (max |e| floored at the tiniest positive float)."""
    actual = torch.as_tensor(actual, dtype=DT)
    expected = torch.as_tensor(expected, dtype=DT)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(torch.finfo(DT).tiny)
    return float((actual - expected).abs().max() / scale)


def assert_rel_close(actual, expected, rtol=RTOL, what=""):
    err = rel_err(actual, expected)
    if not err <= rtol:
        a = torch.as_tensor(actual, dtype=DT)
        e = torch.as_tensor(expected, dtype=DT)
        diff = (a - e).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{what}: relative max error {err:.3e} > {rtol:.0e}; worst entry {idx}: "
            f"actual {float(a[idx]):.10g} expected {float(e[idx]):.10g}; "
            f"||actual||_F={float(a.norm()):.6g} ||expected||_F={float(e.norm()):.6g}"
        )


# --------------------------------------------------------------------------------------
# model snapshot (for "the model is unchanged" checks)
# --------------------------------------------------------------------------------------
def _hook_dicts(m):
    names = ["_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
             "_state_dict_hooks", "_load_state_dict_pre_hooks"]
    return {n: len(getattr(m, n, {}) or {}) for n in names}


def _global_hooks():
    import torch.nn.modules.module as mm

    names = ["_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks"]
    return {n: len(getattr(mm, n, {}) or {}) for n in names}


def snapshot(model):
    return dict(
        hooks={name: _hook_dicts(m) for name, m in model.named_modules()},
        tensor_hooks={name: (len(getattr(p, "_backward_hooks", None) or {}),
                             len(getattr(p, "_post_accumulate_grad_hooks", None) or {}))
                      for name, p in model.named_parameters()},
        global_hooks=_global_hooks(),
        training={name: m.training for name, m in model.named_modules()},
        requires_grad={name: p.requires_grad for name, p in model.named_parameters()},
        params={name: p.detach().clone() for name, p in model.named_parameters()},
        param_objects={name: (id(p), type(p)) for name, p in model.named_parameters(remove_duplicate=False)},
        grads={name: (None if p.grad is None else p.grad.detach().clone())
               for name, p in model.named_parameters()},
        buffers={name: b.detach().clone() for name, b in model.named_buffers()},
        grad_enabled=torch.is_grad_enabled(),
        default_dtype=torch.get_default_dtype(),
    )


def assert_unchanged(model, snap):
    now = snapshot(model)
    for key in ("hooks", "tensor_hooks", "global_hooks", "training", "requires_grad",
                "grad_enabled", "default_dtype", "param_objects"):
        assert now[key] == snap[key], f"model {key} changed: before {snap[key]} after {now[key]}"
    for key in ("params", "buffers"):
        assert now[key].keys() == snap[key].keys()
        for name in snap[key]:
            assert torch.equal(now[key][name], snap[key][name]), f"{key[:-1]} {name} changed"
    for name, before in snap["grads"].items():
        after = now["grads"][name]
        if before is None:
            assert after is None, f".grad of {name} was None, is now set"
        else:
            assert after is not None and torch.equal(after, before), f".grad of {name} changed"
