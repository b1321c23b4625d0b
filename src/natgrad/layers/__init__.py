"""Registry of per-layer adapters, dispatched by ``isinstance`` and extensible by users."""

from __future__ import annotations

from torch import nn

from .base import LayerAdapter
from .conv2d import Conv2dAdapter
from .linear import LinearAdapter

_REGISTRY: list[tuple[type[nn.Module], type[LayerAdapter]]] = []


def register_layer(module_type: type[nn.Module], adapter: type[LayerAdapter]) -> None:
    """Use ``adapter`` for modules that are instances of ``module_type`` (latest wins)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not (isinstance(adapter, type) and issubclass(adapter, LayerAdapter)):
        raise TypeError(f"adapter must be a LayerAdapter subclass, got {adapter!r}")
    _REGISTRY.insert(0, (module_type, adapter))


def adapter_for(module: nn.Module, name: str) -> LayerAdapter | None:
    """The adapter for ``module``, or None when it has none or does not fit it.

    A module fits when its trainable parameters are exactly its ``weight`` and optionally its
    ``bias`` (a frozen weight, or extra parameters, leave it to the generic structures) and it
    keeps the registered type's ``forward`` (a subclass computing something else would get
    wrong layer maths silently).
    """
    for module_type, adapter in _REGISTRY:
        if isinstance(module, module_type):
            if type(module).forward is not module_type.forward:
                return None
            trainable = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if "weight" in trainable and trainable <= {"weight", "bias"}:
                return adapter(module, name)
            return None
    return None


register_layer(nn.Linear, LinearAdapter)
register_layer(nn.Conv2d, Conv2dAdapter)

__all__ = ["LayerAdapter", "LinearAdapter", "Conv2dAdapter", "register_layer", "adapter_for"]
