"""A layer's gradient in factored form, for a cheaper K-FAC/EKFAC preconditioning (Martens & Grosse §8).

A layer's gradient over a batch is a sum of R = N·T outer products (T uses per example):
∇M = Σ_r g_r ā_rᵀ = gᵀ ā per group, with g ``[R, O]`` the loss's gradients at the layer output
and ā ``[R, D]`` the homogeneous inputs. So the K-FAC direction

    G⁻¹ ∇M A⁻¹ = (G⁻¹ gᵀ)(ā A⁻¹)      costs R(O² + D² + OD) multiply-adds instead of OD(O + D),

fewer whenever the batch is small next to the layer (batch 250 on a 1000×785 layer: 0.6 G
against 1.4 G). It is exact only if ``.grad`` *is* that product, which holds when, at
``step()``, all of the following were observed:

* the gradient came from one ``opt.backward(loss, output)`` (no DDP reduction) into
  parameters that had no gradient before (no accumulation over several backwards);
* the loss's graph reaches each of the layer's parameters through exactly one edge (the layer's
  single call; a regulariser or a second use adds edges), the layer's captured output is a node
  of that graph, and neither the parameters nor the module carry backward hooks that could
  change a gradient;
* the ``.grad`` tensors are the ones that backward left, unmodified (same object, same version
  counter: clipping in place or reassigning disqualifies), and the layer's weight decay is 0;
* the layer's input and output gradient are in its parameters' dtype (under ``torch.autocast``
  ``.grad`` is a low-precision product that gᵀā recomputed in float32 would not reproduce).

Otherwise that layer's ``.grad`` is preconditioned as usual. :func:`record_backward` runs around
the backward and :meth:`FactorRecord.rows` at the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor, nn

from ..layers.base import LayerAdapter


def factored_cost_is_lower(rows: int, out: int, width: int, inputs_known: bool = False) -> bool:
    """R(O² + D² + OD) < OD(O + D): the factored product is the cheaper one. With
    ``inputs_known`` (ā times the right factor already computed elsewhere) R(O² + OD)."""
    per_row = out * out + out * width + (0 if inputs_known else width * width)
    return rows * per_row < out * width * (out + width)


CostCheck = Callable[[LayerAdapter, Tensor, int], bool]  # (adapter, its input h, rows R) -> cheaper?


def graph_of(loss: Tensor) -> tuple[set, dict[int, int]]:
    """The nodes of ``loss``'s backward graph and, per leaf tensor (by id), the number of graph
    edges into its gradient accumulator (= the number of uses of that leaf in the graph)."""
    nodes: set = set()
    uses: dict[int, int] = {}
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    nodes.update(stack)
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is None:
                continue
            leaf = getattr(child, "variable", None)
            if leaf is not None:
                uses[id(leaf)] = uses.get(id(leaf), 0) + 1
            if child not in nodes:
                nodes.add(child)
                stack.append(child)
    return nodes, uses


def _has_hooks(module: nn.Module, params: list[Tensor]) -> bool:
    return bool(module._backward_hooks or module._backward_pre_hooks) or any(
        p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in params
    )


@dataclass
class FactorRecord:
    """What one ``opt.backward`` left for the layers whose ``.grad`` is exactly gᵀā."""

    adapters: dict[int, LayerAdapter]
    params: dict[int, list[Tensor]]
    inputs: dict[int, Tensor]  # h [N, *, in] as the module received it
    grads: dict[int, Tensor]  # ∂loss/∂output, the module output's shape (cheaper layers only)
    marks: dict[int, list[tuple[Tensor, int]]]  # (.grad, its version) right after the backward

    def rows(self, weight_decay_of: Callable[[int], float]) -> dict[int, tuple[Tensor, Tensor]]:
        """Per recorded layer still exact: (g ``[G, R, O]``, ā ``[G, R, D]``)."""
        out = {}
        for i, adapter in self.adapters.items():
            if weight_decay_of(i) != 0 or not _unchanged(self.params[i], self.marks[i]):
                continue
            g, o, d = adapter.matrix_shape
            grads = adapter.output_grads(self.grads[i])  # [N, T, G, O]
            inputs = adapter.homogeneous(adapter.layer_inputs(self.inputs[i]))  # [N, T, G, D]
            out[i] = (grads.reshape(-1, g, o).transpose(0, 1), inputs.reshape(-1, g, d).transpose(0, 1))
        return out


def _marks(params: list[Tensor]) -> list[tuple[Tensor, int]] | None:
    """Each ``.grad`` with its version counter (the reference keeps the object alive, so an
    identity check cannot be fooled by a new tensor at a freed address)."""
    if any(p.grad is None for p in params):
        return None
    return [(p.grad, p.grad._version) for p in params]


def _unchanged(params: list[Tensor], marks: list[tuple[Tensor, int]]) -> bool:
    return all(p.grad is grad and p.grad._version == version for p, (grad, version) in zip(params, marks))


def record_backward(
    backward: Callable[[], object],
    loss: Tensor,
    adapters: dict[int, LayerAdapter],
    params: dict[int, list[Tensor]],
    capture,
    is_cheaper: CostCheck,
) -> tuple[object, FactorRecord]:
    """Run ``backward()`` (the loss's backward, with ``capture`` recording the adapter layers'
    inputs and output gradients) and return its result with the record of the layers whose
    gradient it leaves exactly factored and for which ``is_cheaper`` says that form costs less
    (e.g. by :func:`factored_cost_is_lower`)."""
    fresh = {i: all(p.grad is None for p in params[i]) for i in adapters}
    nodes, uses = graph_of(loss) if any(fresh.values()) else (set(), {})
    candidates = {}
    for i, adapter in adapters.items():
        output = capture.outputs.get(adapter.name)
        if (
            fresh[i]
            and output is not None
            and output.grad_fn in nodes
            and all(uses.get(id(p)) == 1 for p in params[i])
            and not _has_hooks(adapter.module, params[i])
        ):
            candidates[i] = adapter
    result = backward()
    record = FactorRecord({}, {}, {}, {}, {})
    for i, adapter in candidates.items():
        grad = capture.grad_outputs.get(adapter.name)
        marks = _marks(params[i])
        if grad is None or marks is None:
            continue
        dtype = params[i][0].dtype
        if grad.dtype != dtype or capture.inputs[adapter.name].dtype != dtype:
            continue
        rows = grad.numel() // adapter.out_features  # N·T
        if not is_cheaper(adapter, capture.inputs[adapter.name], rows):
            continue
        record.adapters[i] = adapter
        record.params[i] = params[i]
        record.inputs[i] = capture.inputs[adapter.name]
        record.grads[i] = grad
        record.marks[i] = marks
    return result, record
