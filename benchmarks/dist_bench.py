#!/usr/bin/env python
"""Scale-out of natgrad's K-FAC/EKFAC under DistributedDataParallel: bytes and time per step.

For 1, 2 and 4 processes (gloo on the CPU, one torch thread each; file rendezvous, spawned by
this script) every case trains the MLP 784-512-256-10 (Linear-Tanh-Linear-ReLU-Linear) on
consecutive global batches of the first MNIST test images, each global batch split evenly over
the ranks. Per optimizer step and rank it records

* the bytes natgrad's collectives were handed (``Communicator.payload_bytes``, split by the
  collective's label: Kronecker factors, inverses, preconditioned gradients, EKFAC scales,
  quadratic model) and the time spent in them (``Communicator.seconds``);
* the bytes and time of DDP's gradient all-reduce, counted by a comm hook that all-reduces each
  bucket *synchronously* (so its time is measurable; DDP's default overlaps it with the
  backward pass);
* the step's wall time (zero_grad, forward, loss, ``opt.backward``, ``opt.step``), split into
  communication (time inside the collectives), wait (in a barrier this benchmark puts just
  before each collective: waiting for the slowest rank, e.g. for the owner of a layer's inverse,
  or for a process the OS has descheduled) and computation (the rest). The ranks also meet at
  an untimed barrier before every step, so no skew carries over from one step to the next.

Steps are classed as ``inverse`` (inverses/eigenbases recomputed and shared), ``statistics``
(factors all-reduced only) or ``plain``. Next to the measured bytes: natgrad's predicted bytes
(``dist_costs.natgrad_payload``, which must match exactly) and what KAISA (kfac-pytorch's
defaults, same schedule) would hand over and send, see ``dist_costs.py``. A short transfer test
(all-reduce and broadcast of 4 KB-8 MB after a barrier) gives this machine's latency and
bandwidth for the cost model of ``docs/distributed-costs.md``.

    python benchmarks/dist_bench.py            # 1, 2, 4 processes -> results/dist_bench.json
    python benchmarks/dist_bench.py --quick    # 1, 2 processes, few steps (CI, ~20 s)

The machine has few cores: 4 processes of one thread each oversubscribe 2 cores, and the
timings then include time-slicing; bytes are exact either way. No assertion on time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _measure as M  # noqa: E402
import dist_costs as K  # noqa: E402

C.use_repo_sources()

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _dist_worker import CASES, INVERSE_EVERY, build_model, worker  # noqa: E402

SCHEMA_VERSION = 1
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "dist_bench.json"
KINDS = ("inverse", "statistics", "plain")


def cpu_seconds() -> tuple[float | None, float]:
    """(machine busy CPU seconds from /proc/stat, CPU seconds of this process and its reaped
    children): their difference over a run is what other processes used."""
    import resource

    own = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return M._proc_stat_busy_seconds(), own


def run_world(world: int, cfg: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        ctx = mp.start_processes(worker, args=(world, directory, cfg), nprocs=world, join=False,
                                 start_method="spawn")
        while not ctx.join(timeout=cfg["timeout"] * 4):
            pass
        results = []
        for rank in range(world):
            path = os.path.join(directory, f"result-{rank}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path)
                           else {"rank": rank, "cases": {}, "errors": {}, "fatal": "no result written"})
        return results


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(steps: list[dict]) -> dict:
    """Per-step averages of one rank's records (all steps, and by kind)."""
    def avg(recs):
        comm = [r["natgrad_seconds"] + r["ddp_seconds"] for r in recs]
        return {"steps": len(recs), "step_seconds": _mean(r["seconds"] for r in recs),
                "comm_seconds": _mean(comm), "wait_seconds": _mean(r["wait_seconds"] for r in recs),
                "compute_seconds": _mean(r["seconds"] - c - r["wait_seconds"] for r, c in zip(recs, comm)),
                "natgrad_seconds": _mean(r["natgrad_seconds"] for r in recs),
                "ddp_seconds": _mean(r["ddp_seconds"] for r in recs),
                "natgrad_bytes": _mean(r["natgrad_bytes"] for r in recs),
                "ddp_bytes": _mean(r["ddp_bytes"] for r in recs)}
    out = avg(steps)
    out["by_kind"] = {k: avg([r for r in steps if r["kind"] == k]) for k in KINDS
                      if any(r["kind"] == k for r in steps)}
    labels: dict[str, list] = {}
    for r in steps:
        for k, v in r["by_label"].items():
            labels[k] = [x + y for x, y in zip(labels.get(k, [0, 0.0, 0.0]), v)]
    out["by_label"] = {k: {"bytes_per_step": b / len(steps), "seconds_per_step": s / len(steps),
                           "wait_seconds_per_step": w / len(steps)} for k, (b, s, w) in labels.items()}
    return out


