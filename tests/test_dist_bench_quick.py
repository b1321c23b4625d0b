"""Smoke test of the scale-out benchmark: ``benchmarks/dist_bench.py --quick`` (1 and 2 gloo
processes) in a subprocess, then its JSON: structure, and the bytes every rank handed to the
collectives against the formulas, worked out here by hand from the layer sizes (not with the
benchmark's own helper). No assertion on time beyond "positive and adds up"."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "dist_bench.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import _common as C  # noqa: E402

LAYERS = [(785, 512), (513, 256), (257, 10)]  # (d_A = in + 1, d_G = out) of the MLP's Linear layers
P = sum(a * g for a, g in LAYERS)  # 535,818 parameters
TRI = sum(a * (a + 1) // 2 + g * (g + 1) // 2 for a, g in LAYERS)
FACTORS = 4 * TRI + 4  # upper triangles of A and G, float32, + the example count in the same bucket
INVERSES = 4 * TRI  # (A + ·)⁻¹ and (G + ·)⁻¹ as upper triangles
EIGEN = 4 * sum(a + a * a + g + g * g for a, g in LAYERS)  # eigenvalues + full eigenvectors
QUADRATIC = 8 * 4  # float64: three Fisher-norm sums and the example count
CASES = {"kfac-inverses", "kfac-gradients", "ekfac-inverses", "kfac-inverses-stat10"}


def expected_bytes(case: str, kind: str) -> dict[str, int]:
    """Payload bytes per rank of one step on 2 processes, by collective label."""
    out = {"quadratic model": QUADRATIC}
    if kind != "plain":
        out["Kronecker factors"] = FACTORS
    if case == "ekfac-inverses":
        out["EKFAC scales"] = 4 * P
    if kind == "inverse" and case != "kfac-gradients":
        out["inverses"] = EIGEN if case.startswith("ekfac") else INVERSES
    if case == "kfac-gradients":
        out["preconditioned gradients"] = 4 * P
    return out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "dist.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--out", str(out)]
    if not C.mnist_available(C.DEFAULT_MNIST_DIR):
        cmd.append("--synthetic")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_header(quick_run):
    doc, _ = quick_run
    assert doc["schema_version"] == 1 and doc["benchmark"] == "dist" and doc["complete"] is True
    s = doc["settings"]
    assert s["quick"] is True and s["worlds"] == [1, 2] and s["threads_per_process"] == 1
    assert s["n_params"] == P and s["inverse_every"] == 10
    assert [(l["d_A"], l["d_G"]) for l in s["layers"]] == LAYERS
    assert {r["case"] for r in doc["runs"]} == CASES
    assert sorted({r["world"] for r in doc["runs"]}) == [1, 2]
    assert all(r["error"] is None for r in doc["runs"]), [r["error"] for r in doc["runs"]]


def test_bytes_by_formula(quick_run):
    doc, _ = quick_run
    for r in doc["runs"]:
        steps = r["steps"]
        assert steps == list(range(doc["settings"]["warmup"], doc["settings"]["warmup"] + doc["settings"]["steps"]))
        assert r["bytes_match"] is True
        assert len(r["per_rank"]) == r["world"]
        for rank in r["per_rank"]:
            for kind, v in rank["by_kind"].items():
                want = expected_bytes(r["case"], kind) if r["world"] == 2 else {}
                assert v["natgrad_bytes"] == sum(want.values()), (r["world"], r["case"], kind)
                assert v["ddp_bytes"] == (4 * P if r["world"] == 2 else 0)
            # by label, summed over the measured steps
            kinds = {"inverse": 0, "statistics": 0, "plain": 0}
            for s in steps:
                stat = s % r["stat_every"] == 0
                kinds["inverse" if s % 10 == 0 else "statistics" if stat else "plain"] += 1
            want: dict[str, float] = {}
            for kind, count in kinds.items():
                for label, b in (expected_bytes(r["case"], kind) if r["world"] == 2 else {}).items():
                    want[label] = want.get(label, 0) + count * b / len(steps)
            got = {k: v["bytes_per_step"] for k, v in rank["by_label"].items()}
            assert got.keys() == want.keys(), (r["case"], got, want)
            assert all(math.isclose(got[k], want[k], rel_tol=1e-12) for k in want)
            assert math.isclose(rank["natgrad_bytes"], sum(want.values()), rel_tol=1e-12)
    kinds_seen = {k for r in doc["runs"] for k in r["by_kind"]}
    assert kinds_seen == {"inverse", "statistics", "plain"}


def test_kaisa_by_formula(quick_run):
    doc, _ = quick_run
    full = 4 * sum(a * a + g * g for a, g in LAYERS)  # symmetry_aware=False: whole matrices
    eig = 4 * sum(a * a + g * g + g * a for a, g in LAYERS)  # Q_A, Q_G, 1/(d_G d_Aᵀ + λ)
    for r in doc["runs"]:
        if r["world"] != 2:
            assert not r.get("kaisa")
            continue
        n = len(r["steps"])
        stats = sum(s % r["stat_every"] == 0 for s in r["steps"])
        inverses = sum(s % 10 == 0 for s in r["steps"])
        comm = r["kaisa"]["comm-opt"]
        assert math.isclose(comm["payload_bytes"], (stats * full + inverses * eig) / n, rel_tol=1e-12)
        # ring all-reduce on 2 ranks sends 2(R-1)/R = 1 payload; a broadcast (R-1)/R = 1/2
        assert math.isclose(comm["wire_bytes"], (stats * full + inverses * eig / 2) / n, rel_tol=1e-12)
        mem = r["kaisa"]["mem-opt"]  # 1 gradient worker per layer: its gradient broadcast every step
        assert math.isclose(mem["payload_bytes"], (stats * full + n * 4 * P) / n, rel_tol=1e-12)


def test_times_add_up(quick_run):
    doc, stdout = quick_run
    for r in doc["runs"]:
        for rank in r["per_rank"]:
            assert rank["step_seconds"] > 0 and rank["comm_seconds"] >= 0
            total = rank["compute_seconds"] + rank["comm_seconds"] + rank["wait_seconds"]
            assert math.isclose(total, rank["step_seconds"], rel_tol=1e-9)
            if r["world"] == 1:
                assert rank["comm_seconds"] == 0 and rank["wait_seconds"] == 0
    assert set(doc["link"]) == {"2"}
    assert all(x["seconds"] > 0 for op in doc["link"]["2"].values() for x in op)
    assert "KAISA KB" in stdout and "kfac-inverses-stat10" in stdout
