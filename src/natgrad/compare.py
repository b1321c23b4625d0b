"""Compare optimizers on one task under the same training-time budget.

For every optimizer, each learning rate of a small grid (:meth:`OptimizerSpec.grid`: three values
around the optimizer's default, the same for every optimizer's tuning budget) is run for
``budget`` seconds of training time (evaluation excluded) and ``seeds`` seeds; the learning rate
with the lowest final full training loss (median over seeds; a diverged run counts as +inf) is
kept. With ``search_seeds=k`` < ``seeds`` the search runs the first k seeds only and the chosen
learning rate then runs the remaining ones (the table's medians are over all ``seeds``; on the
slow tasks this makes a 3-seed comparison affordable). Writes to ``out``:

* ``results.md`` — a markdown table per optimizer: lr, steps and seconds to the task's fixed
  target training loss, final train loss, test loss, test accuracy (the median over seeds);
  then every run of the learning-rate search;
* ``loss_vs_time.png``, ``loss_vs_steps.png`` — full training loss of the chosen runs (log
  scale) against training time and steps, with the target as a dashed line;
* ``summary.json`` — exactly ``{optimizer: {"lr", "steps_to_target", "time_to_target_s",
  "final_train_loss", "final_test_accuracy"}}`` (medians over seeds; ``null`` where the target
  was not reached by the median seed, or where there is no accuracy);
* ``runs.json`` — every run's summary and evaluation curve (for re-plotting).

Steps/time to target have the resolution of the task's evaluation interval.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from .atomic import write_bytes_atomic
from .progress import progress_bar
from .tasks import get_task
from .training import _positive, get_optimizer, run
from .training_files import prepare_out, write_json

__all__ = ["compare", "DEFAULT_OPTIMIZERS", "SUMMARY_KEYS"]

DEFAULT_OPTIMIZERS = ("sgd", "adam", "kfac", "ekfac", "ngd")
SUMMARY_KEYS = ("lr", "steps_to_target", "time_to_target_s", "final_train_loss", "final_test_accuracy")


def _median(values):
    """Median with None/NaN as +inf; None if the median is not finite."""
    clean = [math.inf if v is None or not math.isfinite(v) else float(v) for v in values]
    value = statistics.median(clean) if clean else math.inf
    return value if math.isfinite(value) else None


def _check_grid(lr_grid, optimizers, task) -> dict[str, tuple[float, ...]]:
    grid = {}
    extra = set(lr_grid or {}) - set(optimizers)
    if extra:
        raise ValueError(f"lr_grid names optimizers that are not compared: {', '.join(sorted(extra))}")
    for name in optimizers:
        values = (lr_grid or {}).get(name, get_optimizer(name).grid(task))
        if isinstance(values, (int, float)):
            values = (values,)
        values = tuple(values)
        if not values:
            raise ValueError(f"the learning-rate grid of {name!r} is empty")
        for lr in values:
            _positive(f"learning rate of {name!r}", lr)
        grid[name] = values
    return grid


def compare(task="digits-mlp", optimizers=DEFAULT_OPTIMIZERS, budget=None, out=None, seeds=1, lr_grid=None,
            progress=True, verbose=True, mnist_dir=None, eval_every=None, search_seeds=None,
            eval_seconds=None) -> dict:
    """Run the comparison; returns the ``summary.json`` dict (written with the other files to
    ``out`` if given) and prints the table if ``verbose``. ``budget``: seconds of training per
    run (default: the task's ``compare_budget``); ``lr_grid``: ``{optimizer: [lr, ...]}``
    overriding the built-in grids; ``search_seeds``: seeds of the learning-rate search (default:
    all ``seeds``); ``eval_seconds``: also evaluate once this much training time has passed since
    the last evaluation (default: 1/60 of the budget), so that the time to the target has the
    same resolution for fast and slow steps."""
    task = get_task(task)
    if isinstance(optimizers, str):
        optimizers = [o.strip() for o in optimizers.split(",") if o.strip()]
    optimizers = list(dict.fromkeys(optimizers))
    if not optimizers:
        raise ValueError("no optimizer to compare")
    for name in optimizers:
        get_optimizer(name)
    grid = _check_grid(lr_grid, optimizers, task)
    budget = _positive("budget", budget) or task.compare_budget
    _positive("seeds", seeds, integer=True)
    search_seeds = _positive("search_seeds", search_seeds, integer=True) or seeds
    if search_seeds > seeds:
        raise ValueError(f"search_seeds ({search_seeds}) cannot exceed seeds ({seeds})")
    _positive("eval_every", eval_every, integer=True)
    eval_seconds = _positive("eval_seconds", eval_seconds) or budget / 60
    data = task.load(mnist_dir)
    out = None if out is None else Path(out).expanduser()
    if out is not None:
        prepare_out(out)

    started = time.perf_counter()
    total = sum(len(v) * search_seeds + seeds - search_seeds for v in grid.values())
    bar = progress_bar(progress, total, f"compare {task.name}", "run")
    runs: dict[str, dict[float, list]] = {name: {} for name in optimizers}
    chosen: dict[str, float] = {}

    def one(name: str, lr: float, seed: int) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{name} lr={lr:g} seed={seed}")
        result = run(task, name, lr=lr, seed=seed, time_budget=budget, progress=False, data=data,
                     eval_every=eval_every, eval_seconds=eval_seconds)
        runs[name].setdefault(lr, []).append(result)
        if bar is not None:
            bar.update(1)

    try:
        for name in optimizers:
            for lr in grid[name]:
                for seed in range(search_seeds):
                    one(name, lr, seed)
            chosen[name] = min(grid[name], key=lambda lr: _final_loss(runs[name][lr]))
            for seed in range(search_seeds, seeds):
                one(name, chosen[name], seed)
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - started

    summary, rows = {}, {}
    for name in optimizers:
        best = chosen[name]
        sums = [r.summary for r in runs[name][best]]
        summary[name] = {
            "lr": best,
            "steps_to_target": _median([s["steps_to_target"] for s in sums]),
            "time_to_target_s": _median([s["time_to_target_s"] for s in sums]),
            "final_train_loss": _median([s["final_train_loss"] for s in sums]),
            "final_test_accuracy": _median([s["final_test_accuracy"] for s in sums]) if task.classifier else None,
        }
        if summary[name]["steps_to_target"] is not None:
            summary[name]["steps_to_target"] = int(summary[name]["steps_to_target"])
        rows[name] = dict(summary[name], test_loss=_median([s["final_test_loss"] for s in sums]),
                          steps=_median([s["steps"] for s in sums]),
                          metric=summary[name]["final_test_accuracy"] if task.classifier else
                          _median([s.get("final_test_reconstruction_error") for s in sums]))
    table = _markdown(task, budget, (seeds, search_seeds), grid, rows, runs, wall)
    if verbose:
        print(table, end="")
    if out is not None:
        _write_outputs(out, task, summary, table, runs, chosen)
    return summary


def _final_loss(results) -> float:
    """Median final full training loss of the runs of one learning rate (+inf if diverged)."""
    return _median([r.summary["final_train_loss"] for r in results]) or math.inf


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def _markdown(task, budget, seed_counts, grid, rows, runs, wall) -> str:
    seeds, search_seeds = seed_counts
    seed_text = "1 seed" if seeds == 1 else f"{seeds} seeds (medians)"
    if search_seeds < seeds:
        seed_text += f"; the learning-rate search used the first {search_seeds} seed" + ("s" if search_seeds > 1 else "")
    lines = [
        f"# natgrad compare: {task.name}", "",
        f"{task.description}. Target: {task.target_note}.",
        f"Budget {budget:g} s of training time per run (evaluation excluded), {seed_text}; "
        f"learning rate picked from the grid by the final full training loss. Total wall time {wall:.1f} s.", "",
        "| optimizer | lr | steps to target | time to target (s) | final train loss | test loss | "
        + ("test accuracy" if task.classifier else "test reconstruction error") + " | steps run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['lr']:g} | {_fmt(row['steps_to_target'], 'd')} | {_fmt(row['time_to_target_s'], '.2f')} "
            f"| {_fmt(row['final_train_loss'], '.4g')} | {_fmt(row['test_loss'], '.4g')} "
            f"| {_fmt(row['metric'], '.4f' if task.classifier else '.4g')} | {_fmt(row['steps'], '.0f')} |")
    lines += ["", "Learning-rate search (final full training loss, median over the seeds run; steps run):", "",
              "| optimizer | " + " | ".join(f"lr {i + 1}" for i in range(max(len(v) for v in grid.values()))) + " |",
              "|---|" + "---|" * max(len(v) for v in grid.values())]
    for name, lrs in grid.items():
        cells = []
        for lr in lrs:
            sums = [r.summary for r in runs[name][lr]]
            loss = _median([s["final_train_loss"] for s in sums])
            diverged = any(s["diverged"] for s in sums)
            cells.append(f"{lr:g}: {_fmt(loss, '.3g')}{' (diverged)' if diverged else ''} ({_fmt(_median([s['steps'] for s in sums]), '.0f')})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_outputs(out: Path, task, summary, table, runs, chosen) -> None:
    from .plots import plot_loss_curves

    curves_time, curves_steps, labels = {}, {}, {}
    for name, lr in chosen.items():
        labels[name] = f"{name} (lr {lr:g})"
        evals = [[r for r in result.records if "full_train_loss" in r] for result in runs[name][lr]]
        curves_time[name] = [([r["time_s"] for r in ev], [r["full_train_loss"] for r in ev]) for ev in evals]
        curves_steps[name] = [([r["step"] for r in ev], [r["full_train_loss"] for r in ev]) for ev in evals]
    title = f"{task.name}: full training loss (best lr per optimizer)"
    ylabel = "training loss" if task.classifier else "training NLL per image"
    plot_loss_curves(curves_time, out / "loss_vs_time.png", xlabel="training time (s)", ylabel=ylabel,
                     title=title, target=task.target_loss, labels=labels)
    plot_loss_curves(curves_steps, out / "loss_vs_steps.png", xlabel="step (log scale)", ylabel=ylabel,
                     title=title, target=task.target_loss, labels=labels, logx=True)
    detail = {name: {str(lr): [{"summary": r.summary,
                                "evaluations": [r2 for r2 in r.records if "full_train_loss" in r2]} for r in results]
                     for lr, results in by_lr.items()} for name, by_lr in runs.items()}
    write_json(out / "runs.json", detail)
    write_bytes_atomic(out / "results.md", table.encode())
    write_json(out / "summary.json", summary)

