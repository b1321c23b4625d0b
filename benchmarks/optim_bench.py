#!/usr/bin/env python
"""Step overhead of natgrad's curvature optimizers against SGD, next to a FLOP floor.

Workload (PEERS.md §5): MLP Linear(784,512)-Tanh-Linear(512,256)-ReLU-Linear(256,10), float32,
consecutive batches of the MNIST test images, cycled (39 batches at batch 256; at larger
batches as many whole batches as the 10,000 images give). Each optimizer trains its own copy
of the same initial model.

* SGD step     = zero_grad + forward + cross_entropy + backward + SGD(lr 0.01, momentum 0.9).step()
* natgrad step = zero_grad + forward + cross_entropy + opt.backward(loss, out) + opt.step()

with ``KFAC(model, likelihood="categorical")`` (defaults: inverses every 10 steps, statistics
of ⌈N/8⌉ ≥ 32 examples of each batch, Martens & Grosse's τ₁), ``EKFAC`` with its defaults
(statistics of whole batches), and three K-FAC variants (info): ``StepPolicy(rescale="kl_clip")``,
``Schedule(stat_every=10, stat_fraction=1/8)`` and ``Schedule(stat_fraction=1)`` (whole
batches, K-FAC's default before 2026-12-03).

Amortised step time: every timed sample runs a whole number of inverse periods (10 steps
each), so each sample contains the same share of inverse refreshes; all optimizers are timed
round-robin in one process (``_measure.time_round_robin``), median over repeats, and divided by
the SGD step from the same rounds. Per-step clocks within the periods also give the typical
(no-refresh) step and the refresh step.

FLOP floor (multiply-adds x 2), per Linear layer with in=I, out=O, D=I+1, batch N:
forward+backward 3 N I O; preconditioning O^2 D + O D^2 (two matmuls); statistics N D^2 +
N O^2 per statistics step (N → max(⌈τ₁ N⌉, 32) with stat_fraction; /stat_every amortised);
inverses D^3 + O^3 per refresh (/inverse_every amortised).
``floor_ratio`` = floor / SGD FLOPs (SGD = forward+backward) is the
best ratio any implementation could reach if it ran at the SGD step's FLOP rate;
``vs_floor`` = measured ratio / floor_ratio. K-FAC preconditions a layer as (G⁻¹gᵀ)(āA⁻¹),
N(O^2 + D^2 + O D), where that is cheaper than the two matmuls (EKFAC its projection into the
eigenbasis, (gQ_G)ᵀ(āQ_A)): ``floor_factored_ratio`` (JSON and a table column) is the floor with
that form, a floor of what they actually compute. Not in the floor (listed in the JSON, info): the
Monte-Carlo Fisher backprop of the default estimator and the exact-Fisher quadratic model of
the default ``rescale="quadratic"``.

    python benchmarks/optim_bench.py            # full run, batches 256 and 1024 -> results/optim.json
    python benchmarks/optim_bench.py --quick    # batch 256, few steps, < 30 s (CI)

No assertion is made on time; the exit code is 1 only if a case raised.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _measure as M  # noqa: E402

C.use_repo_sources()

import torch  # noqa: E402
from _optim_methods import (INVERSE_EVERY, METHODS, METHODS_BY_NAME, SGD_LR, SGD_MOMENTUM, Method,  # noqa: E402
                            Trainer, build_model, flops)

SCHEMA_VERSION = 1
BENCH_PATH = Path(__file__).resolve()
DEFAULT_OUT = BENCH_PATH.parent / "results" / "optim.json"
MAX_BATCHES = 39  # PEERS.md §5: 39 consecutive batches of 256 (9,984 of the 10,000 images)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
def load_batches(args, batch: int) -> tuple[list, str]:
    n_batches = min(MAX_BATCHES, 10_000 // batch)
    n = n_batches * batch
    if args.synthetic:
        x, y = C.synthetic_classification(n, (784,), 10, seed=0)
        src = "synthetic"
    else:
        x, y = C.load_mnist_test(args.mnist_dir, n=n)
        src = "mnist"
    return [(x[i:i + batch].contiguous(), y[i:i + batch].contiguous())
            for i in range(0, n, batch)], src


def _status(value: float | None, target: float | None) -> str | None:
    if target is None or value is None:
        return None
    return "met" if value <= target else "missed"


def run_batch(batch: int, methods: list[Method], natgrad: Any, args) -> tuple[dict, list[dict]]:
    batches, src = load_batches(args, batch)
    base = build_model()
    trainers = {"sgd": Trainer(None, base, batches, natgrad)}
    errors: dict[str, str] = {}
    for m in methods:
        try:
            trainers[m.name] = Trainer(m, base, batches, natgrad)
            trainers[m.name].period(args.prewarm)  # past the first three refreshes
        except Exception as exc:
            errors[m.name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
            trainers.pop(m.name, None)
    trainers["sgd"].period(args.prewarm)
    print(f"  batch {batch}: warm", file=sys.stderr, flush=True)
    for t in trainers.values():
        t.record = True
    stats: dict = {}
    timing = M.time_round_robin({k: (lambda t=t: t.period(args.periods)) for k, t in trainers.items()},
                                warmup=args.warmup, repeats=args.repeats,
                                min_sample_time=args.min_sample_time,
                                max_foreign=args.max_other_cpu, max_rounds=args.max_rounds,
                                stats=stats)
    steps_per_call = args.periods * INVERSE_EVERY
    kept = [f for f in stats["foreign"] if f is not None]
    foreign = statistics.median(kept) if kept else None
    sgd = timing["sgd"]
    sgd_step = sgd.median / steps_per_call
    sgd_fl = flops(METHODS[0], batch)["sgd"]
    info = {
        "batch_size": batch, "n_batches": len(batches), "n_examples": batch * len(batches),
        "data_source": src, "steps_per_sample": steps_per_call * sgd.number,
        "sgd_step_seconds": sgd_step,
        "sgd_samples_seconds": [s / steps_per_call for s in sgd.samples],
        "sgd_number": sgd.number, "sgd_flops": sgd_fl, "sgd_gflops_per_second": sgd_fl / sgd_step / 1e9,
        "sgd_last_loss": trainers["sgd"].last_loss,
        "rounds": stats["rounds"], "rounds_discarded": stats["discarded"],
        "foreign_cpu": foreign, "loadavg": C.loadavg(),
    }
    records = []
    kfac_step = None
    for m in methods:
        fl = flops(m, batch)
        at256 = batch == 256
        rec: dict[str, Any] = {
            "name": f"b{batch}/{m.name}", "method": m.name, "description": m.description,
            "batch_size": batch, "inverse_every": INVERSE_EVERY, "stat_every": m.stat_every,
            "stat_fraction": m.stat_fraction,
            "rescale": m.rescale, "ratio": None, "seconds": None, "sgd_seconds": sgd_step,
            "samples_seconds": [], "number": None, "steps_per_sample": None,
            "typical_ratio": None, "refresh_ratio": None, "typical_seconds": None,
            "refresh_seconds": None,
            "target": m.target if at256 else None,
            "peer": {"name": m.peer[0], "value": m.peer[1]} if m.peer and at256 else None,
            "vs_peer": None, "status": "error",
            "sgd_flops": fl["sgd"], "floor_flops": fl["floor"], "floor_ratio": fl["floor_ratio"],
            "floor_factored_ratio": fl["floor_factored_ratio"],
            "floor_parts": fl["parts"], "not_in_floor": fl["not_in_floor"],
            "vs_floor": None, "floor_target": m.floor_target, "floor_status": None,
            "vs_kfac": None, "vs_kfac_target": m.vs_kfac_target, "vs_kfac_status": None,
            "last_loss": None, "foreign_cpu": foreign, "error": errors.get(m.name),
        }
        if m.name in timing:
            t, tr = timing[m.name], trainers[m.name]
            step = t.median / steps_per_call
            rec.update(seconds=step, ratio=step / sgd_step,
                       samples_seconds=[s / steps_per_call for s in t.samples],
                       number=t.number, steps_per_sample=steps_per_call * t.number,
                       last_loss=tr.last_loss)
            refresh = tr.step_times.get(0, [])
            typical = [x for ph, xs in tr.step_times.items() if ph != 0 for x in xs]
            if refresh:
                rec["refresh_seconds"] = statistics.median(refresh)
                rec["refresh_ratio"] = rec["refresh_seconds"] / sgd_step
            if typical:
                rec["typical_seconds"] = statistics.median(typical)
                rec["typical_ratio"] = rec["typical_seconds"] / sgd_step
            rec["vs_floor"] = rec["ratio"] / fl["floor_ratio"]
            rec["floor_status"] = _status(rec["vs_floor"], m.floor_target)
            if rec["peer"]:
                rec["vs_peer"] = rec["ratio"] / rec["peer"]["value"]
            if m.name == "kfac":
                kfac_step = step
            if kfac_step is not None and m.name != "kfac":
                rec["vs_kfac"] = step / kfac_step
                rec["vs_kfac_status"] = _status(rec["vs_kfac"], m.vs_kfac_target)
            rec["status"] = _status(rec["ratio"], rec["target"]) or "info"
        records.append(rec)
    return info, records


def _clean(obj: Any) -> Any:
    """NaN/inf -> null, recursively (JSON has neither)."""
    if isinstance(obj, float):
        return C.finite_or_none(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _x(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}x"


def render_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        tgt = [f"<= {r['target']:g}x {r['status']}" if r["target"] is not None else r["status"]]
        rows.append([
            r["name"], _x(r["ratio"]), *tgt,
            f"{r['peer']['name']} {r['peer']['value']:g}x" if r["peer"] else "-",
            "-" if r["seconds"] is None else f"{r['seconds'] * 1e3:.1f}",
            f"{r['sgd_seconds'] * 1e3:.2f}",
            _x(r["typical_ratio"], 1), _x(r["refresh_ratio"], 1),
            f"{r['floor_flops'] / 1e9:.3f}", f"{r['sgd_flops'] / 1e9:.3f}",
            _x(r["floor_ratio"]), _x(r["floor_factored_ratio"]),
            _x(r["vs_floor"]) + (f" (<= {r['floor_target']:g} {r['floor_status']})"
                                 if r["floor_target"] is not None and r["floor_status"] else ""),
            _x(r["vs_kfac"]) + (f" (<= {r['vs_kfac_target']:g} {r['vs_kfac_status']})"
                                if r["vs_kfac_target"] is not None and r["vs_kfac_status"] else ""),
            "-" if r.get("foreign_cpu") is None else f"{100 * r['foreign_cpu']:.0f}%",
        ])
    return C.format_table(
        ["case", "step/SGD", "target", "peer", "ms/step", "SGD ms", "typical", "refresh",
         "floor GFLOP", "SGD GFLOP", "floor/SGD", "factored floor/SGD", "measured/floor", "vs K-FAC",
         "other CPU"],
        rows, "lrllrrrrrrrrlll")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 256 only, few steps (CI, < 30 s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file (default {DEFAULT_OUT})")
    p.add_argument("--mnist-dir", type=Path, default=C.DEFAULT_MNIST_DIR)
    p.add_argument("--synthetic", action="store_true",
                   help="random inputs with MNIST's shapes (smoke runs without the data files)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 256,1024; quick 256)")
    p.add_argument("--methods", default=",".join(m.name for m in METHODS),
                   help="comma-separated subset of " + ", ".join(METHODS_BY_NAME))
    p.add_argument("--periods", type=int, default=None,
                   help="inverse periods (of 10 steps) per timed call (default 2, quick 1)")
    p.add_argument("--prewarm", type=int, default=None,
                   help="untimed periods before timing (default 2, quick 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed round-robin rounds (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 2)")
    p.add_argument("--min-sample-time", type=float, default=None,
                   help="repeat short calls within a sample up to this long (default 0.3, quick 0.05)")
    p.add_argument("--max-other-cpu", type=float, default=None, metavar="FRACTION",
                   help="discard rounds where other processes used > FRACTION of the CPUs "
                        "(default 0.1; quick: keep all; negative: off)")
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("256" if args.quick else "256,1024")).split(",")]
    args.periods = args.periods or (1 if args.quick else 2)
    args.prewarm = args.prewarm if args.prewarm is not None else (1 if args.quick else 2)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.min_sample_time = args.min_sample_time or (0.05 if args.quick else 0.3)
    if args.max_other_cpu is None and not args.quick:
        args.max_other_cpu = 0.1
    if args.max_other_cpu is not None and args.max_other_cpu < 0:
        args.max_other_cpu = None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    names = [s.strip() for s in args.methods.split(",") if s.strip()]
    unknown = [n for n in names if n not in METHODS_BY_NAME]
    if unknown:
        print(f"unknown methods {unknown}; known: {list(METHODS_BY_NAME)}", file=sys.stderr)
        return 2
    methods = [m for m in METHODS if m.name in names]
    if not args.synthetic and not C.mnist_available(args.mnist_dir):
        print(f"MNIST test files not found in {args.mnist_dir}; pass --mnist-dir, or "
              "--synthetic for a smoke run", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)
    try:
        import natgrad
        import natgrad.optim  # noqa: F401
    except Exception as exc:
        print(f"cannot import natgrad.optim: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "benchmark": "optim", "complete": False,
        "environment": C.environment_info(args.quick),
        "settings": {
            "quick": args.quick, "threads": args.threads, "dtype": "float32",
            "batch_sizes": args.batch_sizes, "methods": names, "inverse_every": INVERSE_EVERY,
            "periods_per_call": args.periods, "prewarm_periods": args.prewarm,
            "warmup": args.warmup, "repeats": args.repeats,
            "min_sample_time": args.min_sample_time, "max_other_cpu": args.max_other_cpu,
            "sgd": {"lr": SGD_LR, "momentum": SGD_MOMENTUM},
            "model": "Linear(784,512)-Tanh-Linear(512,256)-ReLU-Linear(256,10)",
            "n_params": sum(p.numel() for p in build_model().parameters()),
            "flops_note": "FLOPs = 2 x multiply-adds; floor = fwd+bwd (3NIO) + preconditioning "
                          "(O^2 D + O D^2) + statistics (N D^2 + N O^2)/stat_every + inverses "
                          "(D^3 + O^3)/inverse_every, summed over layers, D = I+1",
        },
        "batches": {}, "cases": [],
    }
    if args.quick:
        print("# quick mode: batch 256 only, few steps; targets are for the full run",
              file=sys.stderr)
    t_start = time.perf_counter()
    for b in args.batch_sizes:
        try:
            info, records = run_batch(b, methods, natgrad, args)
        except Exception as exc:
            info = {"batch_size": b, "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=8)}
            records = []
        doc["batches"][str(b)] = _clean(info)
        doc["cases"] += _clean(records)
        C.write_json_atomic(args.out, doc)
        print(f"[{time.perf_counter() - t_start:6.1f}s] batch {b} done", file=sys.stderr, flush=True)
    doc["complete"] = True
    doc["environment"]["loadavg_end"] = C.loadavg()
    doc["wall_seconds"] = time.perf_counter() - t_start
    C.write_json_atomic(args.out, doc)

    env = doc["environment"]
    print(f"natgrad optimizer step benchmark  torch {env['torch']}  threads "
          f"{env['torch_num_threads']}  {env['cpu_model']}  {env['date']}"
          f"{'  QUICK' if args.quick else ''}")
    for b, info in doc["batches"].items():
        if "error" in info:
            continue
        print(f"  batch {b}: {info['n_batches']} {info['data_source']} batches cycled; SGD step "
              f"{info['sgd_step_seconds'] * 1e3:.2f} ms = {info['sgd_gflops_per_second']:.1f} "
              f"GFLOP/s; {info['steps_per_sample']}+ steps per sample")
    print(render_table(doc["cases"]))
    print("typical/refresh: median step without / with the inverse refresh, over SGD's step. "
          "Floor excludes the MC Fisher backprop and the quadratic-model JVPs (see JSON "
          "not_in_floor).")
    if any((r.get("foreign_cpu") or 0) > 0.1 for r in doc["cases"]):
        print("warning: other processes used >10% of the CPUs; timings unreliable")
    print(f"JSON: {args.out}")
    bad = [r for r in doc["cases"] if r["status"] == "error"]
    bad += [{"name": f"batch {b}", "error": i["error"]} for b, i in doc["batches"].items() if "error" in i]
    for r in bad:
        print(f"ERROR {r['name']}: {r['error']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
