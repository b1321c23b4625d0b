"""natgrad.training: metrics, summary, checkpoints and bit-for-bit resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from natgrad.training import CHECKPOINT, OPTIMIZERS, OptimizerSpec, register_optimizer, run, train


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _params(path):
    return torch.load(path / CHECKPOINT, weights_only=True)["model"]


def test_short_run_writes_metrics_summary_checkpoint(tmp_path):
    summary = train("digits-mlp", "kfac", steps=12, out=tmp_path, progress=False, eval_every=5)
    records = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(13))
    assert records[0]["train_loss"] is None and records[0]["full_train_loss"] > 1.5
    assert {"step", "epoch", "time_s", "train_loss"} <= set(records[3])
    assert "full_train_loss" not in records[3]
    evals = [r["step"] for r in records if "full_train_loss" in r]
    assert evals == [0, 5, 10, 12]  # every 5 steps and the last
    assert {"test_loss", "test_accuracy"} <= set(records[5])
    times = [r["time_s"] for r in records]
    assert times == sorted(times) and times[-1] == pytest.approx(summary["time_s"])
    assert records[12]["epoch"] == pytest.approx(1.0)  # 12 batches of 128 cover 1437 examples
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["steps"] == 12 and summary["stopped_by"] == "steps" and summary["optimizer"] == "kfac"
    assert summary["final_train_loss"] == records[-1]["full_train_loss"]
    assert 0 <= summary["final_test_accuracy"] <= 1 and summary["target_loss"] == 0.05
    ck = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ck["step"] == 12 and {"model", "optimizer", "torch_rng", "data_rng"} <= set(ck)
    assert not list(tmp_path.glob("*.tmp"))


def test_eval_seconds_evaluates_by_training_time():
    """With eval_seconds, a step is an evaluation step once that much training time passed since
    the last evaluation: every step for a tiny interval, only the step-count ones for a huge one."""
    run_ = run("digits-mlp", "sgd", steps=7, progress=False, eval_every=100, eval_seconds=1e-9)
    evals = [r for r in run_.records if "full_train_loss" in r]
    assert [r["step"] for r in evals] == list(range(8))
    run_ = run("digits-mlp", "sgd", steps=7, progress=False, eval_every=3, eval_seconds=1e6)
    assert [r["step"] for r in run_.records if "full_train_loss" in r] == [0, 3, 6, 7]
    assert run_.summary["eval_seconds"] == 1e6
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="eval_seconds"):
            run("digits-mlp", "sgd", steps=2, progress=False, eval_seconds=bad)


def test_epochs_and_time_budget_limits():
    s = train("digits-mlp", "sgd", epochs=2, progress=False)
    assert s["steps"] == 24 and s["stopped_by"] == "epochs" and s["epochs"] == 2
    s = train("digits-mlp", "adam", time_budget=0.2, progress=False)
    assert s["stopped_by"] == "time_budget" and s["time_s"] >= 0.2 and s["steps"] > 1


def test_target_is_reached_on_digits():
    s = train("digits-mlp", "kfac", steps=80, progress=False)
    assert s["steps_to_target"] is not None and s["steps_to_target"] % 5 == 0
    assert 0 < s["time_to_target_s"] <= s["time_s"] and s["final_train_loss"] < 0.05


@pytest.mark.parametrize("optimizer", ["kfac", "adam"])
def test_resume_equals_uninterrupted_run(tmp_path, optimizer):
    """Stop at 11 (mid-epoch), resume to 30: same losses and parameters bit for bit."""
    full, part = tmp_path / "full", tmp_path / "part"
    train("digits-mlp", optimizer, steps=30, out=full, progress=False, checkpoint_every=7)
    train("digits-mlp", optimizer, steps=11, out=part, progress=False, checkpoint_every=7)
    assert torch.load(part / CHECKPOINT, weights_only=True)["step"] == 11
    summary = train("digits-mlp", optimizer, steps=30, out=part, resume=True, progress=False)
    a, b = _lines(full / "metrics.jsonl"), _lines(part / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(31))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    for key, value in _params(full).items():
        assert torch.equal(value, _params(part)[key]), key
    assert summary["final_train_loss"] == json.loads((full / "summary.json").read_text())["final_train_loss"]


def test_resume_after_a_crash_drops_lines_after_the_checkpoint(tmp_path):
    """A run killed after its checkpoint at step 7 (metrics written up to 12) resumes exactly."""
    full, part = tmp_path / "full", tmp_path / "part"
    train("digits-mlp", "kfac", steps=20, out=full, progress=False)
    train("digits-mlp", "kfac", steps=7, out=part, progress=False)
    saved = (part / CHECKPOINT).read_bytes()
    train("digits-mlp", "kfac", steps=12, out=part, resume=True, progress=False)
    (part / CHECKPOINT).write_bytes(saved)  # as if killed before the end-of-run checkpoint
    train("digits-mlp", "kfac", steps=20, out=part, resume=True, progress=False)
    a, b = _lines(full / "metrics.jsonl"), _lines(part / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(21))
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


def test_resume_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        train("digits-mlp", "kfac", steps=2, out=tmp_path, resume=True, progress=False)
    train("digits-mlp", "kfac", steps=2, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="optimizer='kfac'"):
        train("digits-mlp", "adam", steps=4, out=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="lr=1.0"):
        train("digits-mlp", "kfac", steps=4, lr=0.5, out=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="resume needs"):
        train("digits-mlp", "kfac", steps=2, resume=True, progress=False)


def test_fresh_run_replaces_an_old_one(tmp_path):
    train("digits-mlp", "sgd", steps=6, out=tmp_path, progress=False)
    train("digits-mlp", "sgd", steps=3, out=tmp_path, progress=False)
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_zero_damping_is_accepted(tmp_path):
    """The issue's bad input is damping < 0; 0 is K-FAC's own business (it trains)."""
    summary = train("digits-mlp", "kfac", steps=2, damping=0.0, out=tmp_path / "o", progress=False)
    assert summary["damping"] == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'; known optimizers: sgd, adam, kfac"),
    ({"lr": 0.0}, "lr must be a positive number"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"steps": -3}, "steps must be a positive integer"),
    ({"batch_size": 2.5}, "batch_size must be a positive integer"),
    ({"optimizer": "sgd", "damping": 0.1}, "damping is only used"),
    ({"damping": -1e-3}, "damping must be a number >= 0"),
    ({"task": "cifar"}, "unknown task 'cifar'"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"task": "digits-mlp", "optimizer": "kfac", "steps": 2, "out": tmp_path / "o", "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        train(args.pop("task"), args.pop("optimizer"), **args)
    assert not (tmp_path / "o").exists()


def test_divergence_stops_the_run():
    s = train("digits-mlp", "sgd", lr=1e38, steps=50, progress=False)  # weights overflow to inf
    assert s["diverged"] and s["stopped_by"] == "diverged" and s["steps"] < 50
    assert s["steps_to_target"] is None


def test_registering_an_optimizer_is_one_line():
    register_optimizer("rmsprop", OptimizerSpec(lambda m, t, lr, d, x: torch.optim.RMSprop(m.parameters(), lr=lr or 1e-3),
                                                lr_grid=(1e-3,)))
    try:
        result = run("digits-mlp", "rmsprop", steps=3, progress=False)
        assert result.summary["optimizer"] == "rmsprop" and len(result.records) == 4
    finally:
        del OPTIMIZERS["rmsprop"]


@pytest.mark.parametrize("optimizer", ["ekfac", "ngd", "sgd", "prong"])
def test_other_optimizers_resume(tmp_path, optimizer):
    full, part = tmp_path / "full", tmp_path / "part"
    train("digits-mlp", optimizer, steps=6, out=full, progress=False)
    train("digits-mlp", optimizer, steps=3, out=part, progress=False)
    train("digits-mlp", optimizer, steps=6, out=part, resume=True, progress=False)
    for key, value in _params(full).items():
        assert torch.equal(value, _params(part)[key]), key
    shutil.rmtree(part)


MNIST_DIR = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="no MNIST t10k files")
def test_autoencoder_reports_reconstruction_error_not_accuracy(tmp_path):
    s = train("mnist-autoencoder", "kfac", steps=2, out=tmp_path, progress=False, mnist_dir=MNIST_DIR)
    assert s["final_test_accuracy"] is None and s["final_test_reconstruction_error"] > 0
    assert s["target_loss"] == 130.0 and 100 < s["final_train_loss"] < 1000  # nats per image
    last = _lines(tmp_path / "metrics.jsonl")[-1]
    assert last["test_accuracy"] is None and last["test_reconstruction_error"] > 0


def test_adaptive_damping_gets_a_closure_and_resumes(tmp_path):
    import natgrad.optim as optim

    def make(m, t, lr, d, x):
        return optim.KFAC(m, lr=lr or 1.0, damping=d or 1.0, likelihood=t.likelihood,
                          damping_policy=optim.DampingPolicy(adaptive=True, adapt_every=2))

    register_optimizer("kfac-lm", OptimizerSpec(make, lr_grid=(1.0,), curvature=True))
    try:
        full, part = tmp_path / "full", tmp_path / "part"
        train("digits-mlp", "kfac-lm", steps=8, out=full, progress=False)
        ck = torch.load(full / CHECKPOINT, weights_only=True)
        assert ck["optimizer"]["param_groups"][0]["damping"] != 1.0  # Levenberg-Marquardt moved it
        train("digits-mlp", "kfac-lm", steps=5, out=part, progress=False)
        train("digits-mlp", "kfac-lm", steps=8, out=part, resume=True, progress=False)
        for key, value in _params(full).items():
            assert torch.equal(value, _params(part)[key]), key
    finally:
        del OPTIMIZERS["kfac-lm"]


def test_task_specific_settings_come_from_the_registry():
    from natgrad.registry import get_optimizer
    from natgrad.tasks import get_task

    auto, digits = get_task("mnist-autoencoder"), get_task("digits-mlp")
    assert get_optimizer("sgd").grid(auto) == (3e-3, 1e-2, 3e-2) and get_optimizer("sgd").grid(digits) == (0.03, 0.1, 0.3)
    assert get_optimizer("adam").grid(auto) == get_optimizer("adam").grid(digits)
    opt = get_optimizer("kfac").make(auto.make_model(), auto, None, None, None)
    assert opt.param_groups[0]["damping"] == 1e-6 and opt.step_policy.kl_clip == 1.0
    opt = get_optimizer("kfac").make(auto.make_model(), auto, 0.3, 1e-3, None)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["damping"]) == (0.3, 1e-3)


def test_evaluation_runs_in_eval_mode_and_restores_the_mode():
    """Batch norm is scored with its running statistics and keeps them; the mode comes back."""
    from natgrad.tasks import Data, get_task
    from natgrad.training import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 10)).double()
    x = torch.randn(50, 64, dtype=torch.float64) * 3 + 1
    y = torch.randint(0, 10, (50,))
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    result = evaluate(get_task("digits-mlp"), model, Data(x, y, x, y))
    assert model.training
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x), y).item()
    assert result["full_train_loss"] == pytest.approx(expected, rel=1e-12)
