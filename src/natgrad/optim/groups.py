"""Parameter groups of the curvature optimizers: validation of the per-group hyper-parameters
(lr, damping, weight_decay) and their values per block or per parameter entry (a mixin)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..linalg import check_damping


def check_lr(lr: float) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    return float(lr)


def check_weight_decay(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {value!r}")
    return float(value)


class ParamGroups:
    """Needs from the optimizer: ``block_params`` (parameters per block), ``param_groups``,
    ``_params()`` (flat order), ``dtype`` and ``device``."""

    def _groups(self, param_groups: list[dict] | None) -> list[dict]:
        """One group of every trainable parameter, or the user's groups once checked."""
        trainable = [p for b in self.block_params for p in b]
        if param_groups is None:
            return [{"params": trainable}]
        ids = {id(p) for p in trainable}
        seen: set[int] = set()
        for group in param_groups:
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError("param_groups must be a list of dicts with a 'params' entry")
            for p in group["params"]:
                if id(p) not in ids:
                    raise ValueError("param_groups contain a parameter that is not a trainable parameter of the model")
                seen.add(id(p))
            if "lr" in group:
                check_lr(group["lr"])
            if "damping" in group:
                check_damping(group["damping"])
            if "weight_decay" in group:
                check_weight_decay(group["weight_decay"])
        if seen != ids:
            raise ValueError("param_groups must cover every trainable parameter of the model exactly once")
        for params in self.block_params:
            owners = {i for i, g in enumerate(param_groups) for p in g["params"] if any(p is q for q in params)}
            if len(owners) > 1:
                raise ValueError("the parameters of one layer (weight and bias) must be in the same param group")
        return param_groups

    def _check_group_values(self) -> None:
        """At every step: the groups' values may have been changed since construction (by hand
        or by an lr scheduler, which may anneal lr to 0 but never below)."""
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
                raise ValueError(f"a param group's lr must be a finite number >= 0 at step(), got {lr!r}")
            check_damping(group["damping"])
            check_weight_decay(group["weight_decay"])

    def _group_of(self, param: Tensor) -> dict:
        for group in self.param_groups:
            if any(param is p for p in group["params"]):
                return group
        raise KeyError("parameter not in any group")

    def _per_param(self, key: str) -> float | Tensor:
        """The groups' ``key`` per parameter entry: a number if all groups agree, else flat [P]."""
        values = {float(g[key]) for g in self.param_groups}
        if len(values) == 1:
            return values.pop()
        return torch.cat([torch.full((p.numel(),), float(self._group_of(p)[key]), dtype=self.dtype, device=self.device) for p in self._params()])

    def _weight_decay_vector(self) -> float | Tensor | None:
        if all(g["weight_decay"] == 0 for g in self.param_groups):
            return None
        return self._per_param("weight_decay")

    def weight_decay_of(self, block_index: int) -> float:
        """η of the group owning block ``block_index``."""
        return float(self._group_of(self.block_params[block_index][0])["weight_decay"])

    def damping_of(self, block_index: int) -> float:
        """λ + η of the group owning block ``block_index``."""
        return float(self._group_of(self.block_params[block_index][0])["damping"]) + self.weight_decay_of(block_index)
