"""One batch through the model: the layer inputs ā and output-gradients g of every adapter
layer for the estimator's K back-propagated vectors, and per-example gradients of the other
(generic) modules. This is the only place where natgrad runs the model to build statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .capture import LayerCapture
from .data import cyclic_rows, run_model
from .errors import UnsupportedLayerError
from .estimators import backprop_vectors
from .functional import per_example_gradients
from .layers import adapter_for
from .layers.base import LayerAdapter
from .layout import Block
from .likelihoods import Likelihood
from .linearized import batched_vjp


def _shared_parameter_owners(model: nn.Module) -> set[str]:
    """Names of modules that hold a parameter object also held by another module."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    return {name for names in owners.values() if len(set(names)) > 1 for name in names}


@dataclass
class LayerData:
    """One adapter layer on one batch: ``raw_inputs`` h [N, T, G, D_in], ``grads`` g [N, K, T, G, O].

    ``inputs`` is ā = [h; 1] [N, T, G, D] (formed on first use).
    """

    adapter: LayerAdapter
    raw_inputs: Tensor
    grads: Tensor
    _inputs: Tensor | None = field(default=None, repr=False)

    @property
    def inputs(self) -> Tensor:
        if self._inputs is None:
            self._inputs = self.adapter.homogeneous(self.raw_inputs)
        return self._inputs

    @property
    def simple(self) -> bool:
        """One position and one group (a Linear on [N, in]): the factored fast paths apply."""
        return self.raw_inputs.shape[1] == 1 and self.raw_inputs.shape[2] == 1

    def per_example(self) -> Tensor:
        return self.adapter.per_example_gradients(self.inputs, self.grads)


@dataclass
class BatchData:
    """Everything one batch contributes; ``examples`` is its N."""

    examples: int
    layers: dict[int, LayerData]
    generic: dict[int, Tensor]  # block index -> per-example gradients [N, K, size]
    _cache: dict[int, Tensor] = field(default_factory=dict)

    def rows(self, start: int, count: int) -> BatchData:
        """The same statistics restricted to ``count`` consecutive examples from ``start``,
        wrapping around the end of the batch (views unless they wrap)."""
        if count >= self.examples:
            return self

        def take(x: Tensor) -> Tensor:
            return cyclic_rows(x, start, count)

        layers = {i: LayerData(d.adapter, take(d.raw_inputs), take(d.grads)) for i, d in self.layers.items()}
        return BatchData(count, layers, {i: take(g) for i, g in self.generic.items()})

    def per_example(self, index: int) -> Tensor:
        """Per-example gradients [N, K, size] of block ``index`` (materialised, cached)."""
        if index in self.generic:
            return self.generic[index]
        if index not in self._cache:
            self._cache[index] = self.layers[index].per_example()
        return self._cache[index]


