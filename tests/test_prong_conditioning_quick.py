"""benchmarks/prong_conditioning.py --quick runs and writes its JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_prong_conditioning_quick_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "conditioning.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "prong_conditioning.py"), "--quick", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["task"] == "digits-mlp" and result["settings"]["quick"] is True
    steps = result["steps"]
    assert steps == [0, 20, 40, 60]
    for run in ("sgd", "prong"):
        assert len(result[run]["loss"]) == len(steps)
        assert set(result[run]["conditions"]) == {"0", "2"}
        for layer in result[run]["conditions"].values():
            assert set(layer) == {"input_factor", "kfac_block"}
            assert all(len(v) == len(steps) for v in layer.values())
            assert all(x is None or x >= 1.0 for v in layer.values() for x in v)
    # the point of the diagnostic: whitening conditions the hidden layer's input factor
    assert result["prong"]["conditions"]["2"]["input_factor"][-1] < result["sgd"]["conditions"]["2"]["input_factor"][-1]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
