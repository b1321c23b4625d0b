"""``natgrad.fisher``: the Fisher information of a model on data, in a chosen structure.

Keeps the three axes apart: the estimator picks the back-propagated vectors
(:mod:`natgrad.estimators`), :class:`~natgrad.collect.Collector` runs the model and hands the
per-layer captures to a builder (:mod:`natgrad.statistics`), which stores finished statistics
in a representation (:mod:`natgrad.representations`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .capture import preserved_state
from .collect import Collector
from .data import iter_batches
from .estimators import backprop_vectors, check_estimator, outer_curvature
from .functional import model_function, snapshot
from .linearized import LinearizedOutput
from .layout import check_vector, model_dtype_device, parameter_blocks
from .likelihoods import Likelihood, get_likelihood
from .linalg import check_damping
from .representations.base import FisherMatrix
from .representations.implicit import ImplicitBatch, ImplicitFisher
from .statistics import DenseBuilder, DiagonalBuilder, KFACBuilder, StoredBuilder

STRUCTURES = ("dense", "block_diagonal", "diagonal", "kron_sum", "kfac", "ekfac", "implicit")
KRONECKER_STRUCTURES = ("kron_sum", "kfac", "ekfac")


def fisher(
    model: nn.Module,
    data: object,
    likelihood: str | Likelihood = "categorical",
    estimator: str = "exact",
    structure: str = "kfac",
    samples: int = 1,
) -> FisherMatrix:
    """The Fisher information F = E_x E_y[∇θ log p(y|x) ∇θ log p(y|x)ᵀ] of ``model`` on ``data``.

    Args:
        model: an ``nn.Module`` returning the distribution's parameters ``[N, *out]`` (logits
            or means); only parameters with ``requires_grad=True`` are included, in
            ``named_parameters()`` order.
        data: an ``(inputs, targets)`` pair of tensors, a DataLoader/iterable of such batches,
            or inputs alone (a tensor or batches of tensors) for ``exact`` and ``mc``.
        likelihood: "categorical", "gaussian", "bernoulli" or a :class:`natgrad.Likelihood`.
        estimator: "exact" (expectation over y in closed form), "mc" (``samples`` draws of y
            from the model per input) or "empirical" (y from the data).
        structure: "dense", "block_diagonal", "diagonal", "kron_sum", "kfac", "ekfac" or
            "implicit".
        samples: draws per input for ``mc``.

    Returns:
        A :class:`natgrad.FisherMatrix`: F is the mean over examples (and over draws).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(structure, str) or structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {list(STRUCTURES)}")
    check_estimator(estimator, samples)
    likelihood = get_likelihood(likelihood)
    blocks = parameter_blocks(model)
    dtype, device = model_dtype_device(model)
    _refuse_batchnorm_training(model)
    batches = iter_batches(data, need_targets=estimator == "empirical", dtype=dtype, device=device)
    with preserved_state(model):
        if structure == "implicit":
            return _implicit(model, blocks, batches, likelihood, estimator, samples)
        kronecker = structure in KRONECKER_STRUCTURES
        collector = Collector(model, blocks, likelihood, estimator, samples, structure, kronecker)
        if structure in ("dense", "block_diagonal"):
            builder = DenseBuilder(blocks, dtype, device, diagonal_only=structure == "block_diagonal")
        elif structure == "diagonal":
            builder = DiagonalBuilder(blocks, dtype, device)
        elif structure == "kfac":
            builder = KFACBuilder(blocks, dtype, device)
        else:
            builder = StoredBuilder(blocks, dtype, device, ekfac=structure == "ekfac")
        for inputs, targets in batches:
            builder.add(collector.batch(inputs, targets))
        return builder.finish()


def natural_gradient(F: FisherMatrix, grad: Tensor, damping: float) -> Tensor:
    """The natural-gradient direction (F + damping I)⁻¹ grad, flat in F's parameter order."""
    if not isinstance(F, FisherMatrix):
        raise TypeError(f"F must be a natgrad FisherMatrix (from natgrad.fisher), got {type(F).__name__}")
    check_vector(grad, F.size, F.dtype, name="grad")
    return F.solve(grad, check_damping(damping))


def _refuse_batchnorm_training(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"BatchNorm module {name!r} is in training mode, which couples the examples of a "
                "batch, so per-example Fisher terms are undefined; call model.eval() first"
            )


def _implicit(model, blocks, batches, likelihood, estimator, samples) -> ImplicitFisher:
    params, others = snapshot(model)
    params = {name: p.requires_grad_(True) for name, p in params.items()}
    function = model_function(model, others)
    implicit_batches, examples = [], 0
    for inputs, targets in batches:
        output = function(params, inputs)
        likelihood.check_output(output)
        if estimator == "empirical":
            likelihood.check_target(output, targets)
        examples += inputs.shape[0]
        if estimator == "exact":
            curvature = (lambda out: lambda u: likelihood.fisher_vector(out, u))(output.detach())
        else:
            vectors = torch.stack(backprop_vectors(likelihood, estimator, output, targets, samples))
            curvature = outer_curvature(vectors)
        linearized = LinearizedOutput(output, list(params.values()))
        implicit_batches.append(ImplicitBatch(inputs, linearized, curvature))
    return ImplicitFisher(blocks, function, params, implicit_batches, examples)