def case_record(world: int, name: str, ranks: list[dict], cfg: dict) -> dict:
    method, sharding, stat_every = CASES[name]
    layers = K.mlp_layers()
    rec = {"world": world, "case": name, "method": method, "sharding": sharding, "stat_every": stat_every,
           "inverse_every": INVERSE_EVERY, "error": None}
    errors = [r["errors"].get(name) or r.get("fatal") for r in ranks if name not in r["cases"]]
    if errors:
        rec["error"] = next((e for e in errors if e), "missing")
        return rec
    per_rank = [summarize(r["cases"][name]) for r in ranks]
    steps = [s["step"] for s in ranks[0]["cases"][name]]
    n = len(steps)
    predicted = K.natgrad_payload(layers, method, sharding or "inverses", stat_every, INVERSE_EVERY, steps, world)
    rec.update(
        steps=steps, per_rank=per_rank, mean={k: _mean(p[k] for p in per_rank) for k in
                                              ("step_seconds", "comm_seconds", "wait_seconds", "compute_seconds",
                                               "natgrad_bytes", "ddp_bytes")},
        by_kind={k: {m: (per_rank[0]["by_kind"][k][m] if m == "steps" else
                         _mean(p["by_kind"][k][m] for p in per_rank)) for m in per_rank[0]["by_kind"][k]}
                 for k in per_rank[0]["by_kind"]},
        predicted={"natgrad_bytes_by_label": {k: v / n for k, v in predicted.items()},
                   "natgrad_bytes": sum(predicted.values()) / n,
                   "ddp_bytes": 4 * cfg["n_params"] if world > 1 else 0,
                   "natgrad_wire_bytes": sum(K.wire(k, v, world) for k, v in predicted.items()) / n,
                   "ddp_wire_bytes": K.wire("ddp", 4 * cfg["n_params"], world)},
        bytes_match=all(abs(p["by_label"].get(k, {}).get("bytes_per_step", 0) * n - predicted.get(k, 0)) < 0.5
                        for p in per_rank for k in set(p["by_label"]) | set(predicted)),  # every rank
    )
    if method != "sgd":  # KAISA for the same model and schedule (independent of our sharding)
        fractions = {"comm-opt": 1.0, "mem-opt": 1.0 / world, "hybrid-opt(0.5)": 0.5}
        rec["kaisa"] = {}
        for label, f in fractions.items():
            if world == 1 or (label.startswith("hybrid") and world < 4):
                continue
            tot = K.kaisa_payload(layers, world, f, stat_every, INVERSE_EVERY, steps)
            rec["kaisa"][label] = {"payload_bytes": sum(p for p, _ in tot.values()) / n,
                                   "wire_bytes": sum(w for _, w in tot.values()) / n,
                                   "by_component": {k: {"payload": p / n, "wire": w / n} for k, (p, w) in tot.items()}}
    return rec


