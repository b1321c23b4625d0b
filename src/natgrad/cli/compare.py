"""``natgrad compare``: compare optimizers on a task under the same time budget
(:func:`natgrad.compare.compare`).

Names and numbers are validated by natgrad.compare (ValueError), so bad input reads
"natgrad: error: ..." (exit 2) before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from .common import (DEFAULT_OUT, _add_mnist_dir, _add_threads, _finite_float, _progress_enabled, _with_threads,
                     positive_float)


def _add_compare(subparsers) -> None:
    from ..compare import DEFAULT_OPTIMIZERS
    from ..tasks import DEFAULT_TASK, TASKS

    p = subparsers.add_parser(
        "compare", help="compare optimizers on a task under the same time budget",
        description="For each optimizer, try a small learning-rate grid with the same budget of "
                    "training time per run, keep the lr with the lowest final training loss and "
                    "write DIR/results.md, DIR/loss_vs_time.png, DIR/loss_vs_steps.png, "
                    "DIR/summary.json (and DIR/runs.json, every run's curve).")
    p.add_argument("--task", default=DEFAULT_TASK, metavar="T",
                   help=f"task (default {DEFAULT_TASK}; one of {', '.join(TASKS)})")
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS), metavar="O[,O...]",
                   help=f"comma-separated optimizers (default {','.join(DEFAULT_OPTIMIZERS)})")
    p.add_argument("--budget", type=_finite_float, metavar="SECONDS",
                   help="training seconds per run (default: the task's, 3 s for digits-mlp)")
    p.add_argument("--seeds", type=int, default=1, metavar="K", help="seeds per run (default 1; medians reported)")
    p.add_argument("--search-seeds", type=int, metavar="K",
                   help="seeds of the learning-rate search (default: all --seeds); the chosen lr then "
                        "runs the remaining seeds")
    p.add_argument("--eval-every", type=int, metavar="N", help="full evaluation every N steps (default: the task's)")
    p.add_argument("--eval-seconds", type=positive_float, metavar="S",
                   help="also a full evaluation once S seconds of training passed since the last (default: 1/60 of the budget)")
    p.add_argument("--out", type=Path, metavar="DIR", help=f"output directory (default {DEFAULT_OUT}/compare-TASK)")
    _add_mnist_dir(p)
    _add_threads(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress display (a bar on a terminal, else a line every 10 s)")
    p.set_defaults(handler=_with_threads(_run_compare))


def _run_compare(args) -> int:
    import time

    from ..compare import compare

    out = args.out if args.out is not None else Path(DEFAULT_OUT) / f"compare-{args.task}"
    started = time.perf_counter()
    compare(args.task, args.optimizers, budget=args.budget, out=out, seeds=args.seeds,
            progress=_progress_enabled(args), verbose=True, mnist_dir=args.mnist_dir, eval_every=args.eval_every,
            eval_seconds=args.eval_seconds, search_seeds=args.search_seeds)
    names = ", ".join(str(out / n) for n in ("results.md", "loss_vs_time.png", "loss_vs_steps.png", "summary.json"))
    print(f"\nwrote {names} ({time.perf_counter() - started:.1f} s)")
    return 0
