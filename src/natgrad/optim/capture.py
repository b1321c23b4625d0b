"""Hooks that live as long as an optimizer: capture the user's own forward and backward.

On statistics steps the forward hooks keep each adapter layer's input and output node (as
:class:`natgrad.capture.LayerCapture` does for one call) and, for the empirical Fisher, a
tensor hook on the output stores ∂loss/∂output when the user's ``loss.backward()`` runs —
tensor hooks see the gradient of the value at registration, so a later in-place operation
does not disturb them. A pre-hook on the model records its inputs (for the structures that need
a functional re-evaluation, and, with ``record_inputs``, on every forward for the quadratic
model's replay of a subset of rows), whether they were its only argument and the autocast state
the forward ran under, and starts a fresh count of calls per forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..capture import LayerCapture


class TrainingCapture(LayerCapture):
    """Persistent capture; ``active`` switches recording on for the next forward passes."""

    def __init__(self, model: nn.Module, modules: dict[nn.Module, str]) -> None:
        super().__init__(modules)
        self.model = model
        self.active = False
        self.record_grads = False
        self.record_inputs = False
        self.grad_outputs: dict[str, Tensor] = {}
        self.model_inputs: Tensor | None = None
        self.single_input = False  # model_inputs was the forward's only argument
        self.autocast: torch.dtype | None = None  # the autocast dtype of the forward, if enabled
        self.__enter__()
        self.root_grad: Tensor | None = None
        try:
            self._handles.append(model.register_forward_pre_hook(self._start, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._finish))
        except BaseException:
            self.remove()
            raise

    def _start(self, module: nn.Module, inputs: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            return
        if self.active:
            self.clear()
        if self.active or self.record_inputs:
            first = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
            self.model_inputs = first
            self.single_input = first is not None and len(inputs) == 1 and not kwargs
            device = first.device.type if first is not None else "cpu"
            self.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

    def _finish(self, module: nn.Module, inputs: tuple, output: object) -> None:
        if self.active and self.record_grads and torch.is_grad_enabled():
            if isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(lambda grad: setattr(self, "root_grad", grad.detach()))

    def clear(self) -> None:
        self.calls.clear()
        self.inputs.clear()
        self.outputs.clear()
        self._versions.clear()
        self.grad_outputs.clear()
        self.model_inputs = None
        self.single_input = False
        self.autocast = None
        self.root_grad = None

    def _hook(self, name: str):
        record = super()._hook(name)

        def hook(module: nn.Module, inputs: tuple, output: Tensor):
            if not (self.active and torch.is_grad_enabled()):
                return None
            record(module, inputs, output)
            if self.record_grads and output.requires_grad:
                output.register_hook(lambda grad: self.grad_outputs.__setitem__(name, grad.detach()))
            return None

        return hook

    def captured(self) -> bool:
        return bool(self.outputs)
