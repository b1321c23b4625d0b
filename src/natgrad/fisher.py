"""``natgrad.fisher``: the Fisher information of a model on data, in a chosen structure.

Keeps the three axes apart: the estimator picks the back-propagated vectors
(:mod:`natgrad.estimators`), :class:`~natgrad.collect.Collector` runs the model and hands the
per-layer captures to a builder (:mod:`natgrad.statistics`), which stores finished statistics
in a representation (:mod:`natgrad.representations`).

With a ``process_group`` every rank builds its local sums and the builders reduce them over the
ranks (:mod:`natgrad.distributed`): a call goes through three phases, each ending in a
collective, so that a rank that fails — wrong arguments, a different model, bad data — makes
every rank raise instead of leaving the others waiting in a collective:

1. the arguments are checked locally, then every rank compares its model fingerprint
   (names, shapes, dtypes and checksums of the parameters and buffers, train/eval modes) and options
   (likelihood, estimator, structure, samples) with rank 0's (``check_same``);
2. the local data are run through the model, then one small all-reduce tells every rank
   whether a rank failed (for ``implicit`` it also carries the example counts);
3. the builder's ``finish(comm)`` reduces the sums in few bucketed all-reduces.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .capture import preserved_state
from .collect import Collector
from .data import iter_batches, run_model
from .distributed import Communicator, DistributedError, model_fingerprint, resolve_group, unwrap
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
    process_group: object = None,
) -> FisherMatrix:
    """The Fisher information F = E_x E_y[∇θ log p(y|x) ∇θ log p(y|x)ᵀ] of ``model`` on ``data``.

    Args:
        model: an ``nn.Module`` returning the distribution's parameters ``[N, *out]`` (logits
            or means); only parameters with ``requires_grad=True`` are included, in
            ``named_parameters()`` order. A DistributedDataParallel/DataParallel wrapper is
            unwrapped.
        data: an ``(inputs, targets)`` pair of tensors, a DataLoader/iterable of such batches,
            or inputs alone (a tensor or batches of tensors) for ``exact`` and ``mc``.
        likelihood: "categorical", "gaussian", "bernoulli" or a :class:`natgrad.Likelihood`.
        estimator: "exact" (expectation over y in closed form), "mc" (``samples`` draws of y
            from the model per input) or "empirical" (y from the data).
        structure: "dense", "block_diagonal", "diagonal", "kron_sum", "kfac", "ekfac" or
            "implicit".
        samples: draws per input for ``mc``.
        process_group: ``None`` (default): this process's data only, no communication (a
            DDP-wrapped model or an initialised torch.distributed changes nothing). A
            ``torch.distributed.ProcessGroup`` (e.g. ``torch.distributed.group.WORLD``): the
            Fisher of the union of all ranks' examples — every rank of the group must call with
            its own ``data`` (at least one example; ranks may hold different numbers) and the
            same model and options, and every rank returns the same matrix, the mean over the
            total N. Sums travel in few bucketed all-reduces (symmetric ones as upper
            triangles); ``kron_sum`` gathers every rank's layer data. A rank with a different
            model or options makes every rank raise ValueError; a rank that fails on its data
            raises its own error and the others :class:`~natgrad.distributed.DistributedError`.
            With ``mc`` each rank draws from its own random generator: the result is equal in
            distribution to the single-process one on the union (seed ranks differently, e.g.
            ``torch.manual_seed(seed + rank)``, for independent draws; equal seeds give
            correlated but still unbiased draws). A distributed ``implicit`` Fisher is
            collective: its products, ``solve``, ``to_dense``, ``diagonal`` and ``trace``
            all-reduce, so every rank must call them in the same order with the same vectors.

    Returns:
        A :class:`natgrad.FisherMatrix`: F is the mean over examples (and over draws).
    """
    # resolve_group(None, None) would pick the default group: None must stay local
    comm = None if process_group is None else resolve_group(None, process_group)
    error = None
    try:
        model = unwrap(model)
        if not isinstance(structure, str) or structure not in STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}; choose one of {list(STRUCTURES)}")
        check_estimator(estimator, samples)
        likelihood = get_likelihood(likelihood)
        blocks = parameter_blocks(model)
        dtype, device = model_dtype_device(model)
        _refuse_batchnorm_training(model)
    except Exception as caught:
        if comm is None:
            raise
        error = caught
    if comm is not None:
        _check_same_call(comm, error, model, likelihood, estimator, structure, samples)
    batches = iter_batches(data, need_targets=estimator == "empirical", dtype=dtype, device=device)
    with preserved_state(model):
        if structure == "implicit":
            return _implicit(model, blocks, batches, likelihood, estimator, samples, comm)
        kronecker = structure in KRONECKER_STRUCTURES
        if structure in ("dense", "block_diagonal"):
            builder = DenseBuilder(blocks, dtype, device, diagonal_only=structure == "block_diagonal")
        elif structure == "diagonal":
            builder = DiagonalBuilder(blocks, dtype, device)
        elif structure == "kfac":
            builder = KFACBuilder(blocks, dtype, device)
        else:
            builder = StoredBuilder(blocks, dtype, device, ekfac=structure == "ekfac")

        def accumulate() -> list[float]:
            collector = Collector(model, blocks, likelihood, estimator, samples, structure, kronecker, dtype=dtype)
            for inputs, targets in batches:
                builder.add(collector.batch(inputs, targets))
            return []

        _local_phase(comm, accumulate)
        return builder.finish(comm)


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


def _check_same_call(comm: Communicator, error: Exception | None, model, likelihood, estimator, structure,
                     samples) -> None:
    """Phase 1: ValueError on every rank unless all ranks hold the same model and options; then
    re-raise this rank's own argument error (all ranks made the same one)."""
    if error is not None:
        description, values = f"invalid call: {type(error).__name__}: {error}", torch.zeros(0)
    else:
        description, checksums = model_fingerprint(model)
        fixed = [(n, p) for n, p in model.named_parameters() if not p.requires_grad] + list(model.named_buffers())
        description += "|fixed:" + ";".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in fixed)
        description += "|modes:" + "".join("1" if m.training else "0" for m in model.modules())
        description += f"|likelihood={likelihood!r}|estimator={estimator}|structure={structure}|samples={samples}"
        sums = [t.detach().to(torch.float64).sum().cpu() for _, t in fixed]
        values = torch.cat([checksums.cpu(), torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64)])
    try:
        comm.check_same(description, values, "natgrad.fisher: model and options")
    except ValueError as mismatch:
        if error is not None:
            raise error from mismatch
        raise
    if error is not None:
        raise error


