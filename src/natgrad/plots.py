"""PNG plots of training curves (matplotlib, imported lazily; no pyplot, no global state)."""

from __future__ import annotations

import math
from pathlib import Path

from .atomic import atomic_path

__all__ = ["plot_loss_curves"]

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def plot_loss_curves(curves: dict[str, list[tuple[list[float], list[float]]]], path: str | Path, *,
                     xlabel: str, ylabel: str, title: str, target: float | None = None,
                     labels: dict[str, str] | None = None, logx: bool = False) -> None:
    """Plot ``curves[name] = [(xs, ys), ...]`` (one colour per name, one line per run) with a
    log-scale y axis (and x axis with ``logx``: points with x <= 0 are left out) and an optional
    horizontal target line; written atomically to ``path``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("natgrad's plots need matplotlib: pip install 'natgrad[plot]'") from exc
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = False
    for i, (name, runs) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        for j, (xs, ys) in enumerate(runs):
            points = [(x, y) for x, y in zip(xs, ys)
                      if y is not None and math.isfinite(y) and y > 0 and (x > 0 or not logx)]
            if not points:
                continue
            label = (labels or {}).get(name, name) if j == 0 else None
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, label=label,
                    linewidth=1.5 if j == 0 else 0.8, alpha=1.0 if j == 0 else 0.6)
            plotted = True
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    if plotted or target is not None:
        ax.set_yscale("log")
    if logx and plotted:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
