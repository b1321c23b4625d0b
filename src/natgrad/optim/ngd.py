"""Exact natural-gradient descent: Δθ = −lr (F + εI)⁻¹ ∇L with F from any structure.

With the defaults one step on a batch is exactly θ ← θ − lr (F_batch + damping I)⁻¹ ∇L_batch,
F the Fisher of that batch (no running average, no momentum). A dense F of one batch with few
gradient rows M = N·K (K = samples, C − 1 for ``exact``, 1 for ``empirical``) is kept as those
rows, F = UᵀU/N, and solved by the Woodbury identity when that is cheaper than the P×P matrix
(:mod:`natgrad.representations.low_rank`): the same matrix, without its P×P storage.
``structure="auto"`` stores F densely for models up to 4,096 parameters; above, on each batch
(one process, no running average), as its gradient rows when their Woodbury solve (M² per
stored row entry, M³/3) costs less than a CG solve (priced at 30 passes through the layers) and
they hold at most 2²⁵ entries, and otherwise matrix-free on the batch's own graph (J v by double backward,
Jᵀ u by backward) with conjugate-gradient solves. The empirical Fisher after a plain
``loss.backward()`` (no graph kept) is solved from the rows the capture recorded instead: the
same matrix, solved directly. Rows of a Linear on [N, in] stay factored as (g, ā): the Woodbury
Gram (g_m·g_n)(ā_m·ā_n) costs M²(O + D) instead of M²·O·D.
Options add a running average of stored structures (``Schedule.decay``) and momentum or the
quadratic-model rescaling (``StepPolicy``).

Distributed: F is the Fisher of the union of the ranks' batches — the stored structures
all-reduce their sums, the matrix-free one all-reduces every product F v (so its CG solve runs
in lockstep on every rank). The solve itself is replicated: for per-layer sharding of the
inverse work, use K-FAC.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..collect import BatchData
from ..estimators import backprop_vectors
from ..fisher import STRUCTURES
from ..likelihoods import Likelihood
from ..representations.base import BlockDiagonalFisher, FisherMatrix
from ..representations.dense import DenseBlock, DenseFisher
from ..representations.diagonal import DiagonalFisher
from ..representations.low_rank import (ExplicitRows, FactoredRows, LowRankFisher, RowBlock,
                                        low_rank_is_cheaper)
from ..statistics import DenseBuilder, DiagonalBuilder, KFACBuilder, StoredBuilder
from .base import CurvatureOptimizer
from .config import DampingPolicy, Schedule, StepPolicy
from .graph_fisher import GraphFisher

DENSE_LIMIT = 4096
ROWS_LIMIT = 2**25  # entries of the gradient rows U an "auto" step above DENSE_LIMIT may keep
CG_PASSES = 30  # what "auto" prices a CG solve at: ~10 iterations of J·v and Jᵀu, ~3 passes each
AVERAGED = ("dense", "block_diagonal", "diagonal")  # structures whose tensors can be averaged and saved


class NGD(CurvatureOptimizer):
    """Natural-gradient descent with the Fisher in ``structure`` (see :func:`natgrad.fisher`)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        damping: float = 1.0,
        likelihood: str | Likelihood = "categorical",
        estimator: str = "mc",
        samples: int = 1,
        *,
        structure: str = "auto",
        schedule: Schedule = Schedule(stat_every=1, inverse_every=1, decay=0.0),
        damping_policy: DampingPolicy = DampingPolicy(),
        step_policy: StepPolicy = StepPolicy(rescale="none", momentum=0.0),
        param_groups: list[dict] | None = None,
        process_group: object = None,
    ) -> None:
        if structure != "auto" and structure not in STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}; choose 'auto' or one of {list(STRUCTURES)}")
        self.structure_option = structure
        self.generic_statistics = True
        super().__init__(
            model, lr, damping, likelihood, estimator, samples, schedule, damping_policy, step_policy,
            param_groups, kronecker=structure in ("kfac", "ekfac", "kron_sum"), process_group=process_group,
        )
        size = self.blocks[-1].stop
        self.structure = structure if structure != "auto" else ("dense" if size <= DENSE_LIMIT else "implicit")
        if self.structure not in AVERAGED and (schedule.decay > 0 or schedule.stat_every > 1):
            raise ValueError(
                f"reusing or averaging the Fisher across steps (Schedule.decay > 0 or stat_every > 1) "
                f"is supported for structures {list(AVERAGED)}, not {self.structure!r}; for running "
                "Kronecker factors use natgrad.optim.KFAC or EKFAC"
            )
        if schedule.stat_fraction != 1:
            raise ValueError(
                "NGD uses the Fisher of the whole batch: Schedule.stat_fraction must be 1, got "
                f"{schedule.stat_fraction!r} (a statistics subset is a K-FAC/EKFAC option)"
            )
        for key in ("damping", "weight_decay"):
            if len({float(g[key]) for g in self.param_groups}) > 1:
                raise ValueError(f"NGD solves with one damping: param groups must share {key!r}")
        self.fisher_matrix: FisherMatrix | None = None
        self.fisher_updates = 0
        self._scores: Tensor | None = None

    def _options(self) -> str:
        return f"{super()._options()}|{self.structure_option}"

    def _needs_graph(self) -> bool:
        return super()._needs_graph() or self.structure == "implicit"

    def _fisher_batch(self, output: Tensor, keep_graph: bool):
        if self.structure == "implicit":
            return None  # built in step() on the live graph
        return super()._fisher_batch(output, keep_graph)

    def _auto_structure(self, output: Tensor) -> str:
        """This batch's structure under "auto": dense up to DENSE_LIMIT parameters; above, dense
        kept as the batch's gradient rows when they are cheaper and take at most ROWS_LIMIT
        entries (one process, no averaging), else implicit."""
        size = self.blocks[-1].stop
        if size <= DENSE_LIMIT:
            return "dense"
        if not self._single_batch_fisher():
            return "implicit"
        per_example = {"exact": self.likelihood.num_sqrt_columns(output), "mc": self.samples, "empirical": 1}
        rows = output.shape[0] * per_example[self.estimator]
        entries = self._row_entries(rows)
        rows_cost = rows * entries + rows**3 / 3  # the Woodbury Gram M²·width and its Cholesky
        cheaper = rows_cost <= CG_PASSES * self._pass_cost(output.shape[0])
        return "dense" if cheaper and entries <= ROWS_LIMIT else "implicit"

    def _pass_cost(self, examples: int) -> int:
        """Multiply-adds of one pass through the model as the capture saw it: a layer's output
        entries times its inputs per output (N·O·D for a Linear, every position's for a
        convolution), N·size for any other block."""
        total = 0
        for i, block in enumerate(self.blocks):
            adapter = self.adapters.get(i)
            output = None if adapter is None else self.capture.outputs.get(adapter.name)
            total += examples * block.size if output is None else output.numel() * adapter.matrix_shape[2]
        return total

    def _row_entries(self, rows: int) -> int:
        """Entries of the batch's M = ``rows`` gradient rows as :func:`_batch_rows` keeps them:
        M(O + D) for a layer called once on [N, in] (factored), M·size for any other block."""
        total = 0
        for i, block in enumerate(self.blocks):
            adapter = self.adapters.get(i)
            captured = None if adapter is None else self.capture.inputs.get(adapter.name)
            if captured is not None and captured.dim() == 2 and adapter.groups == 1 \
                    and self.capture.calls.get(adapter.name) == 1:
                total += rows * sum(adapter.matrix_shape[1:])
            else:
                total += rows * block.size
        return total

    def _statistics_batch(self) -> BatchData | None:
        if self.structure == "implicit" and not self._rows_instead_of_graph():
            return None
        return super()._statistics_batch()

    def _rows_instead_of_graph(self) -> bool:
        """A plain ``loss.backward()`` with the empirical Fisher (one process): no graph for the
        matrix-free products, but the per-example gradients it captured hold the same F (used
        when they take at most ROWS_LIMIT entries)."""
        if self.estimator != "empirical" or self._pending is not None or self.comm is not None:
            return False
        scores = self.capture.root_grad
        return scores is not None and self._row_entries(scores.shape[0]) <= ROWS_LIMIT

    def backward(self, loss: Tensor, output: Tensor) -> None:
        if self.structure_option == "auto" and isinstance(output, Tensor) and output.dim() > 0:
            self.structure = self._auto_structure(output)
        if self.structure == "implicit" and self.estimator == "empirical" and isinstance(output, Tensor):
            # per-example scores of a mean loss: N ∂loss/∂output, taken before the graph is used
            (grad,) = torch.autograd.grad(loss, output, retain_graph=True)
            self._scores = grad.detach() * output.shape[0]
        super().backward(loss, output)

    def _update_statistics(self, batch: BatchData | None) -> None:
        if batch is None:  # implicit, on this batch's graph
            self.fisher_matrix = self._graph_fisher()
            return
        if self.structure == "implicit" or self._keeps_rows(batch):
            self.fisher_matrix = self._averaged(LowRankFisher(self.blocks, _batch_rows(batch, len(self.blocks)),
                                                              batch.examples))
            return
        builder = self._builder()
        builder.add(batch)
        fresh = builder.finish(self.comm)
        self.fisher_matrix = self._averaged(fresh)

    def _single_batch_fisher(self) -> bool:
        """F is this step's batch's alone: not averaged over steps, not reduced over ranks."""
        return self.comm is None and self.schedule.decay == 0 and self.schedule.stat_every == 1

    def _keeps_rows(self, batch: BatchData) -> bool:
        """A dense F of this batch alone (not averaged, not reduced over ranks) whose M = N·K
        gradient rows are fewer than makes the P×P matrix worth forming."""
        if self.structure != "dense" or not self._single_batch_fisher():
            return False
        some = next(iter(batch.layers.values())).grads if batch.layers else next(iter(batch.generic.values()))
        return low_rank_is_cheaper(batch.examples * some.shape[1], self.blocks[-1].stop)  # K = shape[1]

    def _graph_fisher(self) -> GraphFisher:
        if self._pending is None:
            raise RuntimeError(
                f"NGD with the implicit structure and the {self.estimator!r} Fisher needs the graph: "
                "call opt.backward(loss, output) instead of loss.backward() (the empirical Fisher's "
                f"gradient rows stand in for it only in one process and up to {ROWS_LIMIT:,} entries)"
            )
        output = self._pending[0]
        if self.estimator == "empirical":
            if self._scores is None:
                raise RuntimeError("NGD(structure='implicit', estimator='empirical') needs opt.backward(loss, output)")
            vectors = [self._scores]
        elif self.estimator == "exact":
            vectors = None
        else:
            vectors = backprop_vectors(self.likelihood, self.estimator, output, None, self.samples)
        return GraphFisher(self.blocks, output, self._params(), self.likelihood, vectors, self.comm, self._linearized)

    def _builder(self):
        args = (self.blocks, self.dtype, self.device)
        if self.structure in ("dense", "block_diagonal"):
            return DenseBuilder(*args, diagonal_only=self.structure == "block_diagonal")
        if self.structure == "diagonal":
            return DiagonalBuilder(*args)
        if self.structure == "kfac":
            return KFACBuilder(*args)
        return StoredBuilder(*args, ekfac=self.structure == "ekfac")

    def _averaged(self, fresh: FisherMatrix) -> FisherMatrix:
        """Running average with ρ = min(1 − 1/k, decay) at the k-th update (as in KFAC)."""
        self.fisher_updates += 1
        decay = min(1.0 - 1.0 / self.fisher_updates, self.schedule.decay)
        previous = self.fisher_matrix
        if decay == 0 or previous is None:
            return fresh
        tensors = [decay * old + (1 - decay) * new for old, new in zip(_tensors(previous), _tensors(fresh))]
        return _with_tensors(fresh, tensors)

    def _extra_state(self) -> dict:
        if self.structure not in AVERAGED or self.fisher_matrix is None or isinstance(self.fisher_matrix, LowRankFisher):
            return {"fisher_updates": self.fisher_updates}  # (a batch's rows are never reused)
        return {"fisher_updates": self.fisher_updates, "fisher": _tensors(self.fisher_matrix)}

    def _load_extra_state(self, extra: dict) -> None:
        self.fisher_updates = int(extra.pop("fisher_updates", 0))
        tensors = extra.pop("fisher", None)
        self.fisher_matrix = None
        if tensors is not None:
            self.fisher_matrix = _with_tensors(self._builder_template(), [t.to(self.device) for t in tensors])

    def _builder_template(self) -> FisherMatrix:
        size = self.blocks[-1].stop
        if self.structure == "dense":
            return DenseFisher(self.blocks, torch.zeros(size, size, dtype=self.dtype, device=self.device))
        if self.structure == "diagonal":
            return DiagonalFisher(self.blocks, torch.zeros(size, dtype=self.dtype, device=self.device))
        blocks = [DenseBlock(torch.zeros(b.size, b.size, dtype=self.dtype, device=self.device)) for b in self.blocks]
        return BlockDiagonalFisher(self.blocks, blocks, self.dtype, self.device)

    def _direction(self, grads: Tensor) -> Tensor:
        if self.fisher_matrix is None:
            raise RuntimeError("no Fisher yet: the first step must be a statistics step")
        return self.fisher_matrix.solve(grads, self.damping_of(0))

    def _finish_step(self, advance: bool) -> None:
        if self.structure == "implicit":
            self.fisher_matrix = None  # holds the graph of this batch
        self._scores = None
        super()._finish_step(advance)


