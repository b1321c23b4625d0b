#!/usr/bin/env python
"""Speed benchmark of natgrad's Fisher core against the figures of peer libraries.

Every figure is the time of one ``natgrad.fisher(...)`` call (or one ``F @ v``) divided by
the time of one plain forward + backward (mean cross-entropy on the true labels, parameter
gradients, zeroed grads) over the same data, both measured in this process, round-robin,
median over repeats after a warm-up. The dense Fisher on the digits problem is reported in
absolute seconds, as in docs PEERS.md. Peak memory is measured in fresh child processes.

    python benchmarks/fisher_bench.py              # full run, writes benchmarks/results/fisher.json
    python benchmarks/fisher_bench.py --quick      # small sizes, < 1 min (CI)
    python benchmarks/fisher_bench.py --list
    python benchmarks/fisher_bench.py --cases 'mlp/kfac/*' --profile torch

No assertion is made on time anywhere; the exit code is 1 only if a case raised.
"""
from __future__ import annotations

import argparse
import fnmatch
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
from _fisher_cases import CASES, CASES_BY_NAME, VECTOR_SEED, Case, prepare  # noqa: E402
from _fisher_report import _fmt_value, _jsonable, render_table  # noqa: E402
from _fisher_workloads import BUILDERS, FULL, MODEL_SEED, QUICK, Workload  # noqa: E402

SCHEMA_VERSION = 1
BENCH_PATH = Path(__file__).resolve()
DEFAULT_OUT = BENCH_PATH.parent / "results" / "fisher.json"


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
def _status(value: float | None, target: float | None) -> str:
    if value is None:
        return "error"
    if target is None:
        return "info"
    return "met" if value <= target else "missed"


def run_case(case: Case, wl: Workload, natgrad: Any, args, child_common: list[str],
             setup_cache: dict) -> dict:
    rec: dict[str, Any] = {
        "name": case.name, "workload": case.workload, "structure": case.structure,
        "estimator": case.estimator, "samples": 1 if case.estimator == "mc" else None,
        "operation": case.operation, "metric": case.metric,
        "value": None, "ratio": None, "seconds": None, "baseline_seconds": None,
        "target": case.target,
        "peer": {"name": case.peer[0], "value": case.peer[1]} if case.peer else None,
        "vs_peer": None, "status": "error", "data_mode": None, "result": None,
        "samples_seconds": [], "baseline_samples_seconds": [], "number": None,
        "baseline_number": None, "peak_mb": None, "peak_total_mb": None,
        "loadavg": None, "foreign_cpu": None, "foreign_cpu_before": None,
        "rounds": None, "rounds_discarded": None,
        "note": case.note or None, "error": None,
    }
    if args.skip_timing:
        rec["status"] = "skipped"
        rec["data_mode"] = ("loader" if args.cnn_data == "auto" else args.cnn_data) \
            if len(wl.batches) > 1 else None
        _measure_memory(case, rec, rec["data_mode"], args, child_common, setup_cache)
        return rec
    try:
        if args.wait_idle > 0:
            rec["foreign_cpu_before"] = M.wait_for_idle(args.wait_idle)
        prep = prepare(case, wl, natgrad, args.cnn_data)
        rec["data_mode"] = prep.data_mode
        stats: dict = {}
        t = M.time_round_robin({"baseline": wl.baseline, "method": prep.call},
                               warmup=args.warmup, repeats=args.repeats,
                               min_sample_time=args.min_sample_time,
                               max_foreign=args.max_other_cpu, max_rounds=args.max_rounds,
                               stats=stats)
        kept = [f for f in stats["foreign"] if f is not None]
        rec["foreign_cpu"] = statistics.median(kept) if kept else None
        rec["rounds"], rec["rounds_discarded"] = stats["rounds"], stats["discarded"]
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc(limit=8)
        return rec
    rec["result"] = prep.meta or None
    base, meth = t["baseline"], t["method"]
    rec.update(seconds=meth.median, baseline_seconds=base.median,
               ratio=meth.median / base.median,
               samples_seconds=meth.samples, baseline_samples_seconds=base.samples,
               number=meth.number, baseline_number=base.number)
    rec["value"] = rec["seconds"] if case.metric == "seconds" else rec["ratio"]
    if case.peer:
        rec["vs_peer"] = rec["value"] / case.peer[1]
    rec["status"] = _status(rec["value"], case.target)
    rec["loadavg"] = C.loadavg()
    _measure_memory(case, rec, prep.data_mode, args, child_common, setup_cache)
    return rec


