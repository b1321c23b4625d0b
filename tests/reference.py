"""Brute-force float64 reference for the Fisher information (uses NO natgrad code).

Everything here is written plainly from the definitions, one example at a time, with
``torch.autograd``; it is slow and only meant for the tiny models of the test-suite.

Conventions (see docs/design.md and the contract in the test files):

* flat parameter order = ``model.named_parameters()`` restricted to ``requires_grad=True``;
* a model is called on one example at a time as ``model(x[n:n+1])`` and its output
  ``f_n = out[0]`` is the per-example output (flattened where a matrix is needed);
* likelihoods are given by name ("categorical", "gaussian", "bernoulli") and, for the
  Gaussian, a ``variance`` σ².
"""

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


# --------------------------------------------------------------------------------------
# per-layer quantities for Linear / Conv2d (K-FAC, EKFAC)
# --------------------------------------------------------------------------------------
def kron_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear/Conv2d modules owning trainable parameters, in flat order."""
    modules = dict(model.named_modules())
    out = []
    for name, _, _ in module_slices(model):
        m = modules[name]
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"module {name} ({type(m).__name__}) is not Linear/Conv2d")
        out.append((name, m))
    return out


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding, including padding='same' (extra on bottom/right)."""
    kh, kw = _pair(conv.kernel_size)
    dh, dw = _pair(conv.dilation)
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = _pair(conv.padding)
    return ph, ph, pw, pw


