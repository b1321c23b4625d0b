"""Hooks that live as long as an optimizer: capture the user's own forward and backward.

On statistics steps the forward hooks keep each adapter layer's input and output node (as
:class:`natgrad.capture.LayerCapture` does for one call) and, for the empirical Fisher, a
tensor hook on the output stores ∂loss/∂output when the user's ``loss.backward()`` runs —
tensor hooks see the gradient of the value at registration, so a later in-place operation
does not disturb them. A pre-hook on the model records its inputs (used only by the
structures that need a functional re-evaluation) and starts a fresh count of calls per forward.
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
        self.grad_outputs: dict[str, Tensor] = {}
        self.model_inputs: Tensor | None = None
        self.__enter__()
        self.root_grad: Tensor | None = None
        try:
            self._handles.append(model.register_forward_pre_hook(self._start))
            self._handles.append(model.register_forward_hook(self._finish))
        except BaseException:
            self.remove()
            raise

    def _start(self, module: nn.Module, inputs: tuple) -> None:
        if self.active and torch.is_grad_enabled():
            self.clear()
            self.model_inputs = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None

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