def _local_phase(comm: Communicator | None, work: Callable[[], list[float]], numbers: int = 0) -> list[float]:
    """Phase 2: run ``work`` (this rank's data through the model), which returns ``numbers``
    counts; with ``comm``, one all-reduce sums the counts and tells who failed, so that a
    failure anywhere stops every rank."""
    if comm is None:
        return work()
    error, counts = None, [0.0] * numbers
    try:
        counts = [float(c) for c in work()]
    except Exception as caught:
        error = caught
    flags = [1.0 if error is not None and r == comm.rank else 0.0 for r in range(comm.world)]
    reduced = comm.all_reduce_numbers(counts + flags, "natgrad.fisher: local statistics")
    failed = [r for r, flag in enumerate(reduced[numbers:]) if flag]
    if error is not None:
        raise error
    if failed:
        raise DistributedError(
            f"rank {comm.rank}/{comm.world}: natgrad.fisher stopped because rank(s) {failed} failed "
            "while running their data through the model (their own exceptions say why)"
        )
    return reduced[:numbers]


def _implicit(model, blocks, batches, likelihood, estimator, samples, comm) -> ImplicitFisher:
    params, others = snapshot(model)
    params = {name: p.requires_grad_(True) for name, p in params.items()}
    function = model_function(model, others)
    implicit_batches: list[ImplicitBatch] = []

    def linearize() -> list[float]:
        examples = 0
        for inputs, targets in batches:
            output = run_model(function, params, inputs)
            likelihood.check_output(output)
            if targets is not None:
                likelihood.check_target(output, targets)
            examples += inputs.shape[0]
            if estimator == "exact":
                curvature = (lambda out: lambda u: likelihood.fisher_vector(out, u))(output.detach())
            else:
                vectors = torch.stack(backprop_vectors(likelihood, estimator, output, targets, samples))
                curvature = outer_curvature(vectors)
            linearized = LinearizedOutput(output, list(params.values()))
            implicit_batches.append(ImplicitBatch(inputs, linearized, curvature))
        return [examples]

    (examples,) = _local_phase(comm, linearize, 1)
    return ImplicitFisher(blocks, function, params, implicit_batches, int(examples), comm)
