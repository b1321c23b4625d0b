"""The exact Fisher of one batch, matrix-free on that batch's live autograd graph.

F v = (1/N) Σ_n J_nᵀ D̃_n J_n v with J v and Jᵀ u from :class:`LinearizedOutput`;
D̃ is the closed-form output Fisher (``vectors=None``: the exact estimator) or Σ_k v_k v_kᵀ
for the Monte-Carlo/empirical vectors [N, *out]. With a communicator, N and every product's
sum over examples are all-reduced: F is the Fisher of the union of the ranks' batches, and
every rank must take the same products (as a CG solve does). ``linearized``: the output's
linearization if the caller already has one (its pullback is then not built again).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distributed import Communicator
from ..estimators import outer_curvature
from ..layout import Block
from ..likelihoods import Likelihood
from ..representations.base import FisherMatrix
from ..linearized import LinearizedOutput


class GraphFisher(FisherMatrix):
    def __init__(
        self,
        blocks: tuple[Block, ...],
        output: Tensor,
        params: list[Tensor],
        likelihood: Likelihood,
        vectors: list[Tensor] | None,
        comm: Communicator | None = None,
        linearized: LinearizedOutput | None = None,
    ) -> None:
        super().__init__(blocks, params[0].dtype, params[0].device)
        self.linearized = LinearizedOutput(output, params) if linearized is None else linearized
        self.likelihood = likelihood
        self.output = output.detach()
        self.comm = comm
        self.examples = output.shape[0]
        if comm is not None:
            (total,) = comm.all_reduce_numbers([self.examples], "example count")
            self.examples = int(total)
        if vectors is None:
            self._curvature = lambda u: likelihood.fisher_vector(self.output, u)
        else:
            self._curvature = outer_curvature(torch.stack(vectors))  # vectors [K, N, *out]

    def _mv(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            columns = [self.linearized.vjp(self._curvature(self.linearized.jvp(v[:, j]))) for j in range(v.shape[1])]
        total = torch.stack(columns, dim=1)
        if self.comm is not None:
            (total,) = self.comm.all_reduce([total], what="Fisher-vector product")
        return total / self.examples
