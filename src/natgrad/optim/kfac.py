"""K-FAC (Martens & Grosse 2015) and KFC for convolutions (Grosse & Martens 2016).

Per layer, running averages of A = E[ā āᵀ] and G = E[g gᵀ] (g from the estimator's backprop,
see :mod:`natgrad.statistics`), refreshed every ``Schedule.stat_every`` steps; every
``Schedule.inverse_every`` steps either the factored-damped inverses
(A + π√λ' I)⁻¹, (G + √λ'/π I)⁻¹ (π = √((tr A / dim A)/(tr G / dim G))) or the eigendecompositions
(for exact damping) are recomputed. The direction of a layer with gradient matrix ∇M is
Δ = (G + ·)⁻¹ ∇M (A + ·)⁻¹, or Q_G[(Q_Gᵀ∇M Q_A)/(λ_G λ_Aᵀ + λ')]Q_Aᵀ. A layer whose ``.grad``
is provably the batch product ∇M = gᵀā of R rows is preconditioned as ((G + ·)⁻¹gᵀ)(ā(A + ·)⁻¹)
(or projected as (g Q_G)ᵀ(ā Q_A)) when that is cheaper (small batches on wide layers, Martens & Grosse
§8; :mod:`natgrad.optim.gradient_factors` says when it is exact).

Distributed (as KAISA, Pauloski et al. 2021): the factor sums are all-reduced on statistics
steps only, in bucketed calls with the symmetric factors as upper triangles. Each layer's
inverses (or eigendecompositions) are computed on one rank, chosen by cost (d_A³ + d_G³, greedy
balance), and then either broadcast to all ranks (``sharding="inverses"``, every rank
preconditions every layer) or kept there (``sharding="gradients"``: each rank preconditions its
own layers and broadcasts their preconditioned gradients every step — less memory and inverse
traffic, more per-step traffic). ``"replicated"`` computes everything everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..collect import BatchData
from ..errors import warn
from ..likelihoods import Likelihood
from ..linalg import symmetric_eigh
from ..statistics import input_gram, output_gram
from .base import CurvatureOptimizer
from .config import DampingPolicy, Schedule, StepPolicy
from ..distributed import assign_owners
from .other import check_other, other_direction

SHARDING = ("inverses", "gradients", "replicated")


def damped_inverse(matrix: Tensor, shift: Tensor) -> Tensor:
    """(matrix + shift I)⁻¹ per group for PSD ``matrix`` [G, d, d], ``shift`` [G] > 0.

    Cholesky first; if it fails (ill-conditioned float32), eigenvalues floored at 0 in float64.
    """
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    damped = 0.5 * (matrix + matrix.mT) + shift[:, None, None] * eye
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info.max()) == 0:
        return torch.cholesky_inverse(factor)
    values, vectors = symmetric_eigh(matrix.double())
    inverse = (vectors / (values + shift.double()[:, None])[:, None, :]) @ vectors.mT
    return inverse.to(matrix.dtype)


def right_multiply(matrix: Tensor, factor: Tensor, has_bias: bool) -> Tensor:
    """[W | b] @ factor per group. Wide layers avoid products of the odd width D_in + 1 (785:
    ~15 % slower here): with factor = [[P, q], [sᵀ, r]], the result is [W P + b sᵀ | W q + b r];
    below ~512 columns the four extra products cost more than they save."""
    if not has_bias or matrix.shape[-1] <= 512:
        return matrix @ factor
    weight, bias = matrix[..., :-1], matrix[..., -1:]
    p, q = factor[..., :-1, :-1], factor[..., :-1, -1:]
    s, r = factor[..., -1:, :-1], factor[..., -1:, -1:]
    return torch.cat([weight @ p + bias @ s, weight @ q + bias @ r], dim=-1)


LayerGradient = Tensor | tuple[Tensor, Tensor]  # ∇M [G, O, D], or (g [G, R, O], ā [G, R, D]) with ∇M = gᵀā


def sandwich(left: Tensor, grad: LayerGradient, right: Tensor, has_bias: bool) -> Tensor:
    """left @ ∇M @ right per group. Given ∇M's factors, (left gᵀ)(ā right): R(O² + D² + OD)
    multiply-adds instead of OD(O + D) (:mod:`natgrad.optim.gradient_factors` decides which)."""
    if isinstance(grad, tuple):
        g, a = grad
        return (left @ g.mT) @ right_multiply(a, right, has_bias)
    return left @ right_multiply(grad, right, has_bias)


class KFAC(CurvatureOptimizer):
    """K-FAC optimizer. ``KFAC(model, likelihood=...)`` has working defaults.

    Args:
        model: the network (or a DistributedDataParallel wrapping it).
        lr: multiplier of the step (1.0 = the step the quadratic model picks).
        damping: Tikhonov damping λ of the Kronecker factors.
        likelihood: output distribution, as in :func:`natgrad.fisher`.
        estimator: "mc" (default), "exact" or "empirical".
        samples: draws of y per input for "mc".
        schedule, damping_policy, step_policy: option groups (:mod:`natgrad.optim.config`).
            The default schedule takes the statistics from ⌈N/8⌉ examples of each batch of N, at
            least 32 (Martens & Grosse's τ₁ = 1/8): the factor products cost 1/8 of the whole
            batch's, and on mnist-autoencoder K-FAC reached the target on 5 seeds of 5 in ~60 s
            against 4 of 5 and a median of 84 s with whole batches (docs/convergence.md).
        other: update of parameters of modules without a layer adapter: "adam", "sgd", "diagonal".
        param_groups: optional groups with their own lr/damping/weight_decay.
        process_group: torch.distributed group whose ranks share the training (default: the
            DistributedDataParallel model's group, else the default group if initialised).
        sharding: "inverses" (default), "gradients" or "replicated"; see the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        damping: float = 1e-3,
        likelihood: str | Likelihood = "categorical",
        estimator: str = "mc",
        samples: int = 1,
        *,
        schedule: Schedule = Schedule(stat_fraction=1 / 8),
        damping_policy: DampingPolicy = DampingPolicy(),
        step_policy: StepPolicy = StepPolicy(),
        other: str = "adam",
        param_groups: list[dict] | None = None,
        process_group: object = None,
        sharding: str = "inverses",
    ) -> None:
        self.other = check_other(other)
        if sharding not in SHARDING:
            raise ValueError(f"sharding must be one of {list(SHARDING)}, got {sharding!r}")
        self.sharding = sharding
        self.generic_statistics = other == "diagonal"
        super().__init__(
            model, lr, damping, likelihood, estimator, samples, schedule, damping_policy, step_policy,
            param_groups, kronecker=True, process_group=process_group,
        )
        self.other_blocks = [i for i in range(len(self.blocks)) if i not in self.adapters]
        if self.other_blocks:
            names = ", ".join(repr(self.blocks[i].name) for i in self.other_blocks)
            warn(
                f"{type(self).__name__}: modules {names} have no Kronecker layer adapter; their "
                f"parameters are updated with other={other!r}"
            )
        self.stat_updates = 0
        self._owners: dict[int, int] | None = None

    def _options(self) -> str:
        return f"{super()._options()}|{self.other}|{self.sharding}"

    def _layer_state(self, i: int) -> dict:
        return self.state[self.block_params[i][0]]

    def _decay(self) -> float:
        return min(1.0 - 1.0 / self.stat_updates, self.schedule.decay)

    @staticmethod
    def _average(state: dict, key: str, total: Tensor, scale: float, decay: float) -> None:
        """state[key] ← decay·state[key] + (1 − decay)·scale·total in two passes (``total``, a
        fresh sum, is scaled in place and kept when there is nothing to average with). A new
        tensor each time: references a user took to the previous average stay as they were."""
        if key not in state or decay == 0:
            state[key] = total.mul_(scale)
        else:
            state[key] = state[key].mul(decay).add_(total, alpha=(1 - decay) * scale)

    def _update_statistics(self, batch: BatchData) -> None:
        self.stat_updates += 1
        decay = self._decay()
        layers, generic = sorted(batch.layers), sorted(batch.generic)
        sums = [input_gram(batch.layers[i]) for i in layers] + [output_gram(batch.layers[i]) for i in layers]
        sums += [batch.generic[i].pow(2).sum((0, 1)) for i in generic]
        symmetric = [True] * (2 * len(layers)) + [False] * len(generic)
        sums, examples = self._reduce_sums(sums, symmetric, batch.examples, "Kronecker factors")
        self._stat_examples = examples  # of this statistics step, over all ranks
        for k, i in enumerate(layers):
            state = self._layer_state(i)
            positions = batch.layers[i].raw_inputs.shape[1]
            self._average(state, "A", sums[k], 1.0 / (examples * positions), decay)
            self._average(state, "G", sums[len(layers) + k], 1.0 / examples, decay)
        for k, i in enumerate(generic):
            self._average(self._layer_state(i), "fisher_diagonal", sums[2 * len(layers) + k], 1.0 / examples, decay)

    # ---------------------------------------------------------------- sharded refresh
    def _layer_owners(self) -> dict[int, int]:
        """Rank that computes each layer's inverses: all local on one process or when replicated."""
        if not self._owners:  # decided once the factors exist (their sizes are the costs)
            layers = [i for i in self.adapters if "A" in self._layer_state(i)]
            if self.comm is None or self.sharding == "replicated":
                self._owners = {i: self.rank for i in layers}
            else:
                costs = [float(self._cost(self._layer_state(i))) for i in layers]
                self._owners = dict(zip(layers, assign_owners(costs, self.comm.world)))
        return self._owners

    @staticmethod
    def _cost(state: dict) -> float:
        """Flops of a layer's inverses ∝ groups·(d_A³ + d_G³)."""
        a, g = state["A"], state["G"]
        return a.shape[0] * (a.shape[-1] ** 3 + g.shape[-1] ** 3)

    def _owned(self) -> list[int]:
        return [i for i, rank in self._layer_owners().items() if rank == self.rank]

    def _share(self, keys: list[str], symmetric: list[bool]) -> None:
        """Broadcast ``state[key]`` of every layer from its owner (``sharding="inverses"``);
        non-owners receive into buffers shaped like the owner's. Keys may hold tensors or
        tuples of tensors (eigendecompositions). Owners first make theirs exactly what the
        others receive — contiguous (a product with a transposed-stride operand may round
        differently) and, for symmetric matrices sent as upper triangles, mirrored from the
        upper triangle — so the ranks' parameters cannot drift apart."""
        for i in self._owned():
            state = self._layer_state(i)
            for key, flag in zip(keys, symmetric):
                value = state[key]
                if isinstance(value, tuple):
                    state[key] = tuple(t.contiguous() for t in value)
                else:
                    state[key] = (value.triu() + value.triu(1).mT).contiguous() if flag else value.contiguous()
        if self.comm is None or self.sharding != "inverses":
            return
        tensors, flags = {}, {}
        for i, owner in self._layer_owners().items():
            state = self._layer_state(i)
            if owner != self.rank:
                for key, like in zip(keys, self._shapes_like(state, keys)):
                    state[key] = like
            tensors[i] = [t for key in keys for t in _as_tuple(state[key])]
            flags[i] = [flag for key, flag in zip(keys, symmetric) for _ in _as_tuple(state[key])]
        self.comm.broadcast_owned(tensors, self._layer_owners(), flags, "inverses")

    @staticmethod
    def _shapes_like(state: dict, keys: list[str]) -> list:
        """Empty buffers for ``keys``: ``*_inv``/``Q_*`` like the factor, values one row of it."""
        out = []
        for key in keys:
            factor = state["A"] if "A" in (key[0], key[-1]) else state["G"]
            if key.startswith("eig_"):
                out.append((factor.new_empty(factor.shape[:-1]), torch.empty_like(factor)))
            elif key.startswith("values_"):
                out.append(factor.new_empty(factor.shape[:-1]))
            else:
                out.append(torch.empty_like(factor))
        return out

    def _refresh(self) -> None:
        for i in self._owned():
            state = self._layer_state(i)
            if self.damping_policy.mode == "eigen":
                state["eig_A"] = symmetric_eigh(state["A"])
                state["eig_G"] = symmetric_eigh(state["G"])
            else:
                self._factored_inverses(state, self.damping_of(i))
        self._share(*self._inverse_keys())

    def _inverse_keys(self) -> tuple[list[str], list[bool]]:
        """The state each refresh produces per layer and whether each is a symmetric matrix."""
        if self.damping_policy.mode == "eigen":
            return ["eig_A", "eig_G"], [False, False]
        return ["A_inv", "G_inv"], [True, True]

    @staticmethod
    def _factored_inverses(state: dict, damping: float) -> None:
        a, g = state["A"], state["G"]
        mean_a = a.diagonal(dim1=-2, dim2=-1).mean(-1)
        mean_g = g.diagonal(dim1=-2, dim2=-1).mean(-1)
        pi = torch.where((mean_a > 0) & (mean_g > 0), (mean_a / mean_g.clamp_min(1e-30)).sqrt(), torch.ones_like(mean_a))
        gamma = damping**0.5
        state["A_inv"] = damped_inverse(a, pi * gamma)
        state["G_inv"] = damped_inverse(g, gamma / pi)

    def _uses_gradient_factors(self) -> bool:
        return self.comm is None

    def _gradient_rows(self) -> dict[int, tuple[Tensor, Tensor]]:
        """(g, ā) of the layers whose ``.grad`` is exactly gᵀā and cheaper to precondition so."""
        if self._factors is None:
            return {}
        return self._factors.rows(self.weight_decay_of)

    def _layer_direction(self, i: int, grad: LayerGradient) -> Tensor:
        state = self._layer_state(i)
        has_bias = self.adapters[i].has_bias
        if self.damping_policy.mode == "eigen":
            values_a, vectors_a = state["eig_A"]
            values_g, vectors_g = state["eig_G"]
            scale = values_g.unsqueeze(-1) * values_a.unsqueeze(-2) + self.damping_of(i)
            return vectors_g @ (sandwich(vectors_g.mT, grad, vectors_a, has_bias) / scale) @ vectors_a.mT
        return sandwich(state["G_inv"], grad, state["A_inv"], has_bias)

    def _direction(self, grads: Tensor) -> Tensor:
        pieces = []
        split = self.comm is not None and self.sharding == "gradients"
        owned = set(self._owned()) if split else set(self.adapters)
        rows = self._gradient_rows()
        for i, block in enumerate(self.blocks):
            grad = grads[block.slice]
            if i in self.adapters:
                adapter = self.adapters[i]
                if "A" not in self._layer_state(i):
                    raise RuntimeError("no curvature statistics yet: the first step must be a statistics step")
                if i in rows:
                    pieces.append(adapter.from_matrix(self._layer_direction(i, rows[i])))
                elif i in owned:
                    pieces.append(adapter.from_matrix(self._layer_direction(i, adapter.to_matrix(grad))))
                else:
                    pieces.append(torch.zeros_like(grad))
            else:
                pieces.append(other_direction(self.other, grad, self._layer_state(i), self.damping_of(i)))
        direction = torch.cat(pieces)
        if split:  # each layer's piece from its owner: one bucketed broadcast per rank
            views = {i: [direction[self.blocks[i].slice]] for i in self.adapters}
            self.comm.broadcast_owned(views, self._layer_owners(), {i: [False] for i in views}, "preconditioned gradients")
        return direction

    def _extra_state(self) -> dict:
        return {"stat_updates": self.stat_updates}

    def _load_extra_state(self, extra: dict) -> None:
        self.stat_updates = int(extra.pop("stat_updates", 0))
        self._owners = None

    # ---------------------------------------------------------------- state with sharded inverses
    _INVERSE_KEYS = ("A_inv", "G_inv", "eig_A", "eig_G")

    def state_dict(self) -> dict:
        """With ``sharding="gradients"`` each rank holds only its layers' inverses: this call is
        then collective (every rank must call it) and gathers them, so any rank's state_dict
        is complete and resumes on any number of ranks."""
        if self.comm is None or self.sharding != "gradients" or not self._layer_owners():
            return super().state_dict()
        owners = self._layer_owners()
        self.sharding = "inverses"  # broadcast everything once, then drop what is not ours
        try:
            self._share(*self._inverse_keys())
            state = super().state_dict()
            state["state"] = {k: dict(v) for k, v in state["state"].items()}
        finally:
            self.sharding = "gradients"
        self._drop_unowned(owners)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.comm is not None and self.sharding == "gradients" and self._layer_owners():
            self._drop_unowned(self._layer_owners())

    def _drop_unowned(self, owners: dict[int, int]) -> None:
        for i, owner in owners.items():
            if owner != self.rank:
                for key in self._INVERSE_KEYS:
                    self._layer_state(i).pop(key, None)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
