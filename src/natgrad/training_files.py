"""The files of a training run (:mod:`natgrad.training`): their names, atomic writes, the
output directory's preparation and the configuration of a checkpointed run."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .atomic import write_json_atomic

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT_VERSION = 1


def _finite(value):
    return value if value is not None and math.isfinite(value) else None


def write_json(path: Path, data) -> None:
    """Write ``data`` as JSON atomically (non-finite floats become null)."""
    def clean(x):
        if isinstance(x, float):
            return _finite(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    write_json_atomic(path, clean(data))


def prepare_out(out: Path) -> None:
    """Create ``out`` and check that files can be written in it (ValueError/OSError otherwise)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output directory {str(out)!r}: {exc.strerror or exc}") from None
    probe = out / ".natgrad-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write in output directory {str(out)!r}: {exc.strerror or exc}") from None


def checkpoint_config(out) -> dict | None:
    """The configuration (task, optimizer, lr, ..., and the number of processes ``world_size``)
    of the run checkpointed in ``out``, if any."""
    path = Path(out).expanduser() / CHECKPOINT
    if not path.is_file():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return dict(checkpoint["config"], world_size=checkpoint.get("world_size", 1))
