"""What the ``natgrad`` subcommands share: the program name, exit code and default output folder,
argparse types for numbers and lists, and the ``--threads``/``--mnist-dir`` options."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

PROG = "natgrad"
EXIT_USAGE = 2
DEFAULT_OUT = "results"  # git-ignored


# --------------------------------------------------------------------------- argument types

def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """``32`` or ``32,16`` (used with ``nargs="+"``, so ``32 16`` works too)."""
    widths = [positive_int(part) for part in text.split(",") if part.strip()]
    if not widths:
        raise argparse.ArgumentTypeError(f"expected layer widths like 32 or 32,16, got {text!r}")
    return widths


def name_list(choices):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"invalid choice {', '.join(bad) or text!r} (choose from {', '.join(choices)})")
        return names
    return parse


def _finite_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _progress_enabled(args) -> bool | str:
    """A bar on a terminal, plain lines every few seconds into a log or pipe, nothing with -q."""
    if args.quiet:
        return False
    return "bar" if sys.stderr.isatty() else "lines"


# --------------------------------------------------------------------------- shared options

def _add_threads(p) -> None:
    p.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="torch intra-op threads (default 1: these models are small, and on a "
                        "busy shared machine 2 threads made each step ~100x slower)")


def _with_threads(handler):
    """Run ``handler(args)`` with ``--threads`` intra-op threads, restoring the previous count."""
    def run(args) -> int:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            return handler(args)
        finally:
            torch.set_num_threads(before)

    return run


def _add_mnist_dir(p) -> None:
    p.add_argument("--mnist-dir", type=Path, metavar="DIR",
                   help="folder of the MNIST IDX .gz files for the mnist-* tasks (default: "
                        "shared/data/mnist next to the repository root, if present)")
