"""``natgrad`` command: ``natgrad <subcommand> [options]``.

Each subcommand is one function ``_add_<name>(subparsers)`` that builds its parser and sets
``handler`` (a function ``(args) -> int``); add it to ``SUBCOMMANDS`` and you are done.
Errors from natgrad (ValueError, TypeError, NotImplementedError, missing files) are printed
as ``natgrad: error: ...`` with exit code 2; ``--traceback`` shows the full traceback.
"""

from __future__ import annotations

import argparse
import math
import os
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


# --------------------------------------------------------------------------- train / compare
# Names and numbers are validated by natgrad.training / natgrad.compare (ValueError), so bad
# input reads "natgrad: error: ..." (exit 2) before anything is written.

def _finite_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


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


def _add_train(subparsers) -> None:
    from ..tasks import DEFAULT_TASK, TASKS
    from ..training import OPTIMIZERS

    p = subparsers.add_parser(
        "train", help="train a built-in task with one optimizer (metrics, checkpoints, resume)",
        description="Train a built-in task; writes DIR/metrics.jsonl (one line per step), "
                    "DIR/checkpoint.pt (every --checkpoint-every steps and at the end) and "
                    "DIR/summary.json. Stops at the first of --steps, --epochs and --budget "
                    "(default: the task's default number of epochs).")
    p.add_argument("--task", metavar="T",
                   help=f"task (default {DEFAULT_TASK}, or the checkpoint's with --resume; one of {', '.join(TASKS)})")
    p.add_argument("--optimizer", metavar="O",
                   help=f"optimizer (default kfac, or the checkpoint's with --resume; one of {', '.join(OPTIMIZERS)})")
    p.add_argument("--steps", type=int, metavar="N", help="total training steps")
    p.add_argument("--epochs", type=int, metavar="E", help="total training epochs")
    p.add_argument("--budget", type=_finite_float, metavar="S", help="seconds of training time")
    p.add_argument("--batch-size", type=int, metavar="B", help="batch size (default: the task's)")
    p.add_argument("--lr", type=_finite_float, metavar="X", help="learning rate (default: the optimizer's)")
    p.add_argument("--damping", type=_finite_float, metavar="X",
                   help="damping of kfac/ekfac/ngd (default: the optimizer's)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of initialisation, sampling and data order (default 0)")
    p.add_argument("--eval-every", type=int, metavar="N", help="full evaluation every N steps (default: the task's)")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N", help="checkpoint every N steps (default 100)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help=f"output directory (default {DEFAULT_OUT}/train-TASK-OPTIMIZER)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--nproc", type=positive_int, metavar="N",
                   help="train on N local processes (torch.distributed, gloo; --batch-size is the global batch, "
                        "divisible by N); for several machines use torchrun, see docs/distributed.md")
    p.add_argument("--timeout", type=positive_float, default=300.0, metavar="S",
                   help="distributed runs: seconds a collective may wait for the other processes before every "
                        "process stops with an error (default 300)")
    _add_mnist_dir(p)
    _add_threads(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_with_threads(_run_train))


def format_train_summary(summary: dict) -> str:
    """A few human-readable lines for the command line."""
    def num(x, fmt):
        return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)

    lines = [
        f"{summary['task']} / {summary['optimizer']} (lr {summary['lr']:g}"
        + (f", damping {summary['damping']:g}" if summary.get("damping") is not None else "")
        + f", batch {summary['batch_size']}, seed {summary['seed']})",
        f"  {summary['steps']} steps ({summary['epochs']:.2f} epochs) in {summary['time_s']:.2f} s of training"
        f" (stopped by {summary['stopped_by']})",
        f"  final train loss {num(summary['final_train_loss'], '.4g')}, test loss {num(summary['final_test_loss'], '.4g')}"
        + (f", test accuracy {num(summary['final_test_accuracy'], '.4f')}" if summary.get("final_test_accuracy") is not None else "")
        + (f", test reconstruction error {num(summary['final_test_reconstruction_error'], '.4g')}"
           if "final_test_reconstruction_error" in summary else ""),
        f"  target loss {summary['target_loss']:g}: "
        + (f"reached at step {summary['steps_to_target']} after {summary['time_to_target_s']:.2f} s"
           if summary["steps_to_target"] is not None else "not reached"),
    ]
    return "\n".join(lines)


