"""EKFAC (George et al. 2018): K-FAC's eigenbasis, re-fit diagonal.

Every ``inverse_every`` steps the eigenbases Q_A, Q_G of the running K-FAC factors are
recomputed; on every statistics step the scales s = E[(Q_Gᵀ Γ_nk Q_A)²] are measured from the
per-example gradients of that step *in the current basis* — basis first, then rescaling (a
running average within one basis, restarted when the basis changes). The direction is
Q_G [(Q_Gᵀ ∇M Q_A) / (s + λ')] Q_Aᵀ: damping is exact in the eigenbasis. When ``.grad`` is
provably the batch product gᵀā (:mod:`natgrad.optim.gradient_factors`) and it is cheaper, the
projection is computed as (g Q_G)ᵀ(ā Q_A).

Distributed: the eigendecompositions are computed on each layer's owner rank and broadcast
(every rank needs the bases to project its own per-example gradients), and the scales' sums
are all-reduced like the factors. ``sharding="gradients"`` is therefore refused.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..collect import BatchData
from ..linalg import symmetric_eigh
from ..statistics import eigenbasis_second_moments
from .kfac import KFAC, LayerGradient, sandwich


class EKFAC(KFAC):
    """EKFAC optimizer; arguments as :class:`~natgrad.optim.KFAC` (``damping_policy.mode`` is
    ignored: damping is always exact in the eigenbasis; ``sharding`` is "inverses" or
    "replicated")."""

    def __init__(self, model: nn.Module, *args, sharding: str = "inverses", **kwargs) -> None:
        if sharding == "gradients":
            raise ValueError(
                "EKFAC cannot shard by preconditioned gradients: every rank needs every layer's "
                "eigenbasis to measure the scales of its own examples; use sharding='inverses'"
            )
        super().__init__(model, *args, sharding=sharding, **kwargs)

    def _update_statistics(self, batch: BatchData) -> None:
        super()._update_statistics(batch)
        if self._is_refresh_step():
            self._refresh_bases()
        decay = self._decay()
        layers = sorted(batch.layers)
        sums = [
            eigenbasis_second_moments(batch.layers[i], self._layer_state(i)["Q_A"], self._layer_state(i)["Q_G"])
            for i in layers
        ]
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

    def _layer_direction(self, i: int, grad: LayerGradient) -> Tensor:
        state = self._layer_state(i)
        basis_a, basis_g = state["Q_A"], state["Q_G"]
        projected = sandwich(basis_g.mT, grad, basis_a, self.adapters[i].has_bias)
        return basis_g @ (projected / (state["scales"] + self.damping_of(i))) @ basis_a.mT
