"""``natgrad train``: train a built-in task with one optimizer (:func:`natgrad.training.train`),
on one process or several (``--nproc``, or one rank under torchrun).

Names and numbers are validated by natgrad.training (ValueError), so bad input reads
"natgrad: error: ..." (exit 2) before anything is written.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from .common import (DEFAULT_OUT, EXIT_USAGE, PROG, _add_mnist_dir, _add_threads, _finite_float, _progress_enabled,
                     _with_threads, positive_float, positive_int)


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
    p.add_argument("--eval-seconds", type=positive_float, metavar="S",
                   help="also a full evaluation once S seconds of training passed since the last (default: none)")
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
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress display (a bar on a terminal, else a line every 10 s)")
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
                progress=_progress_enabled(args), eval_every=args.eval_every, eval_seconds=args.eval_seconds,
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
