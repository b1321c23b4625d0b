"""Converting models to whitened layers and re-estimating their whitening (PRONG, Algorithm 1).

* :func:`whiten` replaces every ``nn.Linear``/``nn.Conv2d`` by a whitened layer with ``U = I``,
  ``μ = 0`` (the same function), optionally followed by batch normalisation (PRONG+).
* :func:`reparametrize` runs the model once on training inputs, records every whitened layer's
  input ``h`` and sets ``μ = E[h]``, ``U = (Cov(h) + εI)^(-1/2)`` (ZCA, symmetric), changing
  ``V`` and ``d`` so that every layer computes exactly the same function:
  ``W = V U_old``, ``b = d − W μ_old``; ``V ← W U_new⁻¹``, ``d ← b + W μ_new``, where
  ``U_new⁻¹ = Q (Λ + εI)^(1/2) Qᵀ`` comes from the same eigendecomposition ``Σ = Q Λ Qᵀ``
  (nothing is inverted; ``U_new⁻¹`` is applied as its two factors).
  Because each layer's function is preserved, the inputs recorded in the single pass are the
  inputs every layer sees after the update as well.
* :func:`unwhiten` converts back to ordinary layers (``W = V U``, ``b = d − W μ``).

Statistics are the population moments (mean over the N recorded rows, 1/N), accumulated around
a shift (the current μ) in float64 for float64 models and, where it is accurate enough, float32
for the others (:mod:`natgrad.nn.whitening`), so that on the estimation sample
the whitened inputs ``h_e = U (h − μ)`` have mean 0 and covariance ``Σ (Σ + εI)⁻¹`` exactly —
i.e. ``E[[h_e; 1][h_e; 1]ᵀ]``, the input factor of the layer's K-FAC block, is the identity up
to ε. Layers without bias are whitened without centring (``μ = 0`` and ``Σ = E[h hᵀ]``).

Data parallel: ``reparametrize(..., process_group=group)`` on every rank estimates the moments
of the union of the ranks' inputs by all-reducing the sums (:mod:`natgrad.nn.reduction`); the
replicas stay identical.
"""

from __future__ import annotations

import copy
import math
from contextlib import ExitStack
from typing import Iterator

import torch
from torch import nn

from ..distributed import Communicator, assign_owners, unwrap
from ..errors import warn
from .reduction import agree_on_pass, communicator_for, reduce_sums
from .whitened import WhitenedConv2d, WhitenedLayer, WhitenedLinear
from .whitening import Whitening, layer_sums, statistics_dtype, whitening_from_moments

__all__ = ["whiten", "unwhiten", "reparametrize", "whitened_layers", "check_eps"]


# --------------------------------------------------------------------------- validation helpers
def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a positive number, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0 (it regularises the eigenvalues: U = (Σ + eps I)^(-1/2)), got {eps!r}")
    return float(eps)


def _check_module(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def whitened_layers(model: nn.Module) -> list[tuple[str, WhitenedLayer]]:
    """``(name, layer)`` for every whitened layer of ``model`` (each module once, first name)."""
    _check_module(model)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WhitenedLayer)]


def _require_whitened(model: nn.Module) -> list[tuple[str, WhitenedLayer]]:
    layers = whitened_layers(model)
    if not layers:
        raise ValueError(
            "the model has no whitened layer (natgrad.nn.WhitenedLinear / WhitenedConv2d); "
            "convert it first with model = natgrad.nn.whiten(model)"
        )
    return layers


# --------------------------------------------------------------------------- whiten / unwhiten
def _replace_modules(model: nn.Module, convert) -> nn.Module:
    """Replace every submodule ``m`` for which ``convert(name, m)`` returns a module (shared
    modules once, everywhere they appear). Returns the (possibly new) root."""
    root_new = convert("", model)
    if root_new is not None:
        return root_new
    done: dict[int, nn.Module | None] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.MultiheadAttention):
            return  # uses its projections' weights directly, never their forward
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            key = id(child)
            if key not in done:
                done[key] = convert(name, child)
                if done[key] is None:
                    visit(child, name)
            if done[key] is not None:
                module._modules[child_name] = done[key]

    visit(model, "")
    return model


def _plain(module: nn.Module, kind: type[nn.Module]) -> bool:
    """``module`` is a ``kind`` computing ``kind``'s own forward (subclasses with another
    forward compute something else and are left alone)."""
    return isinstance(module, kind) and type(module).forward is kind.forward