def render(records: list[dict]) -> str:
    ms, kb = (lambda v: "-" if v is None else f"{1e3 * v:.1f}"), (lambda v: "-" if v is None else f"{v / 1e3:.0f}")
    rows, kinds = [], []
    for r in records:
        if r["error"]:
            rows.append([str(r["world"]), r["case"], "ERROR"] + [""] * 10)
            continue
        m, p = r["mean"], r["predicted"]
        kaisa = r.get("kaisa", {}).get("comm-opt")
        rows.append([str(r["world"]), r["case"], ms(m["step_seconds"]), ms(m["comm_seconds"]), ms(m["wait_seconds"]),
                     ms(m["compute_seconds"]), f"{100 * m['comm_seconds'] / m['step_seconds']:.0f}%",
                     kb(m["natgrad_bytes"]), kb(p["natgrad_bytes"]), "yes" if r["bytes_match"] else "NO",
                     kb(m["ddp_bytes"]), kb(p["natgrad_wire_bytes"] + p["ddp_wire_bytes"]),
                     kb(kaisa["payload_bytes"]) if kaisa else "-"])
        for k, v in r["by_kind"].items():
            kinds.append([str(r["world"]), r["case"], k, str(v["steps"]), ms(v["step_seconds"]),
                          ms(v["comm_seconds"]), ms(v["wait_seconds"]), ms(v["compute_seconds"]), kb(v["natgrad_bytes"]),
                          kb(v["ddp_bytes"])])
    t1 = C.format_table(["R", "case", "ms/step", "comm ms", "wait ms", "compute ms", "comm", "natgrad KB",
                         "predicted KB", "match", "DDP KB", "wire KB (model)", "KAISA KB"], rows,
                        "rlrrrrrrrlrrr")
    t2 = C.format_table(["R", "case", "kind", "steps", "ms/step", "comm ms", "wait ms", "compute ms",
                         "natgrad KB", "DDP KB"], kinds, "rllrrrrrrr")
    return t1 + "\n\n" + t2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 and 2 processes, batch 64, few steps (CI)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--mnist-dir", type=Path, default=C.DEFAULT_MNIST_DIR)
    p.add_argument("--synthetic", action="store_true", help="random inputs of MNIST's shape")
    p.add_argument("--worlds", default=None, help="comma-separated process counts (default 1,2,4; quick 1,2)")
    p.add_argument("--cases", default=None, help="comma-separated subset of " + ", ".join(CASES))
    p.add_argument("--global-batch", type=int, default=None, help="default 256 (quick 64)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10, quick 3)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 40, quick 8)")
    p.add_argument("--timeout", type=float, default=120.0, help="collective timeout, seconds")
    args = p.parse_args(argv)
    args.worlds = [int(w) for w in (args.worlds or ("1,2" if args.quick else "1,2,4")).split(",")]
    args.cases = (args.cases or ("kfac-inverses,kfac-gradients,ekfac-inverses,kfac-inverses-stat10"
                                 if args.quick else ",".join(CASES))).split(",")
    args.global_batch = args.global_batch or (64 if args.quick else 256)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    args.steps = args.steps or (8 if args.quick else 40)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or any(args.global_batch % w for w in args.worlds):
        print(f"unknown cases {unknown} or global batch not divisible by the process counts", file=sys.stderr)
        return 2
    if not args.synthetic and not C.mnist_available(args.mnist_dir):
        print(f"MNIST test files not found in {args.mnist_dir}; pass --mnist-dir or --synthetic", file=sys.stderr)
        return 2
    n_batches = 2 if args.quick else 39
    cores = os.cpu_count() or 1
    cfg = {"cases": args.cases, "global_batch": args.global_batch, "warmup": args.warmup, "steps": args.steps,
           "n_images": n_batches * args.global_batch, "mnist_dir": str(args.mnist_dir), "synthetic": args.synthetic,
           "timeout": args.timeout, "link_reps": 3 if args.quick else 7,
           "n_params": sum(p.numel() for p in build_model().parameters())}
    layers = K.mlp_layers()
    doc = {"schema_version": SCHEMA_VERSION, "benchmark": "dist", "complete": False,
           "environment": C.environment_info(args.quick),
           "settings": {**cfg, "quick": args.quick, "worlds": args.worlds, "threads_per_process": 1,
                        "backend": "gloo", "inverse_every": INVERSE_EVERY, "dtype": "float32",
                        "model": "MLP 784-512-256-10 (Linear-Tanh-Linear-ReLU-Linear)",
                        "layers": [{"name": l.name, "d_A": l.d_a, "d_G": l.d_g} for l in layers],
                        "cores": cores, "oversubscribed": {str(w): w > cores for w in args.worlds},
                        "ddp_counting": "comm hook, synchronous all-reduce of each bucket (no overlap)",
                        "time_split": "comm = inside natgrad's collectives + DDP's all-reduce; wait = in a "
                                      "barrier before each; compute = step wall time - comm - wait"},
           "runs": [], "link": {}, "foreign_cpu": {}}
    t0 = time.perf_counter()
    failed = False
    for world in args.worlds:
        note = f" ({world} processes on {cores} cores: oversubscribed)" if world > cores else ""
        print(f"[dist_bench] {world} process(es){note} ...", file=sys.stderr, flush=True)
        busy0, own0, t_world = *cpu_seconds(), time.perf_counter()
        ranks = run_world(world, cfg)
        busy1, own1 = cpu_seconds()
        foreign = None if busy0 is None or busy1 is None else max(
            0.0, ((busy1 - busy0) - (own1 - own0)) / ((time.perf_counter() - t_world) * cores))
        doc["foreign_cpu"][str(world)] = foreign
        for name in args.cases:
            rec = case_record(world, name, ranks, cfg)
            failed |= rec["error"] is not None or not rec.get("bytes_match", True)
            doc["runs"].append(rec)
        if "link" in ranks[0]:
            doc["link"][str(world)] = ranks[0]["link"]
        C.write_json_atomic(args.out, doc)
    doc["complete"] = True
    doc["wall_seconds"] = time.perf_counter() - t0
    C.write_json_atomic(args.out, doc)
    print(render(doc["runs"]))
    print("\nCPU used by other processes during each process count's run (fraction of the machine): "
          + ", ".join(f"R={w}: " + ("?" if v is None else f"{100 * v:.0f}%") for w, v in doc["foreign_cpu"].items()))
    over = [w for w in args.worlds if w > cores]
    if over:
        print(f"\nnote: {over} processes oversubscribe this machine's {cores} cores (1 thread each): "
              "their times include time-slicing between processes; bytes are exact.")
    print("KB = 1000 bytes per step per rank; comm = time inside collectives, wait = in a barrier "
          "before each (waiting for the slowest rank), compute = the rest of the step;\n"
          "natgrad/DDP KB: payload handed to the collectives; "
          "wire: bytes sent per rank with ring all-reduce / pipelined broadcast (model); "
          "KAISA: kfac-pytorch defaults (COMM-OPT), same schedule, payload.")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
