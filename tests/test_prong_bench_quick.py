"""benchmarks/prong_bench.py --quick runs and writes its JSON (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prong_bench_quick_writes_json(tmp_path):
    out = tmp_path / "prong.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "prong_bench.py"), "--quick", "--synthetic",
               "--every", "10", "--samples", "200", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == {"sgd", "whitened", "reparametrize"}
    assert all(v > 0 for v in result["seconds"].values())
    expected = result["seconds"]["reparametrize"] / (10 * result["seconds"]["whitened"])
    assert abs(result["reparam_overhead"] - expected) <= 1e-12 * expected
    assert result["settings"] == {"every": 10, "samples": 200, "batch_size": 256}
