"""How a preconditioned direction Δ becomes a parameter change (a mixin of the optimizers).

``rescale="quadratic"``: δ = lr·(αΔ + μδ₀) with (α, μ) minimising the exact-Fisher quadratic
model of the batch (Martens & Grosse §6.4, §7), shrunk into the Fisher-norm trust region;
``"kl_clip"``: Δ scaled so that lr²Δᵀ∇ ≤ kl_clip, then heavy-ball momentum; ``"none"``: lr and
momentum. Adaptive damping (Levenberg–Marquardt) compares the loss change with the model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import warn
from ..linalg import weighted_dot
from .quadratic import quadratic_model


class StepRules:
    """Needs from the optimizer: ``step_policy``, ``damping_policy``, ``param_groups``,
    ``step_state`` (dict), ``steps``, ``likelihood``, ``_pending``, ``_linearized``, ``comm``, ``_params()``,
    ``_per_param()``."""

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
                model = quadratic_model(
                    self._linearized, self.likelihood, -direction, previous, grads, damping, self.comm
                )
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
