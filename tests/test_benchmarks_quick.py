"""Smoke test of the Fisher benchmark: run ``benchmarks/fisher_bench.py --quick`` in a
subprocess and check the JSON it writes (schema, completeness, internal consistency).
No assertion on time: only that every case ran and reported sane numbers."""
from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "fisher_bench.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common as C  # noqa: E402
import _measure as M  # noqa: E402

# Every figure the benchmark must report (docs: benchmarks/README.md).
REQUIRED_CASES = {
    "mlp/kfac/mc", "mlp/kfac/exact", "mlp/kfac/empirical",
    "mlp/diagonal/mc", "mlp/diagonal/exact", "mlp/diagonal/empirical",
    "mlp/implicit/exact/build", "mlp/implicit/exact/F@v",
    "mlp/implicit/empirical/build", "mlp/implicit/empirical/F@v",
    "cnn/kfac/mc", "cnn/kfac/empirical", "cnn/kfac/exact",
    "digits/dense/exact", "digits/dense/empirical",
    "digits/block_diagonal/exact", "digits/kron_sum/exact", "digits/ekfac/exact",
}
N_PARAMS = {"mlp": 535_818, "cnn": 18_378, "digits": 2_410}
CASE_KEYS = {
    "name", "workload", "structure", "estimator", "samples", "operation", "metric", "value",
    "ratio", "seconds", "baseline_seconds", "target", "peer", "vs_peer", "status",
    "data_mode", "result", "samples_seconds", "baseline_samples_seconds", "number",
    "baseline_number", "peak_mb", "peak_total_mb", "loadavg", "foreign_cpu", "rounds",
    "rounds_discarded", "note", "error",
}
ENV_KEYS = {"date", "quick", "python", "platform", "cpu_model", "cpu_count", "torch",
            "torch_num_threads", "numpy", "natgrad", "git_commit"}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "fisher.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--out", str(out)]
    if not C.mnist_available(C.DEFAULT_MNIST_DIR):
        cmd.append("--synthetic")  # no shared MNIST here (e.g. CI): same shapes, random data
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert proc.returncode == 0, (
        f"quick benchmark failed (exit {proc.returncode})\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}")
    assert out.is_file()
    return json.loads(out.read_text()), proc.stdout


def test_header(quick_run):
    doc, _ = quick_run
    assert doc["schema_version"] == 1
    assert doc["benchmark"] == "fisher"
    assert doc["complete"] is True
    env = doc["environment"]
    assert ENV_KEYS <= set(env)
    assert env["quick"] is True and doc["settings"]["quick"] is True
    assert env["torch_num_threads"] == doc["settings"]["threads"] == 2
    s = doc["settings"]
    assert s["warmup"] >= 1 and s["repeats"] >= 1
    for name, n in N_PARAMS.items():
        w = doc["workloads"][name]
        assert w["n_params"] == n
        assert w["n_examples"] == w["n_batches"] * w["batch_size"]
    assert doc["workloads"]["cnn"]["n_batches"] > 1


def test_all_cases_present_and_ok(quick_run):
    doc, _ = quick_run
    names = [c["name"] for c in doc["cases"]]
    assert len(names) == len(set(names))
    assert REQUIRED_CASES <= set(names), REQUIRED_CASES - set(names)
    errors = {c["name"]: c["error"] for c in doc["cases"] if c["status"] == "error"}
    assert not errors


