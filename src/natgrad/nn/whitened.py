"""Whitened layers of Natural Neural Networks (PRONG, Desjardins et al. 2015).

A whitened layer computes ``a = V U (h − μ) + d`` where

* ``V`` (``weight``) and ``d`` (``bias``) are the trainable parameters;
* ``μ`` (buffer ``mean``, shape ``[in]``) and ``U`` (buffer ``whitener``, ``[in, in]``) are
  estimated from training inputs by :func:`natgrad.nn.reparametrize`, never trained.

Its canonical equivalent is the ordinary layer ``a = W h + b`` with ``W = V U`` and
``b = d − W μ`` (:meth:`WhitenedLinear.canonical`). A layer without bias cannot absorb the
centring, so it is whitened without centring: its ``mean`` stays 0 and ``U`` whitens the
uncentred second moment ``E[h hᵀ]``.

For a convolution, ``U`` acts on the input channels (every spatial position is a sample) and
the centring is applied to the *padded* input, so the padded zeros are shifted by ``−μ`` like
every other value: the layer is ``conv(pad(x) − μ, V ·_in U) + d`` and at the borders too it
computes exactly the canonical ``conv(pad(x), W) + b``. Both are evaluated with the kernel
``W = V ·_in U`` and bias ``b = d − Σ_taps W μ`` folded (the same function of ``V`` and ``d``,
hence the same gradients).

Both layers get natgrad layer adapters (:mod:`natgrad.nn.adapters`, registered on import of
:mod:`natgrad.nn`), so every Fisher structure —
``kfac``, ``ekfac``, ``kron_sum`` included — and natgrad's optimizers handle them exactly, in
the parameters ``V``, ``d``: K-FAC's input factor of a whitened layer is ``E[[h_e; 1][h_e; 1]ᵀ]``
with ``h_e = U (h − μ)``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

if TYPE_CHECKING:
    from .whitening import Whitening

__all__ = ["WhitenedLinear", "WhitenedConv2d", "WhitenedLayer"]


def _copy_parameters(source: nn.Module, target: nn.Module, weight: Tensor, bias: Tensor | None):
    """``target`` with ``weight``/``bias`` copied in, their requires_grad and ``source``'s mode."""
    with torch.no_grad():
        target.weight.copy_(weight)
        target.weight.requires_grad_(source.weight.requires_grad)
        if bias is not None:
            target.bias.copy_(bias)
            target.bias.requires_grad_(source.bias.requires_grad)
    target.train(source.training)
    return target


