"""Distributed ``natgrad train``: DDP on gloo processes (CPU), through the CLI (``--nproc``, torchrun's
elastic agent) and the Python API (:func:`distributed_harness.run_ranks`).

Process start-up dominates (a few seconds per launch on a shared 2-core machine), so each launch
serves several assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import natgrad.cli.main as cli
from distributed_harness import run_ranks
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

def _guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # every rank must raise, and say why
        return f"{type(exc).__name__}: {exc}"


def _on_two_ranks(rank, world, tmp, data):
    tmp = Path(tmp)
    results = {}
    for optimizer in ("sgd", "adam"):
        results[optimizer] = run("digits-mlp", optimizer, steps=STEPS, out=tmp / optimizer, progress=False,
                                 data=data, checkpoint_every=100).summary
    # interrupted at step 7 (checkpoints at 5 and 7), resumed to STEPS
    full, part = tmp / "full", tmp / "part"
    train("digits-mlp", "adam", steps=STEPS, out=full, progress=False, data=data, checkpoint_every=5, seed=3)
    train("digits-mlp", "adam", steps=7, out=part, progress=False, data=data, checkpoint_every=5, seed=3)
    results["resumed"] = train("digits-mlp", "adam", steps=STEPS, out=part, resume=True, progress=False, data=data)
    results["seed"] = _guarded(train, "digits-mlp", "sgd", steps=2, progress=False, data=data, seed=rank)
    results["batch"] = _guarded(train, "digits-mlp", "sgd", steps=2, progress=False, data=data, batch_size=127)
    (tmp / "file").write_text("")
    results["out"] = _guarded(train, "digits-mlp", "sgd", steps=2, progress=False, data=data, out=tmp / "file")
    return results


def test_two_ranks_api_equivalence_resume_and_errors(tmp_path, digits):
    results = run_ranks(2, _on_two_ranks, str(tmp_path), digits)
    for optimizer in ("sgd", "adam"):
        assert results[0][optimizer] == results[1][optimizer]  # every rank returns rank 0's summary
        one = tmp_path / f"one-{optimizer}"
        reference = train("digits-mlp", optimizer, steps=STEPS, out=one, progress=False, data=digits)
        assert results[0][optimizer]["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=1e-5)
        _close(_params(tmp_path / optimizer), _params(one))

    a, b = _lines(tmp_path / "full" / "metrics.jsonl"), _lines(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(STEPS + 1))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # bit for bit
    for key, value in _params(tmp_path / "full").items():
        assert torch.equal(value, _params(tmp_path / "part")[key]), key
    assert results[0]["resumed"]["final_train_loss"] == a[-1]["full_train_loss"]

    for rank in (0, 1):
        assert "differ from rank 0" in results[rank]["seed"] and results[rank]["seed"].startswith("ValueError")
        assert results[rank]["batch"] == ("ValueError: the batch size (127) is the global batch and must be "
                                          "divisible by the number of processes (2): use e.g. --batch-size 126")
        assert results[rank]["out"].startswith("ValueError: output path") and "not a directory" in results[rank]["out"]

    with pytest.raises(ValueError, match=r"written by a run on 2 process\(es\); resume it on 2 \(not 1\)"):
        train("digits-mlp", "adam", steps=STEPS + 2, out=tmp_path / "full", resume=True, progress=False, data=digits)


def _on_three_ranks(rank, world, tmp, data):
    return run("digits-mlp", "sgd", steps=STEPS, batch_size=129, out=Path(tmp) / "three", progress=False,
               data=data).summary


def test_three_ranks_equal_one_process(tmp_path, digits):
    results = run_ranks(3, _on_three_ranks, str(tmp_path), digits)
    reference = train("digits-mlp", "sgd", steps=STEPS, batch_size=129, out=tmp_path / "one", progress=False,
                      data=digits)
    assert results[0] == results[1] == results[2]
    assert results[0]["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=1e-5)
    _close(_params(tmp_path / "three"), _params(tmp_path / "one"))