def whiten(model: nn.Module, inplace: bool = False, batchnorm: bool = False, *, plus: bool | None = None) -> nn.Module:
    """The model with every ``nn.Linear``/``nn.Conv2d`` replaced by a whitened layer.

    The new layers start with ``U = I`` and ``μ = 0`` and ``V = W``, ``d = b``: the function is
    unchanged (to rounding). Call :func:`reparametrize` (or use :class:`natgrad.optim.PRONG`)
    to estimate the whitening. Layers that are already whitened are kept.

    Args:
        model: any module; a deep copy is converted unless ``inplace``. (A model that *is* a
            Linear/Conv2d cannot be changed in place: the new layer is returned.)
        inplace: convert ``model`` itself.
        batchnorm: PRONG+: follow every converted layer's linear map by batch normalisation
            (``BatchNorm1d`` over a Linear's output features — 2-D inputs ``[N, features]`` —
            or ``BatchNorm2d`` over a convolution's output channels), i.e. the layer becomes
            ``nn.Sequential(whitened, bn)`` before the nonlinearity. This *changes* the function
            (it is a different architecture); reparametrizations preserve it afterwards, since
            BN's input, the whitened layer's output, is preserved.
        plus: alias of ``batchnorm``.

    Raises:
        NotImplementedError: a convolution with ``groups > 1`` or ``padding_mode != "zeros"``.
        ValueError: the model has no Linear/Conv2d (nor whitened) layer.
    """
    _check_module(model)
    if plus is not None:
        batchnorm = plus
    if not isinstance(batchnorm, bool) or not isinstance(inplace, bool):
        raise TypeError("inplace and batchnorm must be booleans")
    if not inplace:
        model = copy.deepcopy(model)

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, WhitenedLayer):
            return None
        if _plain(module, nn.Linear):
            new: nn.Module = WhitenedLinear.from_linear(module)
            norm = nn.BatchNorm1d(module.out_features, device=module.weight.device, dtype=module.weight.dtype)
        elif _plain(module, nn.Conv2d):
            label = name or type(module).__name__
            new = WhitenedConv2d.from_conv(module, name=label)
            norm = nn.BatchNorm2d(module.out_channels, device=module.weight.device, dtype=module.weight.dtype)
        else:
            return None
        if batchnorm:
            norm.train(module.training)
            new = nn.Sequential(new, norm)
        return new

    model = _replace_modules(model, convert)
    _require_whitened_after_whiten(model)
    return model


def _require_whitened_after_whiten(model: nn.Module) -> None:
    if not whitened_layers(model):
        raise ValueError(
            f"whiten found no nn.Linear or nn.Conv2d layer to whiten in {type(model).__name__} "
            "(subclasses with their own forward are left alone)"
        )


