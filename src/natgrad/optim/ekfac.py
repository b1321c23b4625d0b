"""EKFAC (George et al. 2018): K-FAC's eigenbasis, re-fit diagonal.

Every ``inverse_every`` steps the eigenbases Q_A, Q_G of the running K-FAC factors are
recomputed; on every statistics step the scales s = E[(Q_Gᵀ Γ_nk Q_A)²] are measured from the
per-example gradients of that step *in the current basis* — basis first, then rescaling (a
running average within one basis, restarted when the basis changes). The direction is
Q_G [(Q_Gᵀ ∇M Q_A) / (s + λ')] Q_Aᵀ: damping is exact in the eigenbasis.
"""

from __future__ import annotations

from torch import Tensor

from ..collect import BatchData
from ..linalg import symmetric_eigh
from ..statistics import eigenbasis_second_moments
from .kfac import KFAC


class EKFAC(KFAC):
    """EKFAC optimizer; arguments as :class:`~natgrad.optim.KFAC` (``damping_policy.mode`` is
    ignored: damping is always exact in the eigenbasis)."""

    def _update_statistics(self, batch: BatchData) -> None:
        super()._update_statistics(batch)
        if self._is_refresh_step():
            self._refresh_bases()
        decay = self._decay()
        for i, layer in batch.layers.items():
            state = self._layer_state(i)
            scales = eigenbasis_second_moments(layer, state["Q_A"], state["Q_G"]) / batch.examples
            self._average(state, "scales", scales, 0.0 if state.pop("fresh_basis", False) else decay)

    def _refresh(self) -> None:
        if not self.is_statistics_step():  # no batch to measure scales in the new basis
            self._refresh_bases()
            for i in self.adapters:
                state = self._layer_state(i)
                if state.pop("fresh_basis", False):
                    state["scales"] = state["values_G"].unsqueeze(-1) * state["values_A"].unsqueeze(-2)

    def _refresh_bases(self) -> None:
        for i in self.adapters:
            state = self._layer_state(i)
            if "A" not in state:
                continue
            state["values_A"], state["Q_A"] = symmetric_eigh(state["A"])
            state["values_G"], state["Q_G"] = symmetric_eigh(state["G"])
            state["fresh_basis"] = True

    def _layer_direction(self, i: int, matrix: Tensor) -> Tensor:
        state = self._layer_state(i)
        basis_a, basis_g = state["Q_A"], state["Q_G"]
        return basis_g @ ((basis_g.mT @ matrix @ basis_a) / (state["scales"] + self.damping_of(i))) @ basis_a.mT
