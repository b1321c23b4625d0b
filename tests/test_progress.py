"""natgrad.progress: plain progress lines where stderr is not a terminal."""

import pytest

from natgrad import progress
from natgrad.training import train


def test_lines_every_interval_and_at_close(capsys):
    bar = progress.LineProgress(total=3, desc="task opt", unit="step", interval=0.0)
    bar.set_postfix({"epoch": "0.50", "loss": "0.25"})
    bar.update(1)
    bar.update(1)
    bar.close()  # nothing new since the last line: no repeat
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["task opt: 1/3 steps  epoch 0.50 loss 0.25", "task opt: 2/3 steps  epoch 0.50 loss 0.25"]


def test_quiet_within_the_interval(capsys):
    bar = progress.LineProgress(total=None, desc="d", unit="run", interval=3600.0)
    bar.update(5)
    bar.close()
    assert capsys.readouterr().err == ""


def test_mode_validation():
    assert progress.progress_bar(False, 3, "d", "step") is None
    assert isinstance(progress.progress_bar("lines", 3, "d", "step"), progress.LineProgress)
    with pytest.raises(ValueError, match="progress must be"):
        progress.progress_bar("yes", 3, "d", "step")


def test_training_reports_epoch_loss_accuracy_and_time_as_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    train("digits-mlp", "sgd", steps=20, out=tmp_path / "o", progress="lines")
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("digits-mlp sgd: 20/20 steps")
    assert all(key in last for key in ("epoch", "loss", "acc", "time"))