class Collector:
    """Runs batches through ``model``.

    ``kronecker`` demands an adapter for every block; ``single_call`` (default: ``kronecker``)
    makes a layer called other than once per forward an error instead of handing it to the
    generic per-example path; ``generic=False`` skips the generic per-example gradients.
    ``dtype``: the layers' inputs and output gradients are kept in it (the parameters' dtype:
    under ``torch.autocast`` the activations are bfloat16/float16, the statistics must not be).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: tuple[Block, ...],
        likelihood: Likelihood,
        estimator: str,
        samples: int,
        structure: str,
        kronecker: bool,
        generic: bool = True,
        single_call: bool | None = None,
        *,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.dtype = dtype
        self.blocks = blocks
        self.likelihood = likelihood
        self.estimator = estimator
        self.samples = samples
        self.structure = structure
        self.kronecker = kronecker
        self.generic = generic
        self.single_call = kronecker if single_call is None else single_call
        self.adapters: dict[int, LayerAdapter] = {}
        self._checked_calls = False
        shared = _shared_parameter_owners(model)
        for i, block in enumerate(blocks):
            module = model.get_submodule(block.name)
            adapter = adapter_for(module, block.name)
            if adapter is not None and (block.name in shared or adapter.size != block.size):
                if kronecker:
                    self._unsupported(block.name, "shares a parameter with another module (tied weights)")
                adapter = None
            if adapter is not None:
                self.adapters[i] = adapter
            elif kronecker:
                self._unsupported(block.name, f"{type(module).__name__} has no layer adapter")

    def _unsupported(self, name: str, why: str) -> None:
        raise UnsupportedLayerError(
            f"structure {self.structure!r} needs a Kronecker-factored layer, but module "
            f"{name or '<model>'!r}: {why}. Use structure 'dense', 'block_diagonal', 'diagonal' "
            "or 'implicit' (they handle any module), or register an adapter with "
            "natgrad.layers.register_layer"
        )

    def batch(self, inputs: Tensor, targets: Tensor | None) -> BatchData:
        modules = {a.module: a.name for a in self.adapters.values()}
        capture = self._forward(modules, inputs, copy_outputs=False)
        if capture.modified_in_place():
            capture = self._forward(modules, inputs, copy_outputs=True)
        output = capture.model_output
        self.likelihood.check_output(output)
        if targets is not None:  # also where unused (exact, mc): labels that do not fit are a mistake
            self.likelihood.check_target(output, targets)
        vectors = backprop_vectors(self.likelihood, self.estimator, output.to(self.dtype), targets, self.samples)
        return self.from_capture(capture, inputs, output, vectors)

    def from_capture(
        self,
        capture: LayerCapture,
        inputs: Tensor,
        output: Tensor,
        vectors: list[Tensor],
        retain_graph: bool = False,
    ) -> BatchData:
        """BatchData of a finished forward pass: back-propagates ``vectors`` [N, *out] from ``output``
        (keeping the graph afterwards if ``retain_graph``)."""
        self._check_calls(capture)
        layers = self._layer_data(capture, output, vectors, retain_graph)
        generic = self._generic_data(inputs, vectors) if self.generic else {}
        return BatchData(inputs.shape[0], layers, generic)

    def _forward(self, modules: dict, inputs: Tensor, copy_outputs: bool) -> LayerCapture:
        with LayerCapture(modules, copy_outputs=copy_outputs) as capture:
            output = run_model(self.model, inputs)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"the model must return a tensor of outputs, got {type(output).__name__}; "
                "wrap it so that it returns the logits/means"
            )
        capture.model_output = output
        return capture

    def _check_calls(self, capture: LayerCapture) -> None:
        for i, adapter in list(self.adapters.items()):
            calls = capture.calls.get(adapter.name, 0)
            if calls == 1:
                continue
            why = (
                f"was called {calls} times in one forward pass (weight sharing)"
                if calls
                else "was not called in the forward pass"
            )
            if self.single_call:
                self._unsupported(adapter.name, why)
            if self._checked_calls:
                raise ValueError(f"module {adapter.name!r} {why} in this batch but not in the first")
            del self.adapters[i]  # handled exactly by the generic per-example path instead
        self._checked_calls = True

    def _layer_data(
        self, capture: LayerCapture, output: Tensor, vectors: list[Tensor], retain_graph: bool
    ) -> dict[int, LayerData]:
        if not self.adapters:
            return {}
        order = list(self.adapters.items())
        nodes = [capture.outputs[a.name] for _, a in order]
        grads = batched_vjp(output, nodes, vectors, retain_graph)  # per node [K, *node.shape]
        k, n = len(vectors), output.shape[0]
        layers = {}
        for (i, adapter), node, grad in zip(order, nodes, grads):
            g = adapter.output_grads(grad.reshape(k * n, *node.shape[1:]).to(self.dtype))
            # [K, N, T, G, O] seen as [N, K, T, G, O] (a view: no copy)
            inputs = adapter.layer_inputs(capture.inputs[adapter.name].to(self.dtype))
            layers[i] = LayerData(adapter, inputs, g.unflatten(0, (k, n)).transpose(0, 1))
        return layers

    def _generic_data(self, inputs: Tensor, vectors: list[Tensor]) -> dict[int, Tensor]:
        generic = [i for i in range(len(self.blocks)) if i not in self.adapters]
        if not generic:
            return {}
        names = [n for i in generic for n in self.blocks[i].params]
        grads = per_example_gradients(self.model, inputs, vectors, names)
        n, k = inputs.shape[0], len(vectors)
        return {
            i: torch.cat([grads[name].reshape(n, k, -1) for name in self.blocks[i].params], dim=2)
            for i in generic
        }
