"""Reporting for ``fisher_bench.py``: the text table of the case records and their JSON-safe form."""
from __future__ import annotations

import _common as C


def _fmt_value(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} s" if metric == "seconds" else f"{v:.2f}x"


def render_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        unit = " s" if r["metric"] == "seconds" else "x"
        peer = f"{r['peer']['name']} {r['peer']['value']:g}{unit}" if r["peer"] else "-"
        rows.append([
            r["name"],
            _fmt_value(r["value"], r["metric"]),
            f"<= {r['target']:g}{unit}" if r["target"] is not None else "-",
            peer,
            f"{r['vs_peer']:.2f}" if r["vs_peer"] is not None else "-",
            r["status"],
            f"{r['seconds'] * 1e3:.1f}" if r["seconds"] is not None else "-",
            f"{r['baseline_seconds'] * 1e3:.2f}" if r["baseline_seconds"] is not None else "-",
            f"{r['ratio']:.1f}x" if r["ratio"] is not None and r["metric"] == "seconds" else "",
            f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-",
            f"{100 * r['foreign_cpu']:.0f}%" if r.get("foreign_cpu") is not None else "-",
            f"{r['rounds'] - r['rounds_discarded']}/{r['rounds']}" if r.get("rounds") else "-",
        ])
    return C.format_table(
        ["case", "natgrad", "target", "fastest peer", "/peer", "status", "natgrad ms",
         "fwd+bwd ms", "ratio", "peak MB", "other CPU", "rounds"], rows, "llllrlrrrrrr")


def _jsonable(rec: dict) -> dict:
    """Floats to JSON-safe values (NaN/inf -> null)."""
    out = {}
    for k, v in rec.items():
        if isinstance(v, float):
            out[k] = C.finite_or_none(v)
        elif isinstance(v, list):
            out[k] = [C.finite_or_none(x) if isinstance(x, float) else x for x in v]
        else:
            out[k] = v
    return out
