"""Distributed ``natgrad train``: DDP on gloo processes (CPU), through the CLI (``--nproc``, torchrun's
elastic agent) and the Python API (:func:`distributed_harness.run_ranks`).

Process start-up dominates (a few seconds per launch on a shared 2-core machine), so each launch
serves several assertions.

The spawned ranks import this module before the harness calls init_process_group, so torch._dynamo
is imported before the group exists: imported after, it keeps the group alive past
destroy_process_group, and a gloo group alive at interpreter exit sometimes aborts the process
(pytorch/pytorch#190489; see natgrad.training_dist.process_group_from_env)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  before the harness joins a group in the spawned ranks: see below

import natgrad.cli.main as cli
from distributed_harness import run_ranks
from natgrad.registry import OPTIMIZERS, OptimizerSpec, register_optimizer
from natgrad.tasks import get_task
from natgrad.training import CHECKPOINT, run, train

STEPS = 14  # past the first epoch (12 batches of 128): the epoch's last batch of 29 splits 15/14


@pytest.fixture(scope="module")
def digits():
    return get_task("digits-mlp").load()


def _env(**extra) -> dict:
    src = str(Path(cli.__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _natgrad(*argv, env=None, timeout=120):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "natgrad.cli.main", *argv], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)
    return done, time.perf_counter() - started


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _params(path):
    return torch.load(path / CHECKPOINT, weights_only=True)["model"]


def _close(a, b, tol=1e-5):
    for key, value in a.items():
        assert torch.allclose(value, b[key], rtol=tol, atol=tol), key


# --------------------------------------------------------------------------- the CLI

def test_cli_nproc_2_trains_like_one_process_and_writes_once(tmp_path, digits):
    out = tmp_path / "two"
    done, _ = _natgrad("train", "--task", "digits-mlp", "--optimizer", "sgd", "--nproc", "2", "--steps", str(STEPS),
                       "--checkpoint-every", "5", "--out", str(out), "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("digits-mlp / sgd") == 1 and "wrote" in done.stdout  # rank 0 prints
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "summary.json"]
    records = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(STEPS + 1))  # written once, by rank 0
    ck = torch.load(out / CHECKPOINT, weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rank_rngs"]) == 2 and ck["step"] == STEPS
    assert not torch.equal(ck["rank_rngs"][0], ck["rank_rngs"][1])  # each rank its own stream
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batch_size"] == 128 and summary["steps"] == STEPS

    one = tmp_path / "one"
    reference = train("digits-mlp", "sgd", steps=STEPS, out=one, progress=False, data=digits)
    assert [r["train_loss"] for r in records[1:]] == pytest.approx(
        [r["train_loss"] for r in _lines(one / "metrics.jsonl")[1:]], rel=1e-5)
    assert summary["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=1e-5)
    _close(_params(out), _params(one))


def test_cli_failing_rank_ends_every_rank_with_one_clear_message(tmp_path):
    done, seconds = _natgrad("train", "--task", "digits-mlp", "--optimizer", "sgd", "--nproc", "2", "--steps", "20",
                             "--out", str(tmp_path), "-q", env=_env(NATGRAD_TEST_FAIL="1:3"))
    assert done.returncode == 1
    first = done.stderr.splitlines()[0]
    assert first.startswith("natgrad: error: rank 1 of 2 failed: RuntimeError: injected failure"), done.stderr
    assert "every rank has been stopped" in done.stderr and "Traceback" not in done.stderr
    assert seconds < 60
    assert not (tmp_path / "summary.json").exists()


def test_cli_hung_rank_is_ended_by_the_timeout(tmp_path):
    done, seconds = _natgrad("train", "--task", "digits-mlp", "--optimizer", "sgd", "--nproc", "2", "--steps", "20",
                             "--timeout", "3", "--out", str(tmp_path), "-q", env=_env(NATGRAD_TEST_FAIL="1:3:hang"))
    assert done.returncode == 1
    assert done.stderr.startswith("natgrad: error: rank 0 of 2 failed: DistributedError"), done.stderr
    assert "Timed out" in done.stderr and "rank 1" in done.stderr and "Traceback" not in done.stderr
    assert seconds < 60


def test_cli_batch_size_must_divide_over_the_processes(tmp_path, capsys):
    code = cli.main(["train", "--task", "digits-mlp", "--optimizer", "sgd", "--nproc", "3", "--steps", "2",
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "the batch size (128) is the global batch and must be divisible by the number of " \
        "processes (3)" in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- the Python API
# natgrad train's kfac/ekfac/ngd sample the Fisher ("mc"); the exact Fisher is deterministic, so
# R ranks must match one process with it. The registry has no estimator option: register one.

def _exact(class_name):
    def make(model, task, lr, damping, inputs):
        import natgrad.optim as optim

        # statistics of whole batches: the ranks' subsets (stat_fraction < 1) are rows of their own
        # batches, not the one process's rows of the global batch
        return getattr(optim, class_name)(model, likelihood=task.likelihood, estimator="exact", lr=lr or 0.3,
                                          schedule=optim.Schedule())

    return OptimizerSpec(make, lr_grid=(0.3,), curvature=True)


EXACT = {"kfac-exact": "KFAC", "ekfac-exact": "EKFAC"}


@pytest.fixture
def exact_optimizers():
    for name, class_name in EXACT.items():
        register_optimizer(name, _exact(class_name))
    yield
    for name in EXACT:
        del OPTIMIZERS[name]


def _guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # every rank must raise, and say why
        return f"{type(exc).__name__}: {exc}"


EQUIVALENT = ("sgd", "adam", "kfac-exact", "ekfac-exact")
# kfac samples ("mc"): resuming needs every rank's RNG state; ngd's dense Fisher is slow: 3 steps
RESUMED = {"kfac": STEPS, "adam": STEPS, "ekfac": 8, "prong": 8, "ngd": 3}


def _on_two_ranks(rank, world, tmp, data):
    for name, class_name in EXACT.items():
        register_optimizer(name, _exact(class_name))
    tmp = Path(tmp)
    results = {}
    for optimizer in EQUIVALENT:
        results[optimizer] = run("digits-mlp", optimizer, steps=STEPS, out=tmp / optimizer, progress=False,
                                 data=data, checkpoint_every=100).summary
    for optimizer, steps in RESUMED.items():  # interrupted (checkpoints every 3 steps), resumed
        full, part = tmp / f"full-{optimizer}", tmp / f"part-{optimizer}"
        train("digits-mlp", optimizer, steps=steps, out=full, progress=False, data=data, checkpoint_every=3, seed=3)
        train("digits-mlp", optimizer, steps=steps // 2 + 1, out=part, progress=False, data=data,
              checkpoint_every=3, seed=3)
        results[f"resumed-{optimizer}"] = train("digits-mlp", optimizer, steps=steps, out=part, resume=True,
                                                progress=False, data=data)
    results["budget"] = train("digits-mlp", "adam", time_budget=0.3, progress=False, data=data)  # rank 0's clock
    results["seed"] = _guarded(train, "digits-mlp", "sgd", steps=2, progress=False, data=data, seed=rank)
    results["batch"] = _guarded(train, "digits-mlp", "sgd", steps=2, progress=False, data=data, batch_size=127)
    (tmp / "file").write_text("")
    results["out"] = _guarded(train, "digits-mlp", "sgd", steps=2, progress=False, data=data, out=tmp / "file")
    return results


def test_two_ranks_api_equivalence_resume_and_errors(tmp_path, digits, exact_optimizers, capsys):
    results = run_ranks(2, _on_two_ranks, str(tmp_path), digits)
    for optimizer in EQUIVALENT:
        assert results[0][optimizer] == results[1][optimizer]  # every rank returns rank 0's summary
        one = tmp_path / f"one-{optimizer}"
        reference = train("digits-mlp", optimizer, steps=STEPS, out=one, progress=False, data=digits)
        assert results[0][optimizer]["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=1e-4)
        _close(_params(tmp_path / optimizer), _params(one), 1e-4)

    for optimizer, steps in RESUMED.items():
        full, part = tmp_path / f"full-{optimizer}", tmp_path / f"part-{optimizer}"
        a, b = _lines(full / "metrics.jsonl"), _lines(part / "metrics.jsonl")
        assert [r["step"] for r in b] == list(range(steps + 1)), optimizer
        assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b], optimizer  # bit for bit
        for key, value in _params(full).items():
            assert torch.equal(value, _params(part)[key]), (optimizer, key)
        assert results[0][f"resumed-{optimizer}"]["final_train_loss"] == a[-1]["full_train_loss"], optimizer

    assert results[0]["budget"]["stopped_by"] == "time_budget" and results[0]["budget"]["steps"] > 1
    for rank in (0, 1):
        assert "differ from rank 0" in results[rank]["seed"] and results[rank]["seed"].startswith("ValueError")
        assert results[rank]["batch"] == ("ValueError: the batch size (127) is the global batch and must be "
                                          "divisible by the number of processes (2): use e.g. --batch-size 126")
        assert results[rank]["out"].startswith("ValueError: output path") and "not a directory" in results[rank]["out"]

    with pytest.raises(ValueError, match=r"written by a run on 2 process\(es\); resume it on 2 \(natgrad train "
                       r"--nproc 2\), not 1"):
        train("digits-mlp", "adam", steps=STEPS + 2, out=tmp_path / "full-adam", resume=True, progress=False,
              data=digits)
    code = cli.main(["train", "--nproc", "4", "--steps", "20", "--resume", "--out", str(tmp_path / "full-adam")])
    assert code == 2 and "written by a run on 2 process(es)" in capsys.readouterr().err  # before launching


def _on_three_ranks(rank, world, tmp, data):
    register_optimizer("kfac-exact", _exact("KFAC"))
    tmp = Path(tmp)
    summaries = [run("digits-mlp", optimizer, steps=STEPS, batch_size=129, out=tmp / f"three-{optimizer}",
                     progress=False, data=data).summary for optimizer in ("sgd", "kfac-exact")]
    # resumed on 3 ranks, where a sum's rounding depends on the order of the terms
    train("digits-mlp", "kfac", steps=6, batch_size=129, out=tmp / "full-kfac", progress=False, data=data,
          checkpoint_every=3, seed=3)
    train("digits-mlp", "kfac", steps=4, batch_size=129, out=tmp / "part-kfac", progress=False, data=data,
          checkpoint_every=3, seed=3)
    train("digits-mlp", "kfac", steps=6, batch_size=129, out=tmp / "part-kfac", resume=True, progress=False, data=data)
    return summaries


def test_three_ranks_equal_one_process(tmp_path, digits, exact_optimizers):
    results = run_ranks(3, _on_three_ranks, str(tmp_path), digits)
    assert results[0] == results[1] == results[2]
    for optimizer, summary in zip(("sgd", "kfac-exact"), results[0]):
        one = tmp_path / f"one-{optimizer}"
        reference = train("digits-mlp", optimizer, steps=STEPS, batch_size=129, out=one, progress=False, data=digits)
        assert summary["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=1e-4)
        _close(_params(tmp_path / f"three-{optimizer}"), _params(one), 1e-4)
    a, b = _lines(tmp_path / "full-kfac" / "metrics.jsonl"), _lines(tmp_path / "part-kfac" / "metrics.jsonl")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # bit for bit
    for key, value in _params(tmp_path / "full-kfac").items():
        assert torch.equal(value, _params(tmp_path / "part-kfac")[key]), key
