"""nn.Conv2d as in KFC (Grosse & Martens 2016): a convolution is a matrix applied to patches.

The input is padded (any padding mode, 'same' included) and unfolded into patches of
``C_in/G · kh · kw`` values per group in the channel-major order of
``weight.view(out, -1)``; every output position t is one use of the group's matrix.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerAdapter


class Conv2dAdapter(LayerAdapter):
    """h ``[N, T, G, C_in/G·kh·kw]`` with T = H_out · W_out; g ``[N, T, G, C_out/G]``."""

    module: nn.Conv2d

    def _groups(self) -> int:
        return self.module.groups

    def layer_inputs(self, inputs: Tensor) -> Tensor:
        conv = self.module
        if inputs.dim() == 3:  # unbatched [C, H, W] is not a batch of examples
            raise ValueError(f"Conv2d {self.name!r} got an unbatched input; add a batch dimension")
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(inputs, conv._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
        n, _, positions = patches.shape
        patches = patches.view(n, self.groups, self.group_in, positions).permute(0, 3, 1, 2)
        return patches

    def output_grads(self, grad_output: Tensor) -> Tensor:
        n = grad_output.shape[0]
        g = grad_output.reshape(n, self.groups, self.group_out, -1)
        return g.permute(0, 3, 1, 2)