def _measure_memory(case: Case, rec: dict, data_mode: str | None, args, child_common: list[str],
                    setup_cache: dict) -> None:
    if not args.memory:
        return
    try:
        mode = ["--cnn-data", data_mode] if data_mode else []
        setup_target = case.name if case.operation == "product" else case.workload
        rec["peak_mb"], rec["peak_total_mb"] = M.peak_delta_mb(
            [str(BENCH_PATH), "--_child", case.name, "--_phase", "run", *child_common, *mode],
            [str(BENCH_PATH), "--_child", setup_target, "--_phase", "setup", *child_common,
             *mode], setup_cache=setup_cache)
    except Exception as exc:
        rec["memory_error"] = f"{type(exc).__name__}: {exc}"


def child_main(args) -> None:
    """A memory child: set up (workload, and F for products), run the measured operation
    once unless ``--_phase setup``, then report the peak RSS."""
    torch.set_num_threads(args.threads)
    import natgrad

    sizes = QUICK if args.quick else FULL
    name = args._child
    case = CASES_BY_NAME.get(name)
    wl = BUILDERS[case.workload if case else name](args, sizes)
    if args._phase == "baseline":
        wl.baseline()
    elif case is not None:
        prep = prepare(case, wl, natgrad, args.cnn_data)
        if args._phase == "run":
            prep.call()
    M.child_report()


