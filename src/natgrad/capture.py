"""Capturing layer inputs and outputs during one forward pass, leaving the model as it was.

:class:`LayerCapture` registers forward hooks on the adapter layers, counts calls per module
(a module called twice shares its weights across uses), keeps each layer's input (detached)
and its output tensor (a node of the graph, to differentiate with respect to), and removes
every hook in ``finally``. If a later in-place operation (``ReLU(inplace=True)``) modifies a
captured output, the forward is run again with ``copy_outputs=True``: the hook then hands a copy
downstream so the captured node stays intact.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


class LayerCapture:
    """Context manager; ``modules`` maps each captured module to its name."""

    def __init__(self, modules: dict[nn.Module, str], copy_outputs: bool = False) -> None:
        self.modules = modules
        self.copy_outputs = copy_outputs
        self.calls: dict[str, int] = {}
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles: list = []
        self.model_output: Tensor | None = None

    def __enter__(self) -> "LayerCapture":
        try:
            for module, name in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor):
            self.calls[name] = self.calls.get(name, 0) + 1
            if not isinstance(output, Tensor) or not inputs or not isinstance(inputs[0], Tensor):
                raise TypeError(f"module {name!r} must take and return a tensor to be captured")
            self.inputs[name] = inputs[0].detach()
            self.outputs[name] = output
            self._versions[name] = output._version
            if self.copy_outputs:
                return output.clone()
            return None

        return hook

    def modified_in_place(self) -> bool:
        return any(self.outputs[n]._version != v for n, v in self._versions.items())


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore train/eval modes and requires_grad flags of ``model`` on exit, whatever happens."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for param, flag in flags:
            param.requires_grad_(flag)
