"""Exceptions with messages that say what is wrong and how to fix it."""

from __future__ import annotations


class UnsupportedLayerError(NotImplementedError):
    """A structure that needs a per-layer adapter (kfac, ekfac, kron_sum) met a module without one."""


class ConvergenceError(RuntimeError):
    """An iterative solve (conjugate gradient) did not reach its tolerance."""