def _run_train(args) -> int:
    from ..tasks import DEFAULT_TASK, get_task
    from ..training import checkpoint_config, train
    from ..training_dist import WORKER_ENV, check_batch, launch, resume_world_error

    task, optimizer = args.task or DEFAULT_TASK, args.optimizer or "kfac"
    out = args.out if args.out is not None else Path(DEFAULT_OUT) / f"train-{task}-{optimizer}"
    config = (checkpoint_config(out) or {}) if args.resume else {}
    if args.resume and (args.task is None or args.optimizer is None):
        task, optimizer = args.task or config.get("task", task), args.optimizer or config.get("optimizer", optimizer)
    worker = os.environ.get(WORKER_ENV) == "1"
    if args.nproc is not None and not worker:
        if "WORLD_SIZE" in os.environ:
            raise ValueError("--nproc launches its own processes; under torchrun leave it out")
        check_batch(args.batch_size or config.get("batch_size") or get_task(task).batch_size, args.nproc)
        if config and config["world_size"] != args.nproc:
            raise ValueError(resume_world_error(out, config["world_size"], args.nproc))
        code, message = launch(args.argv, args.nproc, args.timeout)
        if message is not None:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        return code
    if "WORLD_SIZE" not in os.environ:
        summary = train(task, optimizer, **_train_options(args, out))
    else:  # one rank under torchrun
        summary, code = _train_rank(args, task, optimizer, out, worker)
        if summary is None or os.environ.get("RANK", "0") != "0":
            return code
    print(format_train_summary(summary))
    print(f"wrote {out / 'metrics.jsonl'}, {out / 'checkpoint.pt'}, {out / 'summary.json'}")
    return 0


def _train_options(args, out) -> dict:
    return dict(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, damping=args.damping,
                seed=args.seed, out=out, resume=args.resume, time_budget=args.budget,
                progress=_progress_enabled(args), eval_every=args.eval_every,
                checkpoint_every=args.checkpoint_every, mnist_dir=args.mnist_dir)


def _train_rank(args, task, optimizer, out, worker):
    """One rank of a distributed run (under torchrun or --nproc): ``(summary, 0)``, or ``(None,
    exit code)`` after an error, reported in one line per rank (under --nproc only through
    torchelastic's error file to the launcher, which prints the first failure)."""
    import time
    import traceback

    from ..training import train
    from ..training_dist import process_group_from_env, record_error

    failed_at = None
    try:
        with process_group_from_env(args.timeout):
            try:
                return train(task, optimizer, **_train_options(args, out)), 0
            except Exception:
                failed_at = time.time()  # before leaving the group, which the other ranks notice
                raise
    except Exception as exc:
        record_error(exc, failed_at)
        if args.traceback:
            traceback.print_exc()
        elif not worker:
            print(f"{PROG}: error: rank {os.environ.get('RANK')}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None, EXIT_USAGE if isinstance(exc, (ValueError, TypeError, NotImplementedError, OSError)) else 1


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
    p.add_argument("--out", type=Path, metavar="DIR", help=f"output directory (default {DEFAULT_OUT}/compare-TASK)")
    _add_mnist_dir(p)
    _add_threads(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_with_threads(_run_compare))


def _run_compare(args) -> int:
    import time

    from ..compare import compare

    out = args.out if args.out is not None else Path(DEFAULT_OUT) / f"compare-{args.task}"
    started = time.perf_counter()
    compare(args.task, args.optimizers, budget=args.budget, out=out, seeds=args.seeds,
            progress=_progress_enabled(args), verbose=True, mnist_dir=args.mnist_dir, eval_every=args.eval_every,
            search_seeds=args.search_seeds)
    names = ", ".join(str(out / n) for n in ("results.md", "loss_vs_time.png", "loss_vs_steps.png", "summary.json"))
    print(f"\nwrote {names} ({time.perf_counter() - started:.1f} s)")
    return 0


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
