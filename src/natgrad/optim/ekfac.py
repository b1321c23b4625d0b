"""EKFAC (George et al. 2018): K-FAC's eigenbasis, re-fit diagonal.

Every ``inverse_every`` steps the eigenbases Q_A, Q_G of the running K-FAC factors are
recomputed; on every statistics step the scales s = E[(Q_Gᵀ Γ_nk Q_A)²] are measured from the
per-example gradients of that step *in the current basis* — basis first, then rescaling (a
running average within one basis, restarted when the basis changes). The direction is
Q_G [(Q_Gᵀ ∇M Q_A) / (s + λ')] Q_Aᵀ: damping is exact in the eigenbasis. When ``.grad`` is
provably the batch product gᵀā (:mod:`natgrad.optim.gradient_factors`) and it is cheaper, the
projection is computed as (g Q_G)ᵀ(ā Q_A); on statistics steps ā Q_A is the one the scale
statistics just computed for the same rows (a Linear on [N, in] with ``stat_fraction`` 1), which
saves R·D² multiply-adds per layer.

Distributed: the eigendecompositions are computed on each layer's owner rank and broadcast
(every rank needs the bases to project its own per-example gradients), and the scales' sums
are all-reduced like the factors. ``sharding="gradients"`` is therefore refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..collect import BatchData
from ..layers.base import LayerAdapter
from ..linalg import symmetric_eigh
from ..statistics import eigenbasis_second_moments, projected_inputs
from .config import Schedule
from .gradient_factors import factored_cost_is_lower
from .kfac import KFAC, LayerGradient, sandwich


@dataclass(frozen=True)
class ProjectedRows:
    """A layer gradient ∇M = gᵀā given as ``g`` [1, R, O] and ``inputs`` = ā Q_A [1, R, D], the
    inputs already in the current eigenbasis (computed for this step's scale statistics)."""

    g: Tensor
    inputs: Tensor


def _same_rows(stats_inputs: Tensor, version: int, record_inputs: Tensor) -> bool:
    """Whether the statistics' h [N, 1, 1, D_in] (at version counter ``version`` when projected)
    are the recorded layer input h [N, D_in] itself: the same memory, all of its rows, and not
    modified in place since the projection (views share one version counter)."""
    return (
        stats_inputs.data_ptr() == record_inputs.data_ptr()
        and stats_inputs.numel() == record_inputs.numel()
        and stats_inputs.shape[0] == record_inputs.shape[0]
        and stats_inputs.stride(0) == record_inputs.stride(0)
        and record_inputs._version == version
    )


class EKFAC(KFAC):
    """EKFAC optimizer; arguments as :class:`~natgrad.optim.KFAC` (``damping_policy.mode`` is
    ignored: damping is always exact in the eigenbasis; ``sharding`` is "inverses" or
    "replicated")."""

    def __init__(
        self, model: nn.Module, *args, schedule: Schedule = Schedule(), sharding: str = "inverses", **kwargs
    ) -> None:
        """``schedule`` defaults to whole batches for the statistics (K-FAC's is τ₁ = 1/8): the
        scales restart with every eigenbasis, so they are fit from at most ``inverse_every``
        batches — too few rows for a layer's O·D scales from an eighth of each."""
        if sharding == "gradients":
            raise ValueError(
                "EKFAC cannot shard by preconditioned gradients: every rank needs every layer's "
                "eigenbasis to measure the scales of its own examples; use sharding='inverses'"
            )
        self._projected: dict[int, tuple[Tensor, int, Tensor]] = {}  # this step's (h, its version, ā Q_A)
        super().__init__(model, *args, schedule=schedule, sharding=sharding, **kwargs)

    def _update_statistics(self, batch: BatchData) -> None:
        super()._update_statistics(batch)
        if self._is_refresh_step():
            self._refresh_bases()
        decay = self._decay()
        layers = sorted(batch.layers)
        sums = []
        factored = self._factors.adapters if self._factors is not None else {}
        for i in layers:
            layer, state = batch.layers[i], self._layer_state(i)
            projected = None
            if layer.simple and i in factored:  # kept for the factored projection of this step
                projected = projected_inputs(layer, state["Q_A"])
                self._projected[i] = (layer.raw_inputs, layer.raw_inputs._version, projected)
            sums.append(eigenbasis_second_moments(layer, state["Q_A"], state["Q_G"], projected))
        if self.comm is not None:
            sums = self.comm.all_reduce(sums, what="EKFAC scales")
        for i, total in zip(layers, sums):
            state = self._layer_state(i)
            fresh = state.pop("fresh_basis", False)
            self._average(state, "scales", total, 1.0 / self._stat_examples, 0.0 if fresh else decay)

    def _refresh(self) -> None:
        if not self.is_statistics_step():  # no batch to measure scales in the new basis
            self._refresh_bases()
            for i in self.adapters:
                state = self._layer_state(i)
                if state.pop("fresh_basis", False):
                    state["scales"] = state["values_G"].unsqueeze(-1) * state["values_A"].unsqueeze(-2)

    def _refresh_bases(self) -> None:
        for i in self._owned():
            state = self._layer_state(i)
            state["values_A"], state["Q_A"] = symmetric_eigh(state["A"])
            state["values_G"], state["Q_G"] = symmetric_eigh(state["G"])
        self._share(["values_A", "Q_A", "values_G", "Q_G"], [False] * 4)
        for i in self._layer_owners():
            self._layer_state(i)["fresh_basis"] = True

    def _factored_is_cheaper(self, adapter: LayerAdapter, inputs: Tensor, rows: int) -> bool:
        """On statistics steps over all rows, a Linear layer on [N, in] gets ā Q_A from the scale
        statistics, so the factored projection costs R(O² + OD) instead of R(O² + D² + OD)."""
        known = self.is_statistics_step() and self.schedule.stat_fraction == 1 and inputs.dim() == 2
        return factored_cost_is_lower(rows, *adapter.matrix_shape[1:], inputs_known=known)

    def _gradient_rows(self) -> dict[int, tuple[Tensor, Tensor] | ProjectedRows]:
        rows: dict = super()._gradient_rows()
        for i, (g, _) in rows.items():
            if i in self._projected and _same_rows(*self._projected[i][:2], self._factors.inputs[i]):
                rows[i] = ProjectedRows(g, self._projected[i][2].unsqueeze(0))
        return rows

    def _layer_direction(self, i: int, grad: LayerGradient | ProjectedRows) -> Tensor:
        state = self._layer_state(i)
        basis_a, basis_g = state["Q_A"], state["Q_G"]
        if isinstance(grad, ProjectedRows):
            projected = (basis_g.mT @ grad.g.mT) @ grad.inputs
        else:
            projected = sandwich(basis_g.mT, grad, basis_a, self.adapters[i].has_bias)
        return basis_g @ (projected / (state["scales"] + self.damping_of(i))) @ basis_a.mT

    def _finish_step(self, advance: bool) -> None:
        self._projected = {}  # only valid for this step's rows and bases
        super()._finish_step(advance)
