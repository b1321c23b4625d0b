"""The inputs of PRONG's reparametrizations: checking the training data and drawing from it."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

__all__ = ["check_data", "draw_inputs"]


def _first_tensor(batch):
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"data batches must be tensors or (x, y) pairs of tensors, got {type(batch).__name__}")
    return batch


def check_data(data, allow_empty: bool = False):
    """``data`` as a tensor (from a tensor or an ``(x, y, ...)`` tuple) or a re-iterable of
    batches. ``allow_empty``: an empty tensor is accepted (a rank of a process group whose
    shard is empty: the other ranks' inputs are used)."""
    if isinstance(data, tuple) and data and isinstance(data[0], Tensor):
        data = data[0]
    if isinstance(data, Tensor):
        if data.dim() == 0 or (data.shape[0] == 0 and not allow_empty):
            raise ValueError("data is empty: PRONG needs training inputs to estimate the whitening")
        return data
    if isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError("data must be a tensor of training inputs, an (x, y) tuple, or a DataLoader/list of "
                        f"batches, got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError("data must be re-iterable (a DataLoader or a list of batches), not a one-shot "
                        "iterator/generator: PRONG draws inputs from it at every reparametrization")
    return data


def draw_inputs(data, samples: int, generator: torch.Generator, allow_empty: bool = False) -> Tensor:
    """``samples`` rows of ``data``: of a tensor, random rows without replacement (all of them,
    in order, if there are at most ``samples``); of a loader, the first batches of a fresh pass
    concatenated up to ``samples`` rows. ``allow_empty``: no rows give an empty tensor instead
    of a ValueError."""
    if isinstance(data, Tensor):
        n = data.shape[0]
        if samples >= n:
            return data
        index = torch.randperm(n, generator=generator)[:samples]
        return data[index.to(data.device)]
    parts, count = [], 0
    for batch in data:
        x = _first_tensor(batch)
        if x.dim() == 0 or x.shape[0] == 0:
            continue
        parts.append(x[: samples - count])
        count += parts[-1].shape[0]
        if count >= samples:
            break
    if not parts:
        if allow_empty:
            return torch.zeros(0)
        raise ValueError("data yielded no inputs: PRONG needs training inputs to estimate the whitening")
    return torch.cat(parts) if len(parts) > 1 else parts[0]
