"""natgrad.compare and the ``natgrad train`` / ``natgrad compare`` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import natgrad.cli.main as cli
from natgrad.compare import SUMMARY_KEYS, compare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_writes_the_three_files_with_the_exact_schema(tmp_path, capsys):
    out = tmp_path / "cmp"
    summary = compare("digits-mlp", ["sgd", "kfac"], budget=0.15, out=out, progress=False,
                      lr_grid={"sgd": [0.1, 0.3], "kfac": [1.0]})
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"results.md", "loss_vs_time.png", "loss_vs_steps.png", "summary.json"}
    assert not list(out.glob("*.tmp"))
    data = json.loads((out / "summary.json").read_text())
    assert data == json.loads(json.dumps(summary))
    assert list(data) == ["sgd", "kfac"]
    for name, row in data.items():
        assert list(row) == list(SUMMARY_KEYS)
        assert row["lr"] in {"sgd": (0.1, 0.3), "kfac": (1.0,)}[name]
        assert row["final_train_loss"] > 0 and 0 <= row["final_test_accuracy"] <= 1
        if row["steps_to_target"] is None:
            assert row["time_to_target_s"] is None
        else:
            assert isinstance(row["steps_to_target"], int) and row["time_to_target_s"] > 0
    table = (out / "results.md").read_text()
    assert table == printed
    header = "| optimizer | lr | steps to target | time to target (s) | final train loss | test loss | test accuracy |"
    assert header in table and "| sgd |" in table and "| kfac | 1 |" in table
    for png in ("loss_vs_time.png", "loss_vs_steps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((out / "runs.json").read_text())
    assert set(runs["sgd"]) == {"0.1", "0.3"}


def test_compare_two_seeds_reports_medians(tmp_path):
    summary = compare("digits-mlp", "adam", budget=0.1, seeds=2, out=None, progress=False, verbose=False,
                      lr_grid={"adam": [0.01]})
    assert list(summary) == ["adam"] and summary["adam"]["lr"] == 0.01


def test_compare_search_seeds_runs_the_other_seeds_at_the_chosen_lr(tmp_path, capsys):
    out = tmp_path / "cmp"
    summary = compare("digits-mlp", "sgd", budget=0.05, seeds=3, search_seeds=1, out=out, progress=False,
                      lr_grid={"sgd": [0.03, 0.3]})
    runs = json.loads((out / "runs.json").read_text())["sgd"]
    chosen = str(summary["sgd"]["lr"])
    assert len(runs[chosen]) == 3
    assert [len(v) for k, v in runs.items() if k != chosen] == [1]
    assert [r["summary"]["seed"] for r in runs[chosen]] == [0, 1, 2]
    assert "the learning-rate search used the first 1 seed" in capsys.readouterr().out
    with pytest.raises(ValueError, match="search_seeds"):
        compare("digits-mlp", "sgd", budget=0.05, seeds=2, search_seeds=3, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"optimizers": ["sgd", "rprop"]}, "unknown optimizer 'rprop'"),
    ({"task": "imagenet"}, "unknown task"),
    ({"budget": -1}, "budget must be a positive number"),
    ({"seeds": 0}, "seeds must be a positive integer"),
    ({"lr_grid": {"sgd": [0.1, 0.0]}}, "learning rate of 'sgd' must be a positive number"),
    ({"lr_grid": {"adam": [0.1]}}, "not compared: adam"),
])
def test_compare_bad_input(tmp_path, kwargs, match):
    args = {"task": "digits-mlp", "optimizers": ["sgd"], "budget": 0.1, "out": tmp_path / "o", "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        compare(**args)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- CLI

def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    code, text, err = _cli(["train", "--task", "digits-mlp", "--optimizer", "adam", "--steps", "6",
                            "--out", str(out), "-q"], capsys)
    assert code == 0, err
    assert "digits-mlp / adam" in text and "6 steps" in text and "target loss 0.05" in text
    assert {"metrics.jsonl", "checkpoint.pt", "summary.json"} <= {p.name for p in out.iterdir()}
    code, text, err = _cli(["train", "--steps", "9", "--out", str(out), "--resume", "-q"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 9
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 10
    code, text, err = _cli(["train", "--optimizer", "sgd", "--steps", "12", "--out", str(out), "--resume", "-q"], capsys)
    assert code == 2 and "optimizer='adam'" in err


def test_cli_compare(tmp_path, capsys):
    out = tmp_path / "c"
    code, text, err = _cli(["compare", "--optimizers", "sgd,adam", "--budget", "0.1", "--out", str(out), "-q"], capsys)
    assert code == 0, err
    assert "| optimizer | lr |" in text and "wrote" in text
    assert set(json.loads((out / "summary.json").read_text())) == {"sgd", "adam"}


@pytest.mark.parametrize("argv, match", [
    (["train", "--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'; known optimizers: sgd, adam, kfac, ekfac, ngd"),
    (["train", "--task", "cifar10"], "unknown task 'cifar10'; known tasks: digits-mlp"),
    (["train", "--lr", "0"], "lr must be a positive number"),
    (["train", "--lr", "-0.5"], "lr must be a positive number"),
    (["train", "--steps", "0"], "steps must be a positive integer"),
    (["train", "--optimizer", "adam", "--damping", "1e-3"], "damping is only used"),
    (["train", "--resume"], "no checkpoint to resume from"),
    (["train", "--task", "mnist-mlp", "--mnist-dir", "{tmp}/nowhere"], "MNIST folder"),
    (["train", "--task", "mnist-cnn", "--mnist-dir", "{tmp}"], "t10k-images-idx3-ubyte.gz"),
    (["compare", "--optimizers", "sgd,foo"], "unknown optimizer 'foo'"),
    (["compare", "--budget", "0"], "budget must be a positive number"),
    (["compare", "--seeds", "0"], "seeds must be a positive integer"),
    (["compare", "--task", "mnist-autoencoder", "--mnist-dir", "{tmp}/nowhere"], "MNIST folder"),
])
def test_cli_bad_input_exit_2_nothing_written(tmp_path, capsys, argv, match):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / "out"
    code, text, err = _cli([*argv, "--out", str(out), "-q"], capsys)
    assert code == 2
    assert err.startswith("natgrad: error: ") and match in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("command", ["train", "compare"])
def test_cli_unwritable_out(tmp_path, capsys, command):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, text, err = _cli([command, "--out", str(blocker / "sub"), "-q", "--budget", "0.1"], capsys)
    assert code == 2 and err.startswith("natgrad: error: cannot create output directory")
    code, text, err = _cli([command, "--out", str(blocker), "-q", "--budget", "0.1"], capsys)
    assert code == 2 and "is not a directory" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write in read-only directories")
def test_cli_read_only_out(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, text, err = _cli(["train", "--out", str(ro), "-q", "--steps", "2"], capsys)
        assert code == 2 and "cannot write" in err
    finally:
        ro.chmod(0o700)


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "natgrad.cli.main", "train", "--optimizer", "nope",
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("natgrad: error: unknown optimizer 'nope'") and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