def unwhiten(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every whitened layer replaced by the ordinary layer computing the same
    function: ``nn.Linear``/``nn.Conv2d`` with ``W = V U`` and ``b = d − W μ`` (computed in
    float64). Same number of parameters. A deep copy unless ``inplace``."""
    _check_module(model)
    if not isinstance(inplace, bool):
        raise TypeError("inplace must be a boolean")
    if not inplace:
        model = copy.deepcopy(model)

    def convert(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, WhitenedLayer) and not module.centred and bool((module.mean != 0).any()):
            raise ValueError(f"whitened layer {name!r} has no bias but a non-zero mean: it has no ordinary equivalent")
        if isinstance(module, WhitenedLinear):
            return module.to_linear()
        if isinstance(module, WhitenedConv2d):
            return module.to_conv()
        return None

    return _replace_modules(model, convert)


# --------------------------------------------------------------------------- reparametrize
def _one_shot(inputs) -> bool:
    """``inputs`` is an iterator that a second pass would find exhausted."""
    return isinstance(inputs, Iterator)


@torch.no_grad()
def reparametrize(model: nn.Module, inputs, eps: float = 1e-2, process_group: object = None) -> dict[str, dict]:
    """Re-estimate every whitened layer's ``μ`` and ``U`` from ``inputs`` in one forward pass and
    change ``V``, ``d`` so that the model computes exactly the same function.

    Args:
        model: a model with whitened layers (:func:`whiten`), or a DistributedDataParallel /
            DataParallel wrapper of one (the module inside is used). It runs in its current mode
            (train/eval); buffers of other modules (e.g. BatchNorm running statistics) are
            restored afterwards, so the pass has no side effect besides the new whitening.
        inputs: a tensor, an ``(x, y)`` tuple, or a DataLoader/iterable yielding tensors or
            ``(x, y)`` batches (floating inputs are cast to the model's dtype and device).
        eps: ε > 0 added to the eigenvalues of the covariance: ``U = (Σ + εI)^(-1/2)``.
        process_group: a ``torch.distributed`` process group: every rank of it calls
            ``reparametrize`` with its own ``inputs`` (any number of rows, even none) and ``μ``
            and ``Σ`` are those of the union of all ranks' inputs — the per-rank sums are
            all-reduced (:mod:`natgrad.nn.reduction`: three small collectives per pass), so
            every rank computes the same whitening and ends with identical buffers and
            parameters (given identical models: the whitened layers' names and sizes are
            checked, ValueError otherwise). ``None`` (default): this process's inputs only, no
            communication, even inside a distributed job (nothing is detected automatically;
            :class:`natgrad.optim.PRONG` does detect DDP and the default group). An error
            raised on one rank only (a bad batch) leaves the others waiting in a collective
            until the group's timeout (:class:`natgrad.distributed.DistributedError`).

    Float64 models are reparametrized in float64; others in float32 where it is accurate to
    ε/10 on the eigenvalues, else in float64 (:mod:`natgrad.nn.whitening`; a float32 pass that
    fails the test is repeated in float64, so a one-shot iterator is summed in float64 at once —
    on every rank if any rank's inputs are one). Over a process group these decisions are
    taken from the reduced statistics, the same on every rank.

    Returns:
        ``{layer name: info}`` with ``samples`` (rows used: examples × positions, over all
        ranks), ``eigenvalues`` (of Σ, ascending, clamped at 0, float64), ``condition`` (of
        Σ + εI), ``whitening`` (the :class:`~natgrad.nn.whitening.Whitening`: μ, Λ, Q, ε),
        ``mean``/``whitener`` (new μ and U) and ``previous_mean``/``previous_whitener``, in the
        precision of the computation. A layer the pass never reached (on any rank) is left
        unchanged (with a warning) and maps to ``None``.

    Raises:
        TypeError: ``process_group`` is not a ProcessGroup (or None).
        ValueError: no inputs (on all ranks together), no whitened layer, non-finite
            statistics, ranks with different whitened layers.
    """
    _check_module(model)
    eps = check_eps(eps)
    return reparametrize_with(model, inputs, eps, communicator_for(process_group))


def _whitenings(sums: dict, eps: float, comm: Communicator | None) -> dict[str, Whitening | str | None]:
    """Each layer's whitening, or the message of why it failed (None: layer not called). With
    ranks, each layer's eigendecomposition runs on one rank (balanced by d³) and is broadcast:
    no rank repeats another's work, and every rank applies the same bits."""
    names = [name for name, s in sums.items() if s.count > 0]
    owners = dict(zip(names, assign_owners([float(sums[n].s1.shape[0]) ** 3 for n in names], comm.world))) if comm else {}
    results: dict[str, Whitening | str | None] = {name: None for name in sums}
    for name in names:
        if comm is None or owners[name] == comm.rank:
            try:
                results[name] = whitening_from_moments(*sums[name].moments(), eps)
            except ValueError as error:
                results[name] = str(error)
    if comm is not None:
        results.update(comm.broadcast_objects({n: results[n] for n in names}, owners, "reparametrize: whitenings"))
    return results


@torch.no_grad()
def reparametrize_with(model: nn.Module, inputs, eps: float, comm: Communicator | None) -> dict[str, dict]:
    """:func:`reparametrize` over the ranks of ``comm`` (None: locally)."""
    model = unwrap(model)
    eps = check_eps(eps)
    layers = _require_whitened(model)
    dtype = statistics_dtype(layers[0][1].weight.dtype)
    one_shot = _one_shot(inputs)
    if comm is not None:
        one_shot = agree_on_pass(comm, layers, dtype, one_shot)
    if one_shot:
        dtype = torch.float64

    def statistics(dtype: torch.dtype):
        sums, examples = layer_sums(model, layers, inputs, dtype)
        if comm is not None:
            examples = reduce_sums(comm, sums, examples)
        return sums, examples

    with ExitStack() as stack:  # W = V U folded once: the pass's forward and the update start from it
        folds = {name: stack.enter_context(layer.fixed_fold()) for name, layer in layers}
        sums, examples = statistics(dtype)
        if examples == 0:
            raise ValueError("reparametrize got no inputs (an empty tensor or data loader): it needs training "
                             "inputs to estimate the whitening")
        if not all(s.float32_accurate(eps) for s in sums.values()):
            sums, _ = statistics(torch.float64)

    info: dict[str, dict | None] = {}
    updates = []
    whitenings = _whitenings(sums, eps, comm)
    for name, layer in layers:
        if sums[name].count == 0:
            warn(f"whitened layer {name!r} was not called on the inputs: its whitening is unchanged",
                 RuntimeWarning)
            info[name] = None
            continue
        if isinstance(whitenings[name], str):
            raise ValueError(f"whitened layer {name!r}: {whitenings[name]}")
        updates.append((name, layer, whitenings[name], sums[name].count))
    # all statistics first, then all updates (a failure above leaves the model untouched)
    for name, layer, whitening, count in updates:
        old_mean, old_u = layer.set_whitening(whitening, folds[name])
        info[name] = {
            "samples": count,
            "eigenvalues": whitening.spectrum.double(),
            "condition": whitening.condition,
            "whitening": whitening,
            "mean": whitening.mean,
            "whitener": layer.whitener.to(whitening.dtype, copy=True),
            "previous_mean": old_mean,
            "previous_whitener": old_u,
        }
    return info
