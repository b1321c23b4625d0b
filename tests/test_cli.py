"""The ``natgrad`` command: ``natgrad report`` in-process and as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import natgrad.cli.main as cli

QUICK = ["--steps", "5", "--examples", "32", "--hidden", "8", "-q"]
MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_report_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    code, out, err = run(["report", *QUICK, "--structures", "kfac,kron_sum", "--json",
                          str(path)], capsys)
    assert code == 0, err
    assert "rel.err" in out and "kfac" in out and "kron_sum" in out
    assert f"wrote {path}" in out
    lines = [line.split()[0] for line in out.splitlines() if line[:1].isalnum()]
    assert {"fc1", "fc2", "all"} <= set(lines)
    data = json.loads(path.read_text())
    assert data["structures"] == ["kfac", "kron_sum"]
    assert data["layers"] == ["fc1", "fc2", "all"]
    assert data["metadata"]["examples"] == 32 and data["metadata"]["train_steps"] == 5
    assert data["metadata"]["params"] == 64 * 8 + 8 + 8 * 10 + 10
    assert data["rel_error"]["kron_sum"]["fc1"] < 1e-9


def test_report_out_dir_two_hidden_layers(tmp_path, capsys):
    code, out, err = run(["report", "--steps", "0", "--examples", "16", "--hidden", "8,4", "-q",
                          "--structures", "diagonal", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["layers"] == ["fc1", "fc2", "fc3", "all"]
    assert data["metadata"]["model"] == "MLP 64-8-4-10 tanh"


def test_report_default_json_path_and_no_json(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["report", "--steps", "0", "--examples", "8", "--hidden", "4", "-q",
            "--structures", "kfac"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "results" / "report.json").read_text())["layers"][-1] == "all"
    (tmp_path / "results" / "report.json").unlink()
    code, out, err = run([*argv, "--no-json"], capsys)
    assert code == 0, err
    assert "wrote" not in out and not (tmp_path / "results" / "report.json").exists()


def test_report_mnist(tmp_path, capsys):
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test files not found in {MNIST_DIR}")
    code, out, err = run(["report", "--data", "mnist", "--mnist-dir", str(MNIST_DIR),
                          "--steps", "2", "--examples", "8", "--hidden", "2", "-q",
                          "--structures", "kfac", "--no-json"], capsys)
    assert code == 0, err
    assert out.startswith("natgrad report: mnist, MLP 784-2-10 tanh")


@pytest.mark.parametrize("argv, match", [
    (["report", "--estimator", "bogus"], "invalid choice"),
    (["report", "--examples", "0"], "--examples"),
    (["report", "--damping", "-1"], "--damping"),
    (["report", "--damping", "nan"], "--damping"),
    (["report", "--hidden", "x"], "--hidden"),
    (["report", "--structures", "kfac,bogus"], "bogus"),
    (["report", "--json", "a.json", "--out", "d"], "not allowed with"),
    (["report", "--json", "a.json", "--no-json"], "not allowed with"),
    (["frobnicate"], "invalid choice"),
    (["train", "--nproc", "0"], "--nproc"),
    (["train", "--timeout", "0"], "--timeout"),
])
def test_usage_errors_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["report", "--data", "mnist"], "--data mnist needs --mnist-dir"),
    (["report", "--mnist-dir", "x"], "--mnist-dir is only used with --data mnist"),
    (["report", "--data", "mnist", "--mnist-dir", "/nonexistent/mnist"], "does not exist"),
    (["report", "--steps", "0", "--examples", "5000"], "examples=5000"),
    (["report", "--steps", "0", "--hidden", "400"], "trainable parameters"),
    (["report", "--samples", "4"], "only applies to estimator='mc'"),
    (["train", "--task", "cifar", "--nproc", "2"], "unknown task 'cifar'"),
])
def test_natgrad_errors_exit_2_without_traceback(argv, match, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("natgrad: error: ") and match in err
    assert "Traceback" not in err


def test_traceback_flag_reraises():
    with pytest.raises(ValueError, match="mnist-dir"):
        cli.main(["--traceback", "report", "--data", "mnist"])


def test_no_command_prints_help(capsys):
    code, out, err = run([], capsys)
    assert code == 2 and "report" in err


def _env() -> dict:
    # make the subprocess import this checkout's natgrad even when it is not installed
    src = str(Path(cli.__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_subprocess(tmp_path):
    path = tmp_path / "r.json"
    ok = subprocess.run(
        [sys.executable, "-m", "natgrad.cli.main", "report", *QUICK, "--structures", "kfac",
         "--json", str(path)],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "rel.err" in ok.stdout and path.is_file()
    assert "training" not in ok.stderr  # no progress bar with -q
    bad = subprocess.run(
        [sys.executable, "-m", "natgrad.cli.main", "report", "--data", "mnist",
         "--mnist-dir", str(tmp_path / "missing")],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.startswith("natgrad: error: ") and "Traceback" not in bad.stderr


def test_checkpoint_write_failure_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """torch.save reports a full disk as RuntimeError: the CLI still gives a one-line error
    (exit 2, no traceback) and leaves no temporary file."""
    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    code, _, err = run(["train", "--task", "digits-mlp", "--optimizer", "sgd", "--steps", "2", "--out", str(out)],
                       capsys)
    assert code == 2 and "Traceback" not in err
    assert "could not write the checkpoint" in err
    assert not list(out.glob("*checkpoint*"))
