"""How a preconditioned direction Δ becomes a parameter change (a mixin of the optimizers).

``rescale="quadratic"``: δ = lr·(αΔ + μδ₀) with (α, μ) minimising the exact-Fisher quadratic
model of the batch (Martens & Grosse §6.4, §7), shrunk into the Fisher-norm trust region;
``"kl_clip"``: Δ scaled so that lr²Δᵀ∇ ≤ kl_clip, then heavy-ball momentum; ``"none"``: lr and
momentum. Adaptive damping (Levenberg–Marquardt) compares the loss change with the model. With
``quadratic_fraction`` τ₂ < 1 the model's F is that of ⌈τ₂ N⌉ rows, its J·v replayed on them
(:mod:`natgrad.optim.quadratic_rows`) for models large enough that this saves time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import warn
from ..linalg import weighted_dot
from .quadratic import quadratic_model
from ..linearized import LinearizedOutput
from .quadratic_rows import BatchRows, ReplayedRows, ReplayMismatch

# torch.func's fixed cost for a replay (~1.5 ms of dispatch) in multiply-adds of one CPU core: a
# replay of S rows for K = 2 directions saves (2K N − (1 + 2K) S)·P of them (P parameters ≈ the
# multiply-adds of one row's forward through an MLP; convolutions make it an underestimate)
REPLAY_DISPATCH_MACS = 5e7


class StepRules:
    """Needs from the optimizer: ``step_policy``, ``damping_policy``, ``param_groups``,
    ``step_state`` (dict), ``steps``, ``likelihood``, ``_pending``, ``_linearized``, ``_rows``, ``comm``, ``_params()``,
    ``_per_param()``, ``model``, ``blocks``, ``capture``, ``_replay_off`` (set once a replay mismatched)."""

    def _quadratic_rows(self, output: Tensor) -> tuple[int, bool]:
        """(S, replay): the quadratic model's S = max(⌈τ₂ N⌉, ⌈``quadratic_min_examples`` / ranks⌉)
        rows of this rank's N (0: the whole batch), and whether to replay the model on them — when
        it can be (one batch tensor as the forward's only argument, no mismatch seen) and the
        products it saves outweigh torch.func's fixed dispatch cost."""
        policy = self.step_policy
        n = output.shape[0] if output.dim() else 0
        ranks = 1 if self.comm is None else self.comm.world
        count = max(math.ceil(policy.quadratic_fraction * n), math.ceil(policy.quadratic_min_examples / ranks))
        if count >= n:
            return 0, False
        inputs = self.capture.model_inputs
        replay = (
            not self._replay_off and self.capture.single_input
            and inputs is not None and inputs.shape[:1] == output.shape[:1]
            and (4 * n - 5 * count) * sum(p.numel() for p in self._params()) > REPLAY_DISPATCH_MACS
        )
        return count, replay

    def _rows_linearization(self, whole: LinearizedOutput, count: int, replay: bool) -> BatchRows:
        """The quadratic model's linearization on this step's ``count`` rows: the j-th step takes
        them from j·count (mod N) on, so a batch seen again contributes all of its rows in turn."""
        start = self.steps * count
        if not replay:
            return BatchRows(whole, start, count)
        names = [name for block in self.blocks for name in block.params]
        return ReplayedRows(
            whole, start, count, self.model, dict(zip(names, self._params())), self.capture.model_inputs,
            self.capture.autocast,
        )

    def _quadratic_model(self, direction: Tensor, previous: Tensor | None, grads: Tensor, damping):
        linearized = self._rows or self._linearized
        if isinstance(linearized, ReplayedRows):
            try:
                return quadratic_model(linearized, self.likelihood, direction, previous, grads, damping, self.comm)
            except ReplayMismatch as exc:
                warn(
                    f"{exc}: the quadratic model's J·v on its rows come from the batch's graph from now on "
                    "(the same values, at the cost of quadratic_fraction=1)"
                )
                self._replay_off = True
                linearized = BatchRows(linearized.whole, linearized.start, linearized.count)
        return quadratic_model(linearized, self.likelihood, direction, previous, grads, damping, self.comm)

    def _update(self, direction: Tensor, grads: Tensor):
        """The parameter change δ (to add) and the quadratic model used, if any.

        Per-parameter hyper-parameters are numbers when all groups agree (the usual case), so
        each rule costs a few passes over the flat vectors and no per-parameter copies.
        """
        policy = self.step_policy
        lr = self._per_param("lr")
        state = self.step_state
        previous = state.get("previous")
        rescale = policy.rescale
        if rescale == "quadratic" and self._linearized is None:
            if not self._warned_no_graph:
                warn(
                    "the exact-Fisher quadratic model needs the graph, which loss.backward() freed: "
                    "steps use rescale='kl_clip' instead; call opt.backward(loss, output) to keep it"
                )
                self._warned_no_graph = True
            rescale = "kl_clip"
        model = None
        if rescale == "quadratic":
            damping = self._per_param("damping") + self._per_param("weight_decay")
            with torch.enable_grad():
                model = self._quadratic_model(-direction, previous, grads, damping)
            alpha, mu = model.optimum(use_momentum=previous is not None)
            shrink = model.trust_region_scale((alpha, mu), policy.kl_clip)
            alpha, mu = alpha * shrink, mu * shrink
            change = direction * -alpha
            if previous is not None:
                change.add_(previous, alpha=mu)
            change.mul_(lr)
            state["coeff"] = (alpha, mu)
        else:
            scale = 1.0
            if rescale == "kl_clip":
                quad = weighted_dot(direction, lr * lr, grads)
                scale = min(1.0, math.sqrt(policy.kl_clip / quad)) if quad > 0 else 1.0
            buffer = state.get("momentum_buffer")
            step = direction * scale if scale != 1.0 else direction
            buffer = step if buffer is None or policy.momentum == 0 else buffer.mul(policy.momentum).add_(step)
            state["momentum_buffer"] = buffer
            change = buffer * -lr
        state["previous"] = change
        return change, model

    def _apply(self, change: Tensor) -> None:
        offset = 0
        for p in self._params():
            n = p.numel()
            p.add_(change[offset : offset + n].view_as(p))
            offset += n

    def _adapt_damping(self, model, loss: Tensor | None) -> None:
        policy = self.damping_policy
        if not policy.adaptive or self.steps % policy.adapt_every != 0:
            return
        if loss is None:
            raise RuntimeError("adaptive damping needs the loss after the step: call opt.step(closure)")
        if model is None:
            raise RuntimeError("adaptive damping needs the graph: call opt.backward(loss, output)")
        state = self.step_state
        before, after = float(self._pending[1]), float(loss.detach() if isinstance(loss, Tensor) else loss)
        if self.comm is not None:  # the global batch's losses: mean over ranks, weighted by size
            n = self._pending[0].shape[0]
            before, after, total = self.comm.all_reduce_numbers([n * before, n * after, n], "loss")
            before, after = before / total, after / total
        coeff = state.get("coeff")
        lr = float(self.param_groups[0]["lr"])
        predicted = model.value((coeff[0] * lr, coeff[1] * lr)) if coeff else None
        if not predicted or predicted >= 0:
            return
        ratio = (after - before) / predicted
        omega = policy.omega**policy.adapt_every
        for group in self.param_groups:
            value = group["damping"]
            if ratio > 0.75:
                value *= omega
            elif ratio < 0.25:
                value /= omega
            group["damping"] = min(max(value, policy.min_damping), policy.max_damping)
        state["ratio"] = ratio
