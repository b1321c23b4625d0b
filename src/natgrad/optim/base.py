"""What the curvature optimizers (NGD, K-FAC, EKFAC) share: the training loop contract.

```
opt.zero_grad(); out = model(x); loss = criterion(out, y)
opt.backward(loss, out)   # loss.backward() + on statistics steps the Fisher backprop of
opt.step()                # the estimator's vectors through the same graph
```
A subclass supplies ``_update_statistics(batch)`` (on statistics steps), ``_refresh()`` (on
inverse steps) and ``_direction(grads)`` — the preconditioned gradient Δ (flat, descent is −Δ).
:class:`~natgrad.optim.step_rules.StepRules` turns Δ into a step; this class runs the loop and
keeps every piece of state in ``state_dict``.

Distributed (torch.distributed, e.g. under DistributedDataParallel): every rank runs the same
loop on its own slice of the batch; the statistics are sums all-reduced over the ranks with
the example counts, so R ranks with batch B step exactly as one process with batch R·B (for
the deterministic estimators). At construction every rank checks that all hold the same model
and options; on the first step, that the gradients are identical (DDP averages them).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ..collect import BatchData, Collector, LayerData
from ..data import all_finite
from ..distributed import Communicator, model_fingerprint, resolve_group, unwrap
from ..errors import warn
from ..estimators import backprop_vectors, check_estimator
from ..layers.base import LayerAdapter
from ..layout import Block, model_dtype_device, parameter_blocks
from ..likelihoods import Likelihood, get_likelihood
from ..linalg import check_damping
from ..linearized import LinearizedOutput, backward_with_pullback
from .capture import TrainingCapture
from .config import DampingPolicy, Schedule, StepPolicy
from .gradient_factors import FactorRecord, factored_cost_is_lower, record_backward
from .groups import ParamGroups, check_lr
from .quadratic_rows import BatchRows
from .step_rules import StepRules


class CurvatureOptimizer(ParamGroups, StepRules, torch.optim.Optimizer):
    """Base class; see the module docstring. ``param_groups`` (optional) are dicts with
    ``params`` (parameters of ``model``) and overrides of ``lr``/``damping``/``weight_decay``;
    a layer's parameters must share one group."""

    generic_statistics = True  # whether non-adapter modules need per-example statistics

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        likelihood: str | Likelihood,
        estimator: str,
        samples: int,
        schedule: Schedule,
        damping_policy: DampingPolicy,
        step_policy: StepPolicy,
        param_groups: list[dict] | None,
        kronecker: bool,
        process_group: object = None,
    ) -> None:
        self.model = unwrap(model)
        self.comm: Communicator | None = resolve_group(model, process_group)
        check_estimator(estimator, samples)
        for name, value, kind in (
            ("schedule", schedule, Schedule),
            ("damping_policy", damping_policy, DampingPolicy),
            ("step_policy", step_policy, StepPolicy),
        ):
            if not isinstance(value, kind):
                raise TypeError(f"{name} must be a natgrad.optim.{kind.__name__}, got {type(value).__name__}")
        if damping_policy.adaptive and step_policy.rescale != "quadratic":
            raise ValueError(
                "adaptive damping compares the loss reduction with the exact-Fisher quadratic model: "
                "it needs StepPolicy(rescale='quadratic')"
            )
        self.likelihood = get_likelihood(likelihood)
        self.estimator = estimator
        self.samples = samples
        self.schedule = schedule
        self.damping_policy = damping_policy
        self.step_policy = step_policy
        self.blocks: tuple[Block, ...] = parameter_blocks(self.model)
        self.dtype, self.device = model_dtype_device(self.model)
        named = dict(self.model.named_parameters())
        self.block_params = [[named[n] for n in b.params] for b in self.blocks]
        defaults = {"lr": check_lr(lr), "damping": check_damping(damping), "weight_decay": step_policy.weight_decay}
        super().__init__(self._groups(param_groups), defaults)
        self.collector = Collector(
            self.model, self.blocks, self.likelihood, estimator, samples, type(self).__name__,
            kronecker=False, generic=self.generic_statistics, single_call=kronecker, dtype=self.dtype,
        )
        self.adapters = dict(self.collector.adapters)
        if kronecker and not self.adapters:
            raise ValueError(
                f"{type(self).__name__} found no supported layer (nn.Linear, nn.Conv2d) with trainable "
                "weights in the model; use natgrad.optim.NGD or a first-order optimizer"
            )
        self.capture = TrainingCapture(self.model, {a.module: a.name for a in self.adapters.values()})
        self.steps = 0  # completed steps
        self._pending: tuple[Tensor, Tensor] | None = None  # (output, loss) of opt.backward
        self._linearized: LinearizedOutput | None = None  # J·v on that graph, for the quadratic model
        self._rows: BatchRows | None = None  # the quadratic model's rows, if not the whole batch
        self._stats_batch: BatchData | None = None
        self._factors: FactorRecord | None = None  # layers whose .grad opt.backward left factored
        self._skip = False
        self._warned_no_graph = False
        self._replay_off = False  # a replay of rows mismatched: J·v from the graph (warned once)
        self.step_state: dict = {}  # previous step δ₀, momentum buffer, last (α, μ), LM ratio
        self._grads_checked = False
        if self.comm is not None:
            description, checksums = model_fingerprint(self.model)
            self.comm.check_same(f"{description}|{self._options()}", checksums, f"{type(self).__name__} setup")
        self._arm()

    def _options(self) -> str:
        """Every option that must agree across ranks, as text."""
        groups = [(g["lr"], g["damping"], g["weight_decay"], len(g["params"])) for g in self.param_groups]
        return (
            f"{type(self).__name__}|{type(self.likelihood).__name__}|{self.estimator}|{self.samples}|"
            f"{self.schedule}|{self.damping_policy}|{self.step_policy}|{groups}"
        )

    @property
    def rank(self) -> int:
        return 0 if self.comm is None else self.comm.rank

    def _reduce_sums(self, sums: list[Tensor], symmetric: list[bool], examples: int, what: str) -> tuple[list[Tensor], int]:
        """Sums of this rank's statistics and its example count → the sums and count over all ranks
        (one bucketed all-reduce; the count travels in the same bucket)."""
        if self.comm is None:
            return sums, examples
        count = torch.tensor([float(examples)], dtype=sums[0].dtype if sums else self.dtype, device=self.device)
        reduced = self.comm.all_reduce(sums + [count], symmetric + [False], what)
        return reduced[:-1], int(round(float(reduced[-1])))

    # ---------------------------------------------------------------- setup
    def remove_hooks(self) -> None:
        """Remove the hooks this optimizer placed on the model (it cannot train afterwards)."""
        self.capture.remove()

    # ---------------------------------------------------------------- the loop
    def is_statistics_step(self) -> bool:
        return self.steps % self.schedule.stat_every == 0

    def _uses_gradient_factors(self) -> bool:
        """Whether ``_direction`` can use a layer's gradient in factored form (see
        :mod:`natgrad.optim.gradient_factors`); the capture then records every step."""
        return False

    def _factored_is_cheaper(self, adapter: LayerAdapter, inputs: Tensor, rows: int) -> bool:
        """Whether preconditioning a layer's gradient through its R = ``rows`` factors costs less."""
        return factored_cost_is_lower(rows, *adapter.matrix_shape[1:])

    def _arm(self) -> None:
        stats = self.is_statistics_step()
        factors = self._uses_gradient_factors()
        self.capture.active = stats or factors
        self.capture.record_grads = (stats and self.estimator == "empirical") or factors
        policy = self.step_policy  # the quadratic model may replay the model on some of its inputs
        self.capture.record_inputs = policy.rescale == "quadratic" and policy.quadratic_fraction < 1
        if not self.capture.active:
            self.capture.clear()

    def _needs_graph(self) -> bool:
        return self.step_policy.rescale == "quadratic" or self.damping_policy.adaptive

    def backward(self, loss: Tensor, output: Tensor) -> None:
        """``loss.backward()`` plus, on statistics steps, the Fisher backprop through the same graph.

        ``loss`` must be the mean negative log-likelihood of the batch under ``likelihood``
        (e.g. ``cross_entropy(output, y)``) and ``output`` the model output it was computed from.
        """
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise TypeError("loss must be a scalar tensor (reduce it with .mean())")
        if not isinstance(output, Tensor):
            raise TypeError(f"output must be the model's output tensor, got {type(output).__name__}")
        if not torch.isfinite(loss):
            warn(f"non-finite loss {float(loss.detach())}: the next step() is skipped", RuntimeWarning)
            self._skip = True
            if self.comm is not None:
                # the other ranks' DDP backward waits for this rank's gradients; the averaged
                # gradient is then non-finite on every rank, so every rank skips the step
                loss.backward()
            return
        keep = self._needs_graph()
        stats = self.is_statistics_step() and self.estimator != "empirical"
        rows, replay = self._quadratic_rows(output) if keep else (0, False)
        # the quadratic model's J·v are replayed on rows of the batch, or they reuse this
        # backward (DDP reduces .grad without a graph)
        pullback = keep and not replay and self.comm is None and output.requires_grad

        def run() -> LinearizedOutput | None:
            if pullback:
                return backward_with_pullback(loss, output, self._params())
            loss.backward(retain_graph=keep or stats)
            return None

        if self._uses_gradient_factors():
            params = {i: self.block_params[i] for i in self.adapters}
            self._linearized, self._factors = record_backward(
                run, loss, self.adapters, params, self.capture, self._factored_is_cheaper
            )
            if not (self.is_statistics_step() and self.estimator == "empirical"):
                self.capture.grad_outputs.clear()  # the record keeps what it needs
        else:
            self._linearized = run()
        if keep and self._linearized is None:
            self._linearized = LinearizedOutput(output, self._params())
        self._rows = self._rows_linearization(self._linearized, rows, replay) if rows else None
        self._pending = (output, loss.detach())
        if stats:
            self._stats_batch = self._fisher_batch(output, keep)

    def _fisher_batch(self, output: Tensor, keep_graph: bool) -> BatchData:
        if self.capture.modified_in_place():
            raise RuntimeError(
                "a layer output was modified in place after the layer (e.g. ReLU(inplace=True)); "
                "natgrad's Fisher backprop needs it intact: use inplace=False"
            )
        self.likelihood.check_output(output)
        vectors = backprop_vectors(self.likelihood, self.estimator, output.to(self.dtype), None, self.samples)
        return self.collector.from_capture(
            self.capture, self._model_inputs(output), output, vectors, retain_graph=keep_graph
        )

    def _model_inputs(self, output: Tensor) -> Tensor:
        inputs = self.capture.model_inputs
        if inputs is None:
            inputs = output.new_zeros(output.shape[0], 0)  # only used by generic statistics
        return inputs

    def _empirical_batch(self) -> BatchData:
        """The empirical Fisher from the gradients the user's loss.backward() produced: for a
        mean loss, N ∂loss/∂a is the per-example score back-propagated to each layer output a."""
        if not self.capture.captured() or self.capture.root_grad is None:
            raise RuntimeError(
                "this is a statistics step but no gradients were recorded; run the forward pass "
                "with gradients enabled and call loss.backward() (or opt.backward(loss, output)) "
                "before step()"
            )
        self.collector._check_calls(self.capture)
        n = self.capture.root_grad.shape[0]
        layers = {}
        for i, adapter in self.collector.adapters.items():
            output = self.capture.outputs[adapter.name]
            grad = self.capture.grad_outputs.get(adapter.name)
            grad = torch.zeros_like(output) if grad is None else grad  # output unused by the loss
            grads = adapter.output_grads(grad.to(self.dtype) * n).unsqueeze(1)
            inputs = adapter.layer_inputs(self.capture.inputs[adapter.name].to(self.dtype))
            layers[i] = LayerData(adapter, inputs, grads)
        generic = {}
        if self.collector.generic:
            vectors = [self.capture.root_grad.to(self.dtype) * n]
            generic = self.collector._generic_data(self._model_inputs(self.capture.root_grad), vectors)
        return BatchData(n, layers, generic)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update. ``closure`` (re-evaluates and returns the loss without backward) is needed
        only by adaptive damping."""
        self._check_group_values()
        if self._skip:
            self._skip = False
            warn("non-finite loss: step skipped, parameters and state untouched", RuntimeWarning)
            self._finish_step(advance=False)
            return None
        grads = self._flat_grads()
        if grads is None:
            raise RuntimeError("step() found no gradients: call opt.backward(loss, output) (or loss.backward()) first")
        if not all_finite(grads):
            warn("non-finite gradient: step skipped, parameters and state untouched", RuntimeWarning)
            self._finish_step(advance=False)
            return None
        if self.comm is not None and not self._grads_checked:
            self.comm.check_same(
                "gradients", grads, "first step",
                hint="the gradients must be averaged over the ranks before step(): wrap the model in "
                "torch.nn.parallel.DistributedDataParallel (or all-reduce the gradients yourself)",
            )
            self._grads_checked = True
        if self.is_statistics_step():
            self._update_statistics(self._statistics_batch())
        if self._is_refresh_step():
            self._refresh()
        weight_decay = self._weight_decay_vector()
        if weight_decay is not None:
            grads = grads + weight_decay * self._flat_params()
        direction = self._direction(grads)
        if not all_finite(direction):
            warn("non-finite preconditioned direction: step skipped", RuntimeWarning)
            self._finish_step(advance=False)
            return None
        update, model = self._update(direction, grads)
        self._apply(update)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._adapt_damping(model, loss)
        self._finish_step(advance=True)
        return loss

    def _statistics_batch(self) -> BatchData:
        """This step's statistics, restricted to R = max(⌈τ₁ N⌉, ⌈``stat_min_examples`` / ranks⌉)
        examples of this rank's N (``stat_fraction`` τ₁; the ranks' R add up to the minimum): the
        j-th statistics step takes the rows from jR mod N on, so that a batch seen again
        (full-batch training, an unshuffled loader) enters the factors with all of its examples in
        turn."""
        if self.estimator == "empirical":
            batch = self._empirical_batch()
        elif self._stats_batch is None:
            raise RuntimeError(
                f"step {self.steps} is a statistics step for the {self.estimator!r} Fisher, which needs "
                "the Fisher backprop: call opt.backward(loss, output) instead of loss.backward()"
            )
        else:
            batch = self._stats_batch
        ranks = 1 if self.comm is None else self.comm.world
        count = max(math.ceil(self.schedule.stat_fraction * batch.examples),
                    math.ceil(self.schedule.stat_min_examples / ranks))
        return batch.rows(self.steps // self.schedule.stat_every * count, count)

    def _is_refresh_step(self) -> bool:
        return self.steps % self.schedule.inverse_every == 0 or self.steps < 3

    def _finish_step(self, advance: bool) -> None:
        if advance:
            self.steps += 1
        self._pending = None
        self._linearized = None
        self._rows = None
        self._stats_batch = None
        self._factors = None
        self.capture.clear()
        self._arm()

    # ---------------------------------------------------------------- vectors
    def _params(self) -> list[Tensor]:
        return [p for b in self.block_params for p in b]

    def _flat_grads(self) -> Tensor | None:
        params = self._params()
        if all(p.grad is None for p in params):
            return None
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])

    def _flat_params(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params()])

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["natgrad"] = {"steps": self.steps, "param_shapes": self._param_shapes(),
                            **{k: v for k, v in self.step_state.items()}, **self._extra_state()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = dict(state_dict.pop("natgrad", {}))
        saved = extra.pop("param_shapes", None)
        if saved is not None and [tuple(s) for s in saved] != self._param_shapes():
            raise ValueError(
                "this state_dict was saved by an optimizer of a model with other parameter shapes "
                f"({[tuple(s) for s in saved]}, here {self._param_shapes()}): load it into the same "
                "architecture"
            )
        super().load_state_dict(state_dict)
        self.steps = int(extra.pop("steps", 0))
        self._load_extra_state(extra)
        self.step_state = {k: extra[k] for k in ("previous", "momentum_buffer", "coeff", "ratio") if k in extra}
        self._arm()

    def _param_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self._params()]

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    # ---------------------------------------------------------------- subclass interface
    def _update_statistics(self, batch: BatchData) -> None:
        raise NotImplementedError

    def _refresh(self) -> None:
        pass

    def _direction(self, grads: Tensor) -> Tensor:
        raise NotImplementedError

