"""Brute-force float64 reference, the Kronecker part: per-layer inputs (explicit-loop conv
patches) and output gradients of Linear/Conv2d layers, the K-FAC factors and matrix, and the
EKFAC matrix, from the definitions. See :mod:`reference` for the conventions."""

from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import nn

from reference_dense import module_slices, num_params, output_columns, per_example_output


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
