"""Exceptions with messages that say what is wrong and how to fix it, and :func:`warn`, which
reports a warning at the user's line rather than inside natgrad."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


class UnsupportedLayerError(NotImplementedError):
    """A structure that needs a per-layer adapter (kfac, ekfac, kron_sum) met a module without one."""


class ConvergenceError(RuntimeError):
    """An iterative solve (conjugate gradient) did not reach its tolerance."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside natgrad and torch (whose frames
    — subclass ``__init__`` chains, ``@torch.no_grad()`` wrappers — vary in depth)."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