def profile_cases(cases: list[Case], workloads: dict, natgrad: Any, args) -> None:
    import cProfile
    import pstats

    for case in cases:
        wl = workloads[case.workload]
        print(f"\n===== profile {case.name} ({args.profile}) =====", flush=True)
        prep = prepare(case, wl, natgrad, args.cnn_data)
        prep.call()  # warm-up
        if args.profile == "torch":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                prep.call()
            print(prof.key_averages().table(sort_by="self_cpu_time_total",
                                            row_limit=args.profile_rows))
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        else:
            pr = cProfile.Profile()
            pr.enable()
            prep.call()
            pr.disable()
            pstats.Stats(pr, stream=sys.stdout).sort_stats("cumulative").print_stats(
                args.profile_rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats (CI smoke run, well under a minute)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"JSON file (default {DEFAULT_OUT})")
    p.add_argument("--mnist-dir", type=Path, default=C.DEFAULT_MNIST_DIR,
                   help="directory with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    p.add_argument("--synthetic", action="store_true",
                   help="random inputs with MNIST's shapes instead of MNIST (smoke runs only)")
    p.add_argument("--cases", default="*",
                   help="comma-separated glob patterns on case names, e.g. 'mlp/kfac/*,cnn/*'")
    p.add_argument("--list", action="store_true", help="list the case names and exit")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed warm-up rounds, as long as timed ones (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, quick 2)")
    p.add_argument("--min-sample-time", type=float, default=None,
                   help="repeat short calls within a sample up to this many seconds "
                        "(default 0.1, quick 0.02)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each case wait up to SECONDS for other processes to leave the "
                        "CPUs (< 10%% busy); default 0 = do not wait")
    p.add_argument("--max-other-cpu", type=float, default=None, metavar="FRACTION",
                   help="discard and re-run a timing round during which other processes used "
                        "more than FRACTION of the CPUs (default 0.1; quick: keep all rounds)")
    p.add_argument("--max-rounds", type=int, default=None,
                   help="rounds allowed per case with --max-other-cpu (default 5 x repeats)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--cnn-data", choices=["auto", "loader", "loop", "tensors"], default="auto",
                   help="how the multi-batch CNN data reach natgrad.fisher: a DataLoader over "
                        "the batches, one call per batch, or one concatenated tensor pair; "
                        "auto = loader, else loop (default)")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--memory", dest="memory", action="store_true", default=None,
                     help="measure peak memory in child processes (default unless --quick)")
    mem.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--skip-timing", action="store_true",
                   help="measure peak memory only (status 'skipped'); memory is not disturbed "
                        "by other processes, timings are")
    p.add_argument("--profile", choices=["torch", "cprofile"], default=None,
                   help="instead of timing, profile one call of each selected case")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_phase", choices=["setup", "run", "baseline"], default="run",
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.min_sample_time is None:
        args.min_sample_time = 0.02 if args.quick else 0.1
    if args.memory is None:
        args.memory = args.skip_timing or not args.quick
    if args.max_other_cpu is None and not args.quick:
        args.max_other_cpu = 0.1
    if args.max_other_cpu is not None and args.max_other_cpu < 0:
        args.max_other_cpu = None  # a negative value switches the filter off
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        child_main(args)
        return 0
    patterns = [s.strip() for s in args.cases.split(",") if s.strip()]
    cases = [c for c in CASES if any(fnmatch.fnmatchcase(c.name, pat) for pat in patterns)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if not cases:
        print(f"no case matches {args.cases!r}; see --list", file=sys.stderr)
        return 2
    if not args.synthetic and any(c.workload in ("mlp", "cnn") for c in cases) \
            and not C.mnist_available(args.mnist_dir):
        print(f"MNIST test files not found in {args.mnist_dir}; pass --mnist-dir, or "
              "--synthetic for a smoke run", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)
    try:
        import natgrad

        natgrad.fisher  # noqa: B018
    except Exception as exc:
        print(f"cannot use natgrad.fisher: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    sizes = QUICK if args.quick else FULL
    workloads = {name: BUILDERS[name](args, sizes)
                 for name in dict.fromkeys(c.workload for c in cases)}
    if args.profile:
        profile_cases(cases, workloads, natgrad, args)
        return 0

    child_common = ["--threads", str(args.threads), "--mnist-dir", str(args.mnist_dir)]
    child_common += ["--quick"] if args.quick else []
    child_common += ["--synthetic"] if args.synthetic else []
    setup_cache: dict = {}
    wl_info = {}
    for name, wl in workloads.items():
        wl_info[name] = {"description": wl.description, "n_examples": wl.n_examples,
                         "n_batches": len(wl.batches), "batch_size": len(wl.batches[0][1]),
                         "n_params": wl.n_params, "data_source": wl.data_source,
                         "baseline_peak_mb": None}
        if args.memory:
            try:
                wl_info[name]["baseline_peak_mb"] = M.peak_delta_mb(
                    [str(BENCH_PATH), "--_child", name, "--_phase", "baseline", *child_common],
                    [str(BENCH_PATH), "--_child", name, "--_phase", "setup", *child_common],
                    setup_cache=setup_cache)[0]
            except Exception as exc:
                wl_info[name]["memory_error"] = f"{type(exc).__name__}: {exc}"

    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "fisher",
        "environment": C.environment_info(args.quick),
        "settings": {"quick": args.quick, "warmup": args.warmup, "repeats": args.repeats,
                     "min_sample_time": args.min_sample_time, "threads": args.threads,
                     "max_other_cpu": args.max_other_cpu, "max_rounds": args.max_rounds,
                     "memory": args.memory, "skip_timing": args.skip_timing,
                     "cnn_data": args.cnn_data,
                     "synthetic": args.synthetic, "mnist_dir": str(args.mnist_dir),
                     "cases": args.cases, "dtype": "float32", "model_seed": MODEL_SEED,
                     "vector_seed": VECTOR_SEED, "statistic": "median",
                     "baseline": "model.zero_grad(); cross_entropy(model(x), y).backward() "
                                 "over every batch"},
        "workloads": wl_info,
        "cases": [],
        "complete": False,
    }
    load = C.loadavg()
    if load and load[0] > 0.5:
        print(f"# warning: load average {load[0]:.2f} before the run; other processes share "
              "the CPUs and the timings will be noisy", file=sys.stderr)
    if args.quick:
        print("# quick mode: reduced sizes; the targets and peer figures are for the full sizes",
              file=sys.stderr)
    t_start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        rec = run_case(case, workloads[case.workload], natgrad, args, child_common, setup_cache)
        doc["cases"].append(_jsonable(rec))
        C.write_json_atomic(args.out, doc)  # partial results survive an interrupted run
        if rec["error"] or rec["status"] == "skipped":
            msg = rec["error"] or "timing skipped"
        else:
            msg = (f"{_fmt_value(rec['value'], rec['metric'])}  {rec['status']}  (natgrad "
                   f"{rec['seconds'] * 1e3:.1f} ms, "
                   f"fwd+bwd {rec['baseline_seconds'] * 1e3:.2f} ms)")
        if rec["peak_mb"] is not None:
            msg += f"  peak +{rec['peak_mb']:.0f} MB"
        print(f"[{i}/{len(cases)} {time.perf_counter() - t_start:6.1f}s] {case.name}: {msg}",
              file=sys.stderr, flush=True)
    doc["complete"] = True
    doc["environment"]["loadavg_end"] = C.loadavg()
    doc["wall_seconds"] = time.perf_counter() - t_start
    C.write_json_atomic(args.out, doc)

    env = doc["environment"]
    print(f"natgrad Fisher benchmark  torch {env['torch']}  threads {env['torch_num_threads']}  "
          f"{env['cpu_model']}  {env['date']}{'  QUICK' if args.quick else ''}")
    for name, w in wl_info.items():
        mem = f", fwd+bwd peak +{w['baseline_peak_mb']:.0f} MB" if w["baseline_peak_mb"] else ""
        print(f"  {name}: {w['description']}, {w['n_params']:,} params{mem}")
    print(render_table(doc["cases"]))
    noisy = [r["name"] for r in doc["cases"] if (r.get("foreign_cpu") or 0) > 0.1]
    if noisy:
        print(f"warning: other processes used >10% of the CPUs during {len(noisy)} case(s) "
              "('other CPU' column); those timings are unreliable. Re-run on an idle machine "
              "or with --wait-idle.")
    print(f"JSON: {args.out}")
    errors = [r for r in doc["cases"] if r["status"] == "error"]
    for r in errors:
        print(f"ERROR {r['name']}: {r['error']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
