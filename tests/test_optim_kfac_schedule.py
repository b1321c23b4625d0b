"""natgrad.optim.KFAC's Schedule against independent computations (float64): which examples and
which steps enter the statistics, and how they are averaged.

* ``stat_fraction`` τ₁ with ``stat_min_examples``: R = max(⌈τ₁ N⌉, minimum) consecutive rows,
  rotating through a repeated batch; K-FAC's default is τ₁ = 1/8 with at least 32 examples,
  EKFAC's and NGD's the whole batch;
* running averages new = ρ old + (1 − ρ) batch with ρ = min(1 − 1/k, decay), updated only every
  ``stat_every`` steps (the factors untouched, bit for bit, in between).

The references are tests/reference.py's brute-force factors of the same rows.
"""

from __future__ import annotations

import pytest
import torch

import reference as ref
from test_optim_helpers import (
    MODELS, assert_factors_equal, data, mlp, mlp_batches, opt_factors, optim, plain, train_step,
)


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_stat_fraction_uses_the_first_examples(model_name, estimator):
    """Schedule(stat_fraction=τ₁): the factors of the first ⌈τ₁ N⌉ examples (τ₁ N = 2.5 here)."""
    O = optim()
    model = MODELS[model_name]()
    x, y = data(model, 10)
    expected = ref.kfac_factors(model, x[:3], y[:3], "categorical", estimator)
    schedule = O.Schedule(decay=0.0, stat_fraction=0.25, stat_min_examples=1)
    opt = O.KFAC(model, estimator=estimator, schedule=schedule)
    train_step(opt, model, x, y)
    assert_factors_equal(opt_factors(opt, model), expected, "first 3 of 10 examples")


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_stat_rows_rotate_through_a_repeated_batch(estimator):
    """Full-batch training with τ₁ N = 3 of 10 rows: the statistics steps take rows 0-2, 3-5,
    6-8, then 9, 0, 1 (wrapping), so every example enters the factors in turn."""
    O = optim()
    model = mlp(3)
    x, y = data(model, 10)
    schedule = O.Schedule(decay=0.0, stat_fraction=0.25, stat_min_examples=1)
    opt = O.KFAC(model, estimator=estimator, schedule=schedule, step_policy=plain())
    for rows in ([0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]):
        expected = ref.kfac_factors(model, x[rows], y[rows], "categorical", estimator)
        train_step(opt, model, x, y)
        assert_factors_equal(opt_factors(opt, model), expected, f"rows {rows}")


def test_stat_min_examples_bounds_the_subset():
    """R = max(⌈τ₁ N⌉, stat_min_examples), all rows of a batch smaller than that."""
    O = optim()
    for minimum, rows in ((4, 4), (32, 10)):
        model = mlp(4)
        x, y = data(model, 10)
        expected = ref.kfac_factors(model, x[:rows], y[:rows], "categorical", "exact")
        schedule = O.Schedule(decay=0.0, stat_fraction=0.125, stat_min_examples=minimum)
        opt = O.KFAC(model, estimator="exact", schedule=schedule, step_policy=plain())
        train_step(opt, model, x, y)
        assert_factors_equal(opt_factors(opt, model), expected, f"first {rows} rows")


def test_default_schedules():
    """K-FAC's statistics use Martens & Grosse's τ₁ = 1/8 of each batch (at least 32 examples);
    EKFAC's and NGD's the whole batch. On a batch of 64, K-FAC's first factors are those of the
    first 32 examples."""
    O = optim()
    assert O.KFAC(mlp(5)).schedule == O.Schedule(stat_fraction=1 / 8, stat_min_examples=32)
    assert O.EKFAC(mlp(5)).schedule.stat_fraction == 1.0
    assert O.NGD(mlp(5)).schedule.stat_fraction == 1.0
    model = mlp(5)
    x, y = data(model, 64)
    expected = ref.kfac_factors(model, x[:32], y[:32], "categorical", "exact")
    opt = O.KFAC(model, estimator="exact", step_policy=plain())
    train_step(opt, model, x, y)
    assert_factors_equal(opt_factors(opt, model), expected, "first 32 of 64 examples")


def test_stat_fraction_is_refused_by_ngd():
    O = optim()
    with pytest.raises(ValueError, match="stat_fraction"):
        O.NGD(mlp(0), schedule=O.Schedule(stat_fraction=0.5, decay=0.0))


def _averaged_run(schedule, steps, batches, estimator="exact"):
    """Run KFAC, return per step: (factors after the step, reference batch factors or None)."""
    O = optim()
    model = mlp(2)
    opt = O.KFAC(model, estimator=estimator, schedule=schedule, step_policy=plain(), lr=0.1)
    out = []
    for k in range(steps):
        x, y = batches[k]
        is_stats = k % schedule.stat_every == 0
        batch = ref.kfac_factors(model, x, y, "categorical", estimator) if is_stats else None
        train_step(opt, model, x, y)
        out.append((opt_factors(opt, model), batch))
    return out


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.95])
def test_running_average_of_factors(decay):
    O = optim()
    steps = 4
    run = _averaged_run(O.Schedule(decay=decay, inverse_every=1), steps, mlp_batches(steps))
    expected = None
    for k, (actual, batch) in enumerate(run, start=1):
        rho = min(1 - 1 / k, decay)
        if expected is None:
            expected = batch
        else:
            expected = {name: [(rho * A + (1 - rho) * Ab, rho * G + (1 - rho) * Gb)
                               for (A, G), (Ab, Gb) in zip(expected[name], batch[name])]
                        for name in expected}
        assert_factors_equal(actual, expected, f"decay={decay}, after statistics update {k}")


def test_statistics_only_every_stat_every_steps():
    O = optim()
    steps = 5
    run = _averaged_run(O.Schedule(stat_every=2, decay=0.5, inverse_every=1), steps, mlp_batches(steps))
    expected, k = None, 0
    for step, (actual, batch) in enumerate(run):
        if step % 2 == 0:
            k += 1
            rho = min(1 - 1 / k, 0.5)
            expected = batch if expected is None else {
                name: [(rho * A + (1 - rho) * Ab, rho * G + (1 - rho) * Gb)
                       for (A, G), (Ab, Gb) in zip(expected[name], batch[name])]
                for name in expected}
        else:
            previous = run[step - 1][0]
            for name in actual:  # untouched, bit for bit
                for (A, G), (Ap, Gp) in zip(actual[name], previous[name]):
                    assert torch.equal(A, Ap) and torch.equal(G, Gp), f"step {step} changed the factors"
        assert_factors_equal(actual, expected, f"stat_every=2, step {step}")
