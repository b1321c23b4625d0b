"""The flat parameter vector: which trainable parameters, in which order, grouped by module.

Order is ``model.named_parameters()`` restricted to ``requires_grad=True``, flattened like
``torch.nn.utils.parameters_to_vector``. A module's own parameters are contiguous in it, so
each module owning trainable parameters is one :class:`Block`, a slice of the flat vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Block:
    """One module's trainable parameters: ``flat[start:stop]`` holds ``params`` in order."""

    name: str
    params: tuple[str, ...]
    start: int
    stop: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def size(self) -> int:
        return self.stop - self.start


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def parameter_blocks(model: nn.Module) -> tuple[Block, ...]:
    """Group the trainable parameters by owning module, in flat order."""
    blocks: list[Block] = []
    names: list[str] = []
    owner = None
    start = offset = 0
    for name, param in trainable_parameters(model):
        module_name = name.rpartition(".")[0]
        if names and module_name != owner:
            blocks.append(Block(owner, tuple(names), start, offset))
            names, start = [], offset
        owner = module_name
        names.append(name)
        offset += param.numel()
    if names:
        blocks.append(Block(owner, tuple(names), start, offset))
    if not blocks:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    return tuple(blocks)


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise TypeError(
            f"all trainable parameters must share one dtype and device, found {dtypes} on {devices}"
        )
    dtype = dtypes.pop()
    if not dtype.is_floating_point:
        raise TypeError(f"trainable parameters must be floating point, got {dtype}")
    return dtype, devices.pop()


def check_vector(v: Tensor, size: int, dtype: torch.dtype, name: str = "v") -> None:
    """A flat vector [P] or a matrix of column vectors [P, m] of the Fisher's size."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(v).__name__}")
    if v.dim() not in (1, 2) or v.shape[0] != size:
        raise ValueError(
            f"{name} must have shape [{size}] (or [{size}, m]) in parameters_to_vector order, "
            f"got {tuple(v.shape)}"
        )
    if v.dtype != dtype:
        raise TypeError(f"{name} has dtype {v.dtype}, the Fisher has {dtype}; convert it")