def _batch_rows(batch: BatchData, count: int) -> list[RowBlock]:
    """The batch's gradient rows block by block (row n·K + k: example n, vector k): a Linear on
    [N, in] factored as (g, ā), any other block as its per-example gradients."""
    parts: list[RowBlock] = []
    for i in range(count):
        layer = batch.layers.get(i)
        if layer is not None and layer.simple:
            grads = layer.grads[:, :, 0, 0, :]  # [N, K, O]
            n, k = grads.shape[:2]
            inputs = layer.inputs[:, 0, 0, :].unsqueeze(1).expand(n, k, -1)  # [N, K, D]
            parts.append(FactoredRows(layer.adapter, grads.reshape(n * k, -1), inputs.reshape(n * k, -1)))
        else:
            parts.append(ExplicitRows(batch.per_example(i).flatten(0, 1)))
    return parts


def _tensors(fisher: FisherMatrix) -> list[Tensor]:
    """The stored tensors of a dense, diagonal or block-diagonal Fisher."""
    if isinstance(fisher, DenseFisher):
        return [fisher.matrix]
    if isinstance(fisher, DiagonalFisher):
        return [fisher.values]
    return [op.matrix for op in fisher.operators]


def _with_tensors(fisher: FisherMatrix, tensors: list[Tensor]) -> FisherMatrix:
    if isinstance(fisher, DenseFisher):
        return DenseFisher(fisher.blocks, tensors[0])
    if isinstance(fisher, DiagonalFisher):
        return DiagonalFisher(fisher.blocks, tensors[0])
    return BlockDiagonalFisher(fisher.blocks, [DenseBlock(t) for t in tensors], fisher.dtype, fisher.device)