def conv_patches(h: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Explicit-loop unfold of one example's input h [C_in, H, W] -> [T, C_in*kh*kw],
    channel-major (c, kh, kw) like ``weight.view(out, -1)``, t = i*W_out + j."""
    kh, kw = _pair(conv.kernel_size)
    sh, sw = _pair(conv.stride)
    dh, dw = _pair(conv.dilation)
    top, bottom, left, right = conv_padding(conv)
    C, H, W = h.shape
    if conv.padding_mode == "zeros":
        hp = torch.zeros(C, H + top + bottom, W + left + right, dtype=h.dtype)
        hp[:, top : top + H, left : left + W] = h
    else:
        mode = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}
        hp = TF.pad(h.unsqueeze(0), (left, right, top, bottom), mode=mode[conv.padding_mode])[0]
    Hout = (H + top + bottom - dh * (kh - 1) - 1) // sh + 1
    Wout = (W + left + right - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(Hout):
        for j in range(Wout):
            patch = torch.empty(C, kh, kw, dtype=h.dtype)
            for c in range(C):
                for a in range(kh):
                    for b in range(kw):
                        patch[c, a, b] = hp[c, i * sh + a * dh, j * sw + b * dw]
            rows.append(patch.reshape(-1))
    return torch.stack(rows)


def layer_geometry(layer: nn.Module):
    """(groups, out per group, inputs per group row (no bias), has_bias)."""
    W = layer.weight
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    out = W.shape[0]
    d = W[0].numel()
    has_bias = layer.bias is not None and layer.bias.requires_grad
    return groups, out // groups, d, has_bias


def layer_index_map(layer: nn.Module) -> list[list[int]]:
    """For each group, the positions in the layer's flat slice (weight row-major then bias)
    of the joint matrix [W_g | b_g] entries in [out_g, d(+1)] row-major order."""
    groups, out_g, d, has_bias = layer_geometry(layer)
    out = groups * out_g
    idx = []
    for g in range(groups):
        ids = []
        for o in range(out_g):
            oo = g * out_g + o
            ids.extend(oo * d + j for j in range(d))
            if has_bias:
                ids.append(out * d + oo)
        idx.append(ids)
    return idx


def layer_samples(model, x, y, likelihood, estimator, variance=1.0):
    """Per-layer, per-example raw quantities.

    Returns {layer name: list over n of dict(abar=[T, d_total(+1)], g=[K, T, out])} where
    ``abar`` is the layer input (patches for conv) with a trailing 1 if the layer has a bias
    and ``g[k, t]`` = J_{a_t}ᵀ v_nk is the gradient w.r.t. the layer output at position t for
    backprop column k. Also returns, per example, J_a (list over layers of [C, T, out]) and the
    output f so that callers can use other columns.
    """
    layers = kron_layers(model)
    result = {name: [] for name, _ in layers}
    for n in range(x.shape[0]):
        captured: dict[str, tuple] = {}
        handles = []
        for name, m in layers:
            def hook(mod, inp, out, name=name):
                assert name not in captured, f"layer {name} called twice"
                captured[name] = (inp[0].detach(), out)
            handles.append(m.register_forward_hook(hook))
        try:
            f = per_example_output(model, x, n)
        finally:
            for h in handles:
                h.remove()
        flat = f.reshape(-1)
        outs = [captured[name][1] for name, _ in layers]
        jac = [[] for _ in layers]
        for c in range(flat.numel()):
            grads = torch.autograd.grad(flat[c], outs, retain_graph=True, allow_unused=True)
            for i, g in enumerate(grads):
                jac[i].append(torch.zeros_like(outs[i]) if g is None else g)
        V = output_columns(f.detach(), None if y is None else y[n], likelihood, estimator, variance)
        for i, (name, m) in enumerate(layers):
            h = captured[name][0][0]  # drop the batch dim
            Ja = torch.stack([j[0] for j in jac[i]])  # [C, *a.shape[1:]]
            if isinstance(m, nn.Conv2d):
                abar = conv_patches(h, m)
                Ja = Ja.reshape(Ja.shape[0], Ja.shape[1], -1).transpose(1, 2)  # [C, T, out]
            else:
                abar = h.reshape(-1, h.shape[-1])
                Ja = Ja.reshape(Ja.shape[0], -1, Ja.shape[-1])  # [C, T, out]
            if m.bias is not None and m.bias.requires_grad:
                abar = torch.cat([abar, torch.ones(abar.shape[0], 1, dtype=abar.dtype)], 1)
            g = torch.einsum("ck,cto->kto", V, Ja)
            result[name].append(dict(abar=abar, g=g, Ja=Ja, f=f.detach()))
    return result, layers


def _group_cols(layer, g):
    groups, out_g, d, has_bias = layer_geometry(layer)
    cols = list(range(g * d, (g + 1) * d))
    if has_bias:
        cols.append(groups * d)
    rows = list(range(g * out_g, (g + 1) * out_g))
    return cols, rows


def kfac_factors(model, x, y, likelihood, estimator, variance=1.0, samples=None):
    """{layer: [(A_g, G_g) per group]} from the definitions:
    A = (1/(N·T)) Σ_{n,t} ā ā ᵀ, G = (1/N) Σ_{n,k,t} g gᵀ."""
    if samples is None:
        samples, layers = layer_samples(model, x, y, likelihood, estimator, variance)
    else:
        layers = kron_layers(model)
    N = x.shape[0]
    out = {}
    for name, m in layers:
        groups = layer_geometry(m)[0]
        pairs = []
        for g in range(groups):
            cols, rows = _group_cols(m, g)
            A = 0
            G = 0
            for s in samples[name]:
                a = s["abar"][:, cols]
                T = a.shape[0]
                A = A + a.T @ a / T
                gg = s["g"][:, :, rows].reshape(-1, len(rows))
                G = G + gg.T @ gg
            pairs.append((A / N, G / N))
        out[name] = pairs
    return out


def per_example_gamma(sample, layer, g):
    """Γ_nk for group g: [K, out_g, d_g(+1)] = Σ_t g_nkt ā_ntᵀ."""
    cols, rows = _group_cols(layer, g)
    return torch.einsum("kto,td->kod", sample["g"][:, :, rows], sample["abar"][:, cols])


def assemble_layer_block(layer, group_mats) -> torch.Tensor:
    """Place per-group joint-matrix blocks [out_g*(d+1)]² into the layer's flat order."""
    idx = layer_index_map(layer)
    size = sum(len(i) for i in idx)
    B = torch.zeros(size, size, dtype=torch.float64)
    for ids, M in zip(idx, group_mats):
        t = torch.tensor(ids)
        B[t[:, None], t[None, :]] = M
    return B


def kfac_dense(model, factors) -> torch.Tensor:
    """The full P×P K-FAC matrix (block-diagonal over layers, G ⊗ A per group)."""
    P = num_params(model)
    F = torch.zeros(P, P, dtype=torch.float64)
    modules = dict(model.named_modules())
    for name, _, sl in module_slices(model):
        layer = modules[name]
        F[sl, sl] = assemble_layer_block(layer, [torch.kron(G, A) for A, G in factors[name]])
    return F


def ekfac_dense(model, x, y, likelihood, estimator, variance=1.0):
    """EKFAC: per group, eigenbases of A and G, s = (1/N) Σ_n Σ_k (Q_Gᵀ Γ_nk Q_A)²,
    block = (Q_G⊗Q_A) diag(s) (Q_G⊗Q_A)ᵀ. Returns (P×P matrix, factors)."""
    samples, layers = layer_samples(model, x, y, likelihood, estimator, variance)
    factors = kfac_factors(model, x, y, likelihood, estimator, variance, samples=samples)
    P = num_params(model)
    F = torch.zeros(P, P, dtype=torch.float64)
    N = x.shape[0]
    slices = {name: sl for name, _, sl in module_slices(model)}
    for name, m in layers:
        mats = []
        for g, (A, G) in enumerate(factors[name]):
            _, QA = torch.linalg.eigh(A)
            _, QG = torch.linalg.eigh(G)
            s = 0
            for smp in samples[name]:
                gam = per_example_gamma(smp, m, g)
                s = s + (QG.T @ gam @ QA).pow(2).sum(0)
            s = s / N
            Q = torch.kron(QG, QA)
            mats.append(Q @ torch.diag(s.reshape(-1)) @ Q.T)
        sl = slices[name]
        F[sl, sl] = assemble_layer_block(m, mats)
    return F, factors


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
