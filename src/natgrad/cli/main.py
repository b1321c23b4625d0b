"""``natgrad`` command: ``natgrad <subcommand> [options]``.

Each subcommand is one function ``_add_<name>(subparsers)`` that builds its parser and sets
``handler`` (a function ``(args) -> int``); add it to ``SUBCOMMANDS`` and you are done.
Errors from natgrad (ValueError, TypeError, NotImplementedError, missing files) are printed
as ``natgrad: error: ...`` with exit code 2; ``--traceback`` shows the full traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

PROG = "natgrad"
EXIT_USAGE = 2
DEFAULT_OUT = "results"  # git-ignored


# --------------------------------------------------------------------------- argument types

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


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


def _flatten(lists):
    return None if lists is None else [x for sub in lists for x in sub]


def _progress_enabled(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


# --------------------------------------------------------------------------- report

def _add_report(subparsers) -> None:
    from ..report import DEFAULT_STRUCTURES, ESTIMATORS, STRUCTURES

    p = subparsers.add_parser(
        "report", help="per-layer error of each Fisher structure against the exact Fisher",
        description="Train a small tanh MLP briefly, compute the dense Fisher on N training "
                    "examples and compare every structure with it per layer: relative "
                    "Frobenius error of the layer block and cosine of the natural gradient.")
    p.add_argument("--data", choices=("digits", "mnist"), default="digits",
                   help="dataset (default: digits, scikit-learn's 8x8 digits)")
    p.add_argument("--mnist-dir", type=Path, metavar="DIR",
                   help="folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
                        "(required with --data mnist)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="exact")
    p.add_argument("--samples", type=positive_int, default=1, metavar="K",
                   help="sampled labels per example for --estimator mc (default 1)")
    p.add_argument("--damping", type=positive_float, default=1e-3, metavar="X",
                   help="damping added to the Fisher before solving (default 1e-3)")
    p.add_argument("--structures", type=name_list(STRUCTURES), default=None,
                   metavar="S[,S...]",
                   help=f"structures to compare (default {','.join(DEFAULT_STRUCTURES)}; "
                        f"choose from {','.join(STRUCTURES)}; implicit is matrix-free, so its "
                        f"dense matrix takes one product per parameter: slow)")
    p.add_argument("--hidden", type=int_list, nargs="+", default=None, metavar="W",
                   help="hidden layer widths, e.g. 32 or 32,16 (default 32 on digits, "
                        "8 on mnist)")
    p.add_argument("--steps", type=nonnegative_int, default=200,
                   help="Adam training steps before measuring (default 200)")
    p.add_argument("--examples", type=positive_int, default=512, metavar="N",
                   help="training examples the Fisher is computed on (default 512)")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--float32", action="store_true",
                   help="compute in float32 instead of float64")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, metavar="DIR",
                     help=f"write DIR/report.json (default: {DEFAULT_OUT}/report.json)")
    out.add_argument("--json", type=Path, metavar="FILE", help="write the JSON to FILE")
    out.add_argument("--no-json", action="store_true", help="print the table only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_report)


def _run_report(args) -> int:
    import torch

    from ..report import DEFAULT_STRUCTURES, report

    if args.data == "mnist" and args.mnist_dir is None:
        raise ValueError("--data mnist needs --mnist-dir DIR, the folder holding "
                         "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    if args.data != "mnist" and args.mnist_dir is not None:
        raise ValueError("--mnist-dir is only used with --data mnist")
    result = report(
        data=args.data, mnist_dir=args.mnist_dir, estimator=args.estimator,
        samples=args.samples, damping=args.damping,
        structures=tuple(args.structures or DEFAULT_STRUCTURES),
        train_steps=args.steps, hidden=_flatten(args.hidden), examples=args.examples,
        seed=args.seed, dtype=torch.float32 if args.float32 else torch.float64,
        progress=_progress_enabled(args))
    print(result.to_table())
    if args.no_json:
        path = None
    elif args.json is not None:
        path = args.json
    else:
        path = (Path(DEFAULT_OUT) if args.out is None else args.out) / "report.json"
    if path is not None:
        result.save(path)
        print(f"wrote {path}")
    return 0


SUBCOMMANDS = (_add_report,)


# --------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="natgrad: the Fisher information in every structure.")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    """Run the ``natgrad`` command; returns the exit code (argparse exits 2 on bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except (ValueError, TypeError, NotImplementedError, OSError) as exc:
        if args.traceback:
            raise
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{message}: {exc.filename}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
