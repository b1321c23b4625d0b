"""The result of :func:`natgrad.report.report`: the :class:`Report` with its text table and
JSON form (saved with :func:`natgrad.atomic.write_json_atomic`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_json_atomic

__all__ = ["Report", "write_json_atomic"]

_ALL = "all"


@dataclass
class Report:
    """Result of :func:`report`. ``rel_error[structure][layer]`` and
    ``cosine[structure][layer]`` are floats (NaN where undefined, e.g. a zero block);
    ``layers`` are the block names of ``F.blocks`` followed by ``"all"``."""

    structures: tuple[str, ...]
    layers: tuple[str, ...]
    rel_error: dict[str, dict[str, float]]
    cosine: dict[str, dict[str, float]]
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: NaN/Inf become ``None``."""
        return {
            "structures": list(self.structures),
            "layers": list(self.layers),
            "rel_error": _clean(self.rel_error),
            "cosine": _clean(self.cosine),
            "metadata": _clean(self.metadata),
        }

    def save(self, path) -> Path:
        """Write :meth:`to_dict` as JSON to ``path`` atomically; returns the path."""
        return write_json_atomic(path, self.to_dict())

    def to_table(self, header: bool = True) -> str:
        """Aligned text table: one row per layer (+ ``all``), per structure rel.err and cos."""
        name_w = max(len("layer"), *(len(n) for n in self.layers))
        col_w = 9
        group_w = 2 * col_w + 1
        groups = [s[:group_w].center(group_w) for s in self.structures]
        lines = []
        if header:
            lines.append(_describe(self.metadata))
        lines.append(" " * name_w + "  " + "   ".join(groups))
        sub = f"{'rel.err':>{col_w}} {'cos':>{col_w}}"
        lines.append(f"{'layer':<{name_w}}  " + "   ".join([sub] * len(self.structures)))
        lines.append("-" * len(lines[-1]))
        for layer in self.layers:
            if layer == _ALL and len(self.layers) > 1:
                lines.append("-" * len(lines[-2]))
            cells = [f"{_fmt_err(self.rel_error[s][layer]):>{col_w}} "
                     f"{_fmt_cos(self.cosine[s][layer]):>{col_w}}" for s in self.structures]
            lines.append(f"{layer:<{name_w}}  " + "   ".join(cells))
        return "\n".join(lines)

    format = to_table

    def __str__(self) -> str:
        return self.to_table()


# --------------------------------------------------------------------------- helpers

def _describe(meta: dict) -> str:
    if not meta:
        return "natgrad report"
    parts = [f"natgrad report: {meta.get('data')}", f"{meta.get('model')}",
             f"{meta.get('params', 0):,} params",
             f"{meta.get('examples')} examples",
             f"{meta.get('estimator')} Fisher"
             + (f" ({meta.get('samples')} samples)" if meta.get("estimator") == "mc" else ""),
             f"damping {meta.get('damping'):g}",
             f"{meta.get('train_steps')} Adam steps"]
    acc = meta.get("test_accuracy")
    if isinstance(acc, float) and math.isfinite(acc):
        parts.append(f"test acc {acc:.1%}")
    return ", ".join(parts)


def _fmt_err(v: float) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.2e}"


def _fmt_cos(v: float) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.5f}"


def _clean(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