class WhitenedLayer(nn.Module):
    """Shared machinery: ``weight`` (V), ``bias`` (d or None), buffers ``mean`` and ``whitener``.

    Subclasses define :meth:`_apply_in` (multiply a weight-shaped tensor by a matrix on its
    input index) and :meth:`_tap_sum` (a weight-shaped tensor summed over kernel taps, ``[out, in]``).
    """

    weight: Tensor
    bias: Tensor | None
    mean: Tensor
    whitener: Tensor

    def _init_whitening(self, features: int, device, dtype) -> None:
        self.register_buffer("mean", torch.zeros(features, device=device, dtype=dtype))
        self.register_buffer("whitener", torch.eye(features, device=device, dtype=dtype))

    # ------------------------------------------------------------------ structure
    @property
    def centred(self) -> bool:
        """Whether the layer subtracts its input mean (only layers with a bias do)."""
        return self.bias is not None

    @property
    def whitened_features(self) -> int:
        return self.whitener.shape[0]

    @staticmethod
    def _apply_in(weight: Tensor, matrix: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _tap_sum(weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def layer_rows(self, inputs: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The layer's input as samples ``[rows, in]`` (the vectors ``h`` that ``U`` whitens)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ maths
    _fold: tuple[Tensor, Tensor | None] | None = None  # set only inside fixed_fold()

    def _folded(self) -> tuple[Tensor, Tensor | None]:
        """(W, b) with W = V U and b = d − Σ_taps W μ, differentiable in V and d (the fixed
        fold inside :meth:`fixed_fold`)."""
        if self._fold is not None:
            return self._fold
        weight = self._apply_in(self.weight, self.whitener)
        if self.bias is None:
            return weight, None
        return weight, self.bias - self._tap_sum(weight) @ self.mean

    @contextmanager
    def fixed_fold(self) -> Iterator[Tensor]:
        """Within the block the forward uses one ``(W, b)``, folded on entry without gradient:
        for passes that change neither parameters nor buffers, such as the statistics pass of
        a reparametrization, whose change of coordinates then starts from this ``W = V U``."""
        with torch.no_grad():
            self._fold = self._folded()
        try:
            yield self._fold[0]
        finally:
            self._fold = None

    @torch.no_grad()
    def canonical(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
        """The ordinary layer's ``(W, b)``: ``W = V U``, ``b = d − W μ`` (computed in float64,
        returned in ``dtype``, default the layer's). ``b`` is None for a layer without bias."""
        dtype = dtype or self.weight.dtype
        v, u, mu = self.weight.double(), self.whitener.double(), self.mean.double()
        w = self._apply_in(v, u)
        b = None if self.bias is None else self.bias.double() - self._tap_sum(w) @ mu
        return w.to(dtype), None if b is None else b.to(dtype)

    def change_coordinates(
        self, weight: Tensor, bias: Tensor | None, old: tuple[Tensor, Tensor], new: Whitening,
        folded: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Map ``(V, d)`` from the whitening ``old = (μ_old, U_old)`` to ``new`` so that
        ``V U (h − μ) + d`` is unchanged: ``V' = V U_old U_new⁻¹`` (``U_new⁻¹`` from ``new``'s
        eigendecomposition, never inverted) and ``d' = d + Σ_taps V U_old (μ_new − μ_old)``, in
        ``new``'s dtype. The map is linear in ``(V, d)``, so it also maps parameter
        displacements (momentum buffers). ``folded``: ``V U_old`` if already at hand in that dtype."""
        dtype = new.dtype
        mu_old, u_old = (t.to(dtype) for t in old)
        v = weight.to(dtype)
        if folded is None or folded.dtype != dtype:
            folded = self._apply_in(v, u_old)
        v_new = new.times_inverse(folded)
        if bias is None:
            return v_new, None
        d_new = bias.to(dtype) + self._tap_sum(v) @ (u_old @ (new.mean - mu_old))
        return v_new, d_new

    @torch.no_grad()
    def set_whitening(self, whitening: Whitening, folded: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Install the new statistics ``μ``, ``U`` of ``whitening`` and change ``V``, ``d`` so
        that the layer computes the same function (``folded``: the current ``V U`` if at hand).
        Returns the previous ``(μ, U)`` in the whitening's dtype."""
        n = self.whitened_features
        if tuple(whitening.mean.shape) != (n,):
            raise ValueError(f"the whitening must be of {n} features, got a mean of shape {tuple(whitening.mean.shape)}")
        if not self.centred and bool((whitening.mean != 0).any()):
            raise ValueError("a layer without bias cannot absorb a centring: its mean must stay 0")
        old = (self.mean.to(whitening.dtype).clone(), self.whitener.to(whitening.dtype).clone())
        v, d = self.change_coordinates(self.weight, self.bias, old, whitening, folded)
        self.weight.copy_(v)
        if d is not None:
            self.bias.copy_(d)
        self.mean.copy_(whitening.mean)
        self.whitener.copy_(whitening.whitener())
        return old

    @torch.no_grad()
    def whiten_inputs(self, inputs: Tensor) -> Tensor:
        """``h_e = U (h − μ)`` for the layer's input rows ``[rows, in]`` (float64)."""
        rows = self.layer_rows(inputs).double()
        return (rows - self.mean.double()) @ self.whitener.double().T


class WhitenedLinear(WhitenedLayer):
    """``y = V U (x − μ) + d`` over the last dimension of ``x`` (like ``nn.Linear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        self._init_whitening(in_features, device, self.weight.dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation of V and d (whitening left as it is)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @staticmethod
    def _apply_in(weight: Tensor, matrix: Tensor) -> Tensor:
        return weight @ matrix

    @staticmethod
    def _tap_sum(weight: Tensor) -> Tensor:
        return weight

    def layer_rows(self, inputs: Tensor) -> Tensor:
        return inputs.reshape(-1, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // max(self.in_features, 1)
        if self._fold is None and rows <= self.out_features:
            # h_e = U (x − μ), then V h_e + d: cheaper than forming V U when the batch is small
            centred = x - self.mean if self.centred else x
            return F.linear(F.linear(centred, self.whitener), self.weight, self.bias)
        weight, bias = self._folded()
        return F.linear(x, weight, bias)

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> "WhitenedLinear":
        """The whitened layer (U = I, μ = 0) computing exactly what ``layer`` computes."""
        weight = layer.weight
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None,
                  device=weight.device, dtype=weight.dtype)
        return _copy_parameters(layer, new, layer.weight, layer.bias)

    def to_linear(self) -> nn.Linear:
        """The ordinary ``nn.Linear`` with ``W = V U``, ``b = d − W μ``."""
        w, b = self.canonical()
        layer = nn.Linear(self.in_features, self.out_features, bias=b is not None,
                          device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.weight.requires_grad_(self.weight.requires_grad)
            if b is not None:
                layer.bias.copy_(b)
                layer.bias.requires_grad_(self.bias.requires_grad)
        layer.train(self.training)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class WhitenedConv2d(WhitenedLayer):
    """``y = conv(pad(x) − μ, V ·_in U) + d``: a 2-D convolution whose input channels are whitened.

    Same arguments as ``nn.Conv2d``; ``groups`` must be 1 and ``padding_mode`` ``"zeros"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__()
        label = f"convolution {name!r}" if name else "WhitenedConv2d"
        if groups != 1:
            raise NotImplementedError(
                f"{label}: grouped convolutions (groups={groups}) are not supported by PRONG whitening, "
                "which whitens all input channels jointly; only groups=1"
            )
        if padding_mode != "zeros":
            raise NotImplementedError(
                f"{label}: padding_mode={padding_mode!r} is not supported; only padding_mode='zeros'"
            )
        kw = {"device": device, "dtype": dtype}
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"invalid padding string {padding!r}, should be one of ('valid', 'same')")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding)
        self.groups = 1
        self.padding_mode = "zeros"
        self._reversed_padding_repeated_twice = self._explicit_padding()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **kw))
        else:
            self.register_parameter("bias", None)
        self._init_whitening(in_channels, device, self.weight.dtype)
        self.reset_parameters()

    def _explicit_padding(self) -> list[int]:
        """``F.pad`` amounts ``[left_w, right_w, top_h, bottom_h]`` (as ``nn.Conv2d`` computes them)."""
        if self.padding == "valid":
            return [0, 0, 0, 0]
        if self.padding == "same":
            out = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return out
        return [p for p in reversed(self.padding) for _ in range(2)]

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation of V and d (whitening left as it is)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            if fan_in:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    @staticmethod
    def _apply_in(weight: Tensor, matrix: Tensor) -> Tensor:
        return torch.einsum("oikl,ij->ojkl", weight, matrix)

    @staticmethod
    def _tap_sum(weight: Tensor) -> Tensor:
        return weight.sum(dim=(2, 3))

    def layer_rows(self, inputs: Tensor) -> Tensor:
        if inputs.dim() == 3:  # unbatched [C, H, W]
            inputs = inputs.unsqueeze(0)
        return inputs.movedim(1, -1).reshape(-1, self.in_channels)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self._folded()
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, 1)

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, name: str | None = None) -> "WhitenedConv2d":
        """The whitened layer (U = I, μ = 0) computing exactly what ``layer`` computes."""
        weight = layer.weight
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                  device=weight.device, dtype=weight.dtype, name=name)
        return _copy_parameters(layer, new, layer.weight, layer.bias)

    def to_conv(self) -> nn.Conv2d:
        """The ordinary ``nn.Conv2d`` with kernel ``W = V ·_in U`` and ``b = d − Σ_taps W μ``."""
        w, b = self.canonical()
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, 1, b is not None, "zeros", device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.weight.requires_grad_(self.weight.requires_grad)
            if b is not None:
                layer.bias.copy_(b)
                layer.bias.requires_grad_(self.bias.requires_grad)
        layer.train(self.training)
        return layer

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s
