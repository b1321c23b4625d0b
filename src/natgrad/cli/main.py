"""``natgrad`` command: ``natgrad <subcommand> [options]``.

Each subcommand is one module of this package (``report``, ``train``, ``compare``) with a
function ``_add_<name>(subparsers)`` that builds its parser and sets ``handler`` (a function
``(args) -> int``); add it to ``SUBCOMMANDS`` and you are done. What they share is in
:mod:`natgrad.cli.common`. Errors from natgrad (ValueError, TypeError, NotImplementedError,
missing files) are printed as ``natgrad: error: ...`` with exit code 2; ``--traceback`` shows
the full traceback.
"""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_USAGE, PROG
from .compare import _add_compare
from .report import _add_report
from .train import _add_train

SUBCOMMANDS = (_add_report, _add_train, _add_compare)


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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # natgrad train --nproc hands them on
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
