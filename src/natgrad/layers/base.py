"""Per-layer math shared by all layers of the form a = W h + b (Linear, Conv2d, ...).

An adapter sees a layer as ``G`` independent weight matrices (``G`` = groups, 1 for Linear) of
shape ``[O, D]``, where ``D`` counts the bias as a homogeneous input coordinate: the joint matrix
is ``[W | b]`` and the input ``ā = [h; 1]``. A layer call is ``T`` applications of that matrix
(``T`` = spatial positions of a convolution, extra leading dimensions of a Linear), so:

* :meth:`layer_inputs` maps the captured module input to h of shape ``[N, T, G, D_in]``, and
  :meth:`homogeneous` appends the bias coordinate: ``ā = [h; 1]`` of shape ``[N, T, G, D]``
  (kept apart because odd widths such as 785 make matrix products several times slower);
* :meth:`output_grads` maps ∂(·)/∂output to ``g`` of shape ``[N, T, G, O]``;
* the per-example gradient of the joint matrix is ``Γ_n = Σ_t g_nt ā_ntᵀ`` (``[G, O, D]``);
* :meth:`to_matrix` / :meth:`from_matrix` convert between the layer's slice of the flat
  parameter vector (weight row-major, then bias) and the joint ``[G, O, D]`` layout.

A new layer type subclasses this and implements the two capture maps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class LayerAdapter(ABC):
    """Base class of the per-layer adapters; see the module docstring for the shapes."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name
        self.has_bias = getattr(module, "bias", None) is not None and module.bias.requires_grad
        self.groups = self._groups()
        weight = module.weight
        self.out_features = weight.shape[0]
        self.weight_numel = weight.numel()
        self.group_out = self.out_features // self.groups
        self.group_in = self.weight_numel // self.out_features  # inputs per row of W
        self.size = self.weight_numel + (self.out_features if self.has_bias else 0)

    def _groups(self) -> int:
        return 1

    @property
    def matrix_shape(self) -> tuple[int, int, int]:
        """``(G, O, D)`` of the joint matrix, D including the bias column."""
        return self.groups, self.group_out, self.group_in + int(self.has_bias)

    @abstractmethod
    def layer_inputs(self, inputs: Tensor) -> Tensor:
        """h ``[N, T, G, D_in]`` from the module's input (without the bias coordinate)."""

    @abstractmethod
    def output_grads(self, grad_output: Tensor) -> Tensor:
        """g ``[N, T, G, O]`` from a gradient with the shape of the module's output."""

    def homogeneous(self, x: Tensor) -> Tensor:
        """ā = [h; 1] when the layer has a bias, else h."""
        if not self.has_bias:
            return x
        return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)

    def to_matrix(self, flat: Tensor) -> Tensor:
        """``[..., size]`` (weight row-major, then bias) -> ``[..., G, O, D]``."""
        lead = flat.shape[:-1]
        g, o, d_in = self.groups, self.group_out, self.group_in
        weight = flat[..., : self.weight_numel].reshape(*lead, g, o, d_in)
        if not self.has_bias:
            return weight
        bias = flat[..., self.weight_numel :].reshape(*lead, g, o, 1)
        return torch.cat([weight, bias], dim=-1)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """``[..., G, O, D]`` -> ``[..., size]``, the inverse of :meth:`to_matrix`."""
        lead = matrix.shape[:-3]
        weight = matrix[..., : self.group_in].reshape(*lead, self.weight_numel)
        if not self.has_bias:
            return weight
        bias = matrix[..., self.group_in].reshape(*lead, self.out_features)
        return torch.cat([weight, bias], dim=-1)

    def per_example_gradients(self, inputs: Tensor, grads: Tensor) -> Tensor:
        """Γ_nk = Σ_t g_nkt ā_ntᵀ flattened: ā [N, T, G, D], g [N, K, T, G, O] -> [N, K, size]."""
        return self.from_matrix(torch.einsum("ntgd,nktgo->nkgod", inputs, grads))

    def flat_index(self) -> Tensor:
        """Position in the flat slice of each entry of the joint matrix, shape ``[G*O*D]``."""
        positions = torch.arange(self.size, dtype=torch.float64)
        return self.to_matrix(positions).reshape(-1).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