def test_case_records(quick_run):
    doc, _ = quick_run
    repeats = doc["settings"]["repeats"]
    n_params = {k: w["n_params"] for k, w in doc["workloads"].items()}
    for c in doc["cases"]:
        where = c["name"]
        assert CASE_KEYS <= set(c), (where, CASE_KEYS - set(c))
        assert c["metric"] in ("ratio", "seconds"), where
        assert c["operation"] in ("construct", "product", "construct+product"), where
        assert c["estimator"] in ("exact", "mc", "empirical"), where
        assert (c["samples"] == 1) == (c["estimator"] == "mc"), where
        for key in ("value", "ratio", "seconds", "baseline_seconds"):
            assert _positive(c[key]), (where, key, c[key])
        assert c["value"] == (c["seconds"] if c["metric"] == "seconds" else c["ratio"]), where
        assert math.isclose(c["ratio"], c["seconds"] / c["baseline_seconds"], rel_tol=1e-9)
        assert len(c["samples_seconds"]) == len(c["baseline_samples_seconds"]) == repeats
        assert all(_positive(t) for t in c["samples_seconds"] + c["baseline_samples_seconds"])
        assert c["number"] >= 1 and c["baseline_number"] >= 1
        if c["target"] is None:
            assert c["status"] == "info", where
        else:
            assert _positive(c["target"])
            assert c["status"] == ("met" if c["value"] <= c["target"] else "missed"), where
        if c["peer"] is not None:
            assert set(c["peer"]) == {"name", "value"} and _positive(c["peer"]["value"])
            assert math.isclose(c["vs_peer"], c["value"] / c["peer"]["value"], rel_tol=1e-9)
        else:
            assert c["vs_peer"] is None
        if c["foreign_cpu"] is not None:
            assert 0.0 <= c["foreign_cpu"] <= 1.0
        assert c["rounds"] - c["rounds_discarded"] == repeats
        size = (c["result"] or {}).get("size")
        if isinstance(size, int):
            assert size == n_params[c["workload"]], where


def test_table_on_stdout(quick_run):
    doc, stdout = quick_run
    assert "fastest peer" in stdout and "status" in stdout
    for c in doc["cases"]:
        assert c["name"] in stdout


# ---- the helpers, without natgrad --------------------------------------------------------
def test_round_robin_counts():
    calls = {"a": 0, "b": 0}

    def make(k, seconds):
        def f():
            calls[k] += 1
            time.sleep(seconds)
        return f

    # "a" (a 20-ms sleep) needs no repeats for a 10-ms sample; "b" (no sleep) needs many
    t = M.time_round_robin({"a": make("a", 0.02), "b": make("b", 0.0)}, warmup=1, repeats=3,
                           min_sample_time=0.01)
    assert set(t) == {"a", "b"}
    assert t["a"].number == 1 and calls["a"] == 1 + 1 + 3  # calibration, warm-up round, samples
    assert t["b"].number >= 2
    for k in t:
        assert len(t[k].samples) == 3
        assert all(s > 0 for s in t[k].samples)


def test_round_robin_discards_disturbed_rounds():
    # max_foreign=-1 makes every round "disturbed": all max_rounds run, the repeats least
    # disturbed are kept; max_foreign=1 keeps the first repeats rounds.
    for max_foreign, rounds in ((-1.0, 6), (1.0, 2)):
        stats: dict = {}
        t = M.time_round_robin({"a": lambda: None}, warmup=0, repeats=2, min_sample_time=0.001,
                               max_foreign=max_foreign, max_rounds=6, stats=stats)
        assert len(t["a"].samples) == 2
        assert stats["rounds"] == rounds and stats["discarded"] == rounds - 2
        assert len(stats["foreign"]) == 2


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "r.json"
    C.write_json_atomic(path, {"a": 1})
    C.write_json_atomic(path, {"a": 2, "x": np.float32(0.5)})
    assert json.loads(path.read_text()) == {"a": 2, "x": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left
    with pytest.raises(ValueError):
        C.write_json_atomic(path, {"bad": float("nan")})
    assert json.loads(path.read_text()) == {"a": 2, "x": 0.5}  # old file intact
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_read_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    header_i = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28))
    header_l = (2049).to_bytes(4, "big") + (5).to_bytes(4, "big")
    with gzip.open(tmp_path / C.MNIST_TEST_IMAGES, "wb") as fh:
        fh.write(header_i + images.tobytes())
    with gzip.open(tmp_path / C.MNIST_TEST_LABELS, "wb") as fh:
        fh.write(header_l + labels.tobytes())
    x, y = C.load_mnist_test(tmp_path, n=3)
    assert tuple(x.shape) == (3, 784) and tuple(y.shape) == (3,)
    expect = (images[:3].reshape(3, -1) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(x.numpy(), expect, rtol=1e-6, atol=1e-6)
    assert y.tolist() == labels[:3].tolist()
    x4, _ = C.load_mnist_test(tmp_path, flatten=False)
    assert tuple(x4.shape) == (5, 1, 28, 28)


def test_foreign_cpu_is_a_fraction():
    with M.ForeignCpu() as fc:
        sum(i * i for i in range(200_000))
    assert fc.fraction is None or 0.0 <= fc.fraction <= 1.0
