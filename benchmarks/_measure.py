"""Measurement helpers for natgrad's benchmarks.

Round-robin timing (median over repeats), the share of the CPUs that other processes used
while a block ran (and waiting for them to leave), and the peak memory of an operation
measured in fresh child processes. Like :mod:`_common`, nothing here imports natgrad.
"""
from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from _common import REPO_ROOT


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Per-call wall-clock seconds of each repeat (each sample is the mean of ``number``
    back-to-back calls; ``number`` > 1 only for calls shorter than the minimum sample time)."""

    samples: list[float] = field(default_factory=list)
    number: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def minimum(self) -> float:
        return min(self.samples) if self.samples else float("nan")


def _time_calls(fn: Callable[[], Any], number: int) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(number):
        out = fn()
        del out
    return (time.perf_counter() - t0) / number


def time_round_robin(fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1,
                     repeats: int = 5, min_sample_time: float = 0.05,
                     max_foreign: float | None = None, max_rounds: int | None = None,
                     stats: dict | None = None) -> dict[str, Timing]:
    """Time several callables in one process, interleaved: every round calls each of them
    once (the order reversed every other round, so no callable always runs right after the
    same neighbour). A callable faster than ``min_sample_time`` is repeated ``number`` times
    within a sample (as ``timeit`` does). ``number`` is calibrated on one untimed call, then
    again on each of the ``warmup`` untimed rounds of ``number`` calls (a first call can be
    slow — imports, lazy initialisation — and a sample of one call right after
    ``gc.collect()`` runs on cold caches: calibrated on the first call alone, ``mlp/kfac/mc``
    measured 1.73x instead of 1.45–1.51x). Results of the calls are dropped at once.

    With ``max_foreign`` (a fraction of the machine's CPUs), a round during which other
    processes used more than that (see :class:`ForeignCpu`) is discarded and run again, up to
    ``max_rounds`` rounds in all (default ``5 * repeats``); if too few clean rounds came, the
    ``repeats`` least disturbed ones are kept. ``stats`` (a dict, filled in) receives
    ``rounds``, ``discarded`` and ``foreign`` (the kept rounds' fractions).
    Returns one :class:`Timing` per name, in seconds per call."""
    names = list(fns)
    numbers: dict[str, int] = {}
    for name in names:  # calibration: one untimed call each
        numbers[name] = max(1, math.ceil(min_sample_time / max(_time_calls(fns[name], 1), 1e-9)))
    for _ in range(max(warmup, 0)):
        for name in names:
            t = _time_calls(fns[name], numbers[name])
            numbers[name] = max(1, math.ceil(min_sample_time / max(t, 1e-9)))
    if max_rounds is None:
        max_rounds = repeats if max_foreign is None else 5 * repeats
    max_rounds = max(max_rounds, repeats)
    rounds: list[tuple[float | None, dict[str, float]]] = []  # (foreign, {name: seconds})
    clean = 0
    for r in range(max_rounds):
        if clean >= repeats:
            break
        order = names if r % 2 == 0 else names[::-1]
        with ForeignCpu() as fc:
            sample = {name: _time_calls(fns[name], numbers[name]) for name in order}
        rounds.append((fc.fraction, sample))
        if max_foreign is None or fc.fraction is None or fc.fraction <= max_foreign:
            clean += 1
    if max_foreign is None:
        kept = rounds[:repeats]
    else:
        ok = [x for x in rounds if x[0] is None or x[0] <= max_foreign]
        kept = ok if len(ok) >= repeats else sorted(rounds, key=lambda x: x[0] or 0.0)[:repeats]
    if stats is not None:
        stats.update(rounds=len(rounds), discarded=len(rounds) - len(kept),
                     foreign=[f for f, _ in kept])
    return {name: Timing([smp[name] for _, smp in kept], numbers[name]) for name in names}


# --------------------------------------------------------------------------------------
# Other processes on the CPUs
# --------------------------------------------------------------------------------------
def _proc_stat_busy_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine (all CPUs) since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    busy = sum(v[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class ForeignCpu:
    """Fraction of the machine's CPU capacity used by *other* processes while the block
    ran (machine busy time from /proc/stat minus this process's own CPU time). Timings
    taken while it is well above 0 are unreliable: with ``torch.set_num_threads(2)`` on a
    2-core machine, competing processes slow the threads' barriers far more than 2x.
    ``fraction`` is None where /proc/stat is unavailable."""

    def __enter__(self) -> "ForeignCpu":
        self.fraction: float | None = None
        self._busy0 = _proc_stat_busy_seconds()
        self._self0 = _self_cpu_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        busy1 = _proc_stat_busy_seconds()
        wall = time.perf_counter() - self._t0
        if self._busy0 is None or busy1 is None or wall <= 0:
            return
        foreign = (busy1 - self._busy0) - (_self_cpu_seconds() - self._self0)
        self.fraction = min(max(foreign / (wall * (os.cpu_count() or 1)), 0.0), 1.0)


def wait_for_idle(max_wait: float, threshold: float = 0.1, probe: float = 2.0) -> float | None:
    """Sleep until other processes use less than ``threshold`` of the CPUs over a
    ``probe``-second window, or ``max_wait`` seconds have passed. Returns the last measured
    foreign fraction (None without /proc/stat)."""
    deadline = time.monotonic() + max_wait
    while True:
        with ForeignCpu() as fc:
            time.sleep(probe)
        if fc.fraction is None or fc.fraction < threshold or time.monotonic() >= deadline:
            return fc.fraction


# --------------------------------------------------------------------------------------
# Peak memory (in a fresh child process)
# --------------------------------------------------------------------------------------
def maxrss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: the high-water mark of the address
    space created by ``exec``. ``ru_maxrss`` is *not* usable for a fresh child there: it also
    keeps the high-water RSS of the pre-exec copy of the parent, so a child of a large parent
    reports at least the parent's size. Elsewhere ``ru_maxrss`` (KiB, bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    value, unit = line.split()[1:3]
                    return int(value) * {"kB": 1024}.get(unit, 1)
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


CHILD_MARKER = "NATGRAD_BENCH_CHILD_RESULT "


def child_report(**extra: Any) -> None:
    """Called at the end of a memory child: print its peak RSS on a marked stdout line."""
    print(CHILD_MARKER + json.dumps({"maxrss_bytes": maxrss_bytes(), **extra}), flush=True)


def run_child(argv: Sequence[str], timeout: float = 1800.0) -> dict:
    """Run ``python argv...`` in a fresh process and return the dict it reported through
    :func:`child_report`. Raises ``RuntimeError`` with the child's stderr if it failed."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO_ROOT))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARKER):
            if proc.returncode == 0:
                return json.loads(line[len(CHILD_MARKER):])
            break
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    raise RuntimeError(f"memory child exited with {proc.returncode}: " + " | ".join(tail))


def peak_delta_mb(run_argv: Sequence[str], setup_argv: Sequence[str], *,
                  setup_cache: dict | None = None, timeout: float = 1800.0) -> tuple[float, float]:
    """Peak memory (MB, 10^6 bytes) of the measured operation: the peak RSS of a fresh
    child that sets up and runs it minus that of a fresh child that only sets up (same
    imports, model, data). Returns ``(delta_mb, run_peak_mb)``. ``setup_cache`` (keyed by
    the setup argv) avoids re-running identical setup children."""
    key = tuple(setup_argv)
    if setup_cache is not None and key in setup_cache:
        setup_peak = setup_cache[key]
    else:
        setup_peak = run_child(setup_argv, timeout)["maxrss_bytes"]
        if setup_cache is not None:
            setup_cache[key] = setup_peak
    run_peak = run_child(run_argv, timeout)["maxrss_bytes"]
    return (run_peak - setup_peak) / 1e6, run_peak / 1e6
