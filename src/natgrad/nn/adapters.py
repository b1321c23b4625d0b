"""natgrad layer adapters of the whitened layers.

With these, every natgrad structure (K-FAC, EKFAC, kron_sum, and the optimizers) handles the
whitened layers exactly: the matrix ``[V | d]`` acts on the whitened input ``[h_e; 1]``,
``h_e = U (h − μ)`` (for a convolution: the patches of ``U (pad(x) − μ)``), so K-FAC's input
factor is ``E[[h_e; 1][h_e; 1]ᵀ]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers import register_layer
from ..layers.conv2d import Conv2dAdapter
from ..layers.linear import LinearAdapter
from .whitened import WhitenedConv2d, WhitenedLinear

__all__ = ["WhitenedLinearAdapter", "WhitenedConv2dAdapter"]


class WhitenedLinearAdapter(LinearAdapter):
    """h_e ``[N, T, 1, in]`` = U (h − μ) from the module input."""

    def layer_inputs(self, inputs: Tensor) -> Tensor:
        layer = self.module
        x = inputs - layer.mean if layer.centred else inputs
        return super().layer_inputs(F.linear(x, layer.whitener))


class WhitenedConv2dAdapter(Conv2dAdapter):
    """Patches ``[N, T, 1, C_in·kh·kw]`` of the whitened padded input U (pad(x) − μ)."""

    def layer_inputs(self, inputs: Tensor) -> Tensor:
        layer = self.module
        if inputs.dim() == 3:
            raise ValueError(f"WhitenedConv2d {self.name!r} got an unbatched input; add a batch dimension")
        x = F.pad(inputs, layer._reversed_padding_repeated_twice)
        if layer.centred:
            x = x - layer.mean[:, None, None]
        x = torch.einsum("ij,njhw->nihw", layer.whitener, x)
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
        n, _, positions = patches.shape
        return patches.view(n, 1, self.group_in, positions).permute(0, 3, 1, 2)


register_layer(WhitenedLinear, WhitenedLinearAdapter)
register_layer(WhitenedConv2d, WhitenedConv2dAdapter)
