"""Progress display for long runs: a tqdm bar on a terminal (or a notebook widget), and plain
lines every few seconds where stderr is a log file or a pipe (CI, ``nohup``), where a bar's
carriage returns would be noise."""

from __future__ import annotations

import sys
import time

LINE_INTERVAL_S = 10.0


class LineProgress:
    """The part of tqdm's interface natgrad uses, printing ``desc: 120/200 step [k=v ...]``
    to stderr at most every ``interval`` seconds, and once more at :meth:`close`."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0,
                 interval: float | None = None) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.postfix = ""
        self._last = time.monotonic()
        self._printed_at = None

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._print()

    def set_postfix(self, values: dict, refresh: bool = True) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        if self._printed_at is not None and self._printed_at != self.n:
            self._print()

    def _print(self) -> None:
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        print(f"{self.desc}: {done} {self.unit}s" + (f"  {self.postfix}" if self.postfix else ""),
              file=sys.stderr, flush=True)
        self._last, self._printed_at = time.monotonic(), self.n


def progress_bar(mode: bool | str, total: int | None, desc: str, unit: str, initial: int = 0):
    """``mode``: True or "bar" (tqdm, a widget in notebooks), "lines" (:class:`LineProgress`),
    False (None: no display)."""
    if mode not in (True, False, "bar", "lines"):
        raise ValueError(f"progress must be True, False, 'bar' or 'lines', got {mode!r}")
    if mode is False:
        return None
    if mode == "lines":
        return LineProgress(total, desc, unit, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True, leave=False, desc=desc, unit=unit)
