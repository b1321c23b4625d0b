"""Turn the ``data`` argument of :func:`natgrad.fisher` into validated ``(inputs, targets)`` batches.

Accepted: an ``(inputs, targets)`` pair of tensors (one batch), inputs alone (a tensor, for the
estimators that need no labels), or an iterable of batches such as a DataLoader yielding
``(inputs, targets)`` pairs or input tensors.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

Batch = tuple[Tensor, "Tensor | None"]


def iter_batches(
    data: object, *, need_targets: bool, dtype: torch.dtype, device: torch.device
) -> Iterator[Batch]:
    """Yield ``(inputs, targets or None)`` on ``device``; raise on malformed or empty data."""
    if isinstance(data, Tensor) or (isinstance(data, (tuple, list)) and _is_pair(data)):
        batches: Iterable[object] = [data]
    elif isinstance(data, (str, bytes, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be an (inputs, targets) pair of tensors, an inputs tensor, or an "
            f"iterable of batches such as a DataLoader; got {type(data).__name__}"
        )
    else:
        batches = data
    count = 0
    for batch in batches:
        inputs, targets = _split(batch)
        _check(inputs, targets, need_targets=need_targets, dtype=dtype)
        if inputs.shape[0] == 0:
            continue
        count += 1
        targets = None if targets is None else targets.to(device)
        yield inputs.detach().to(device), targets
    if count == 0:
        raise ValueError("data is empty: it yielded no examples")


def all_finite(tensor: Tensor) -> bool:
    """No inf/NaN in ``tensor``: a finite sum says so in one pass without a mask; otherwise look
    element-wise (a sum of finite values can overflow)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def cyclic_rows(x: Tensor, start: int, count: int) -> Tensor:
    """``count`` ≤ N consecutive rows of ``x`` [N, ...] from ``start`` (mod N), wrapping around the
    end (a view unless they wrap)."""
    start %= x.shape[0]
    end = start + count
    if end <= x.shape[0]:
        return x[start:end]
    return torch.cat([x[start:], x[: end - x.shape[0]]])


def run_model(model: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``model(*args)``, with a failure of the model on these inputs (wrong feature size or
    dtype, ...) reported as the ValueError of bad data it is, torch's message attached."""
    try:
        return model(*args)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        inputs = args[-1]
        raise ValueError(
            f"the model failed on inputs of shape {tuple(inputs.shape)} and dtype {inputs.dtype}: "
            f"{exc}. Check that the data fit the model (feature sizes, dtype)"
        ) from exc


def _is_pair(data: tuple | list) -> bool:
    return len(data) == 2 and all(isinstance(t, Tensor) for t in data)


def _split(batch: object) -> Batch:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2 and all(
        isinstance(t, Tensor) for t in batch
    ):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise TypeError(
        "each batch must be an inputs tensor or an (inputs, targets) pair of tensors, got "
        f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _check(inputs: Tensor, targets: Tensor | None, *, need_targets: bool, dtype: torch.dtype) -> None:
    if inputs.dim() == 0:
        raise ValueError("inputs must have a batch dimension, got a scalar tensor")
    if need_targets and targets is None:
        raise ValueError(
            "the empirical Fisher needs targets: pass (inputs, targets), or use "
            "estimator='exact' or 'mc', which need no labels"
        )
    if targets is not None and targets.shape[:1] != inputs.shape[:1]:
        raise ValueError(
            f"inputs and targets disagree on the number of examples: {inputs.shape[0]} inputs, "
            f"{targets.shape[0] if targets.dim() else 'scalar'} targets"
        )
    if inputs.is_floating_point():
        if inputs.dtype != dtype:
            raise TypeError(
                f"inputs are {inputs.dtype} but the model is {dtype}; convert one of them "
                f"(e.g. inputs.to({dtype}) or model.to({inputs.dtype}))"
            )
        if not all_finite(inputs):
            raise ValueError(
                "inputs contain NaN or Inf; remove or replace those examples (e.g. with "
                "torch.nan_to_num) before computing the Fisher"
            )
