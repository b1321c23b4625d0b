"""nn.Linear: a = W h + b on inputs ``[N, *, in]``; every leading position is one use of W."""

from __future__ import annotations

from torch import Tensor

from .base import LayerAdapter


class LinearAdapter(LayerAdapter):
    """h ``[N, T, 1, in]`` with T the product of the extra leading dimensions (1 if none)."""

    def layer_inputs(self, inputs: Tensor) -> Tensor:
        x = inputs.reshape(inputs.shape[0], -1, 1, inputs.shape[-1])
        return x

    def output_grads(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(grad_output.shape[0], -1, 1, grad_output.shape[-1])
