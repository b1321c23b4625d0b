#!/usr/bin/env python
"""The amortised cost of PRONG's reparametrization, against an SGD step.

Workload: MLP Linear(784,512)-Tanh-Linear(512,256)-ReLU-Linear(256,10), float32, batches of
256 MNIST test images (random data of the same shapes with ``--synthetic``). Timed round-robin
in one process (``_measure.time_round_robin``), median over repeats:

* ``sgd``: one SGD(momentum 0.9) step of the plain model;
* ``whitened``: one ``PRONG.step()`` of the whitened model (``natgrad.nn.whiten``) whose
  reparametrizations are switched off for the timing (``every`` = 10⁹), so that no sample
  contains one;
* ``reparametrize``: one ``PRONG.reparametrize()`` from ``samples`` inputs (statistics pass,
  eigendecompositions — float32 for this float32 model, see ``natgrad.nn.whitening`` — and V,
  d updated).

Reported: ``reparam_overhead`` = reparametrize / (every × whitened), the share the
reparametrization adds to a whitened SGD step every ``every`` steps (issue target ≤ 10 % at
T = 100), and ``prong_vs_sgd`` = (whitened + reparametrize/every) / sgd, the whole PRONG step
against a plain SGD step (whitening costs an extra product by U in every forward).

    python benchmarks/prong_bench.py            # -> results/prong.json
    python benchmarks/prong_bench.py --quick    # CI smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _measure as M  # noqa: E402

C.use_repo_sources()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "prong.json"


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        opt.zero_grad()
        Fn.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="few repeats (CI smoke run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--synthetic", action="store_true", help="random data with MNIST's shapes")
    parser.add_argument("--every", type=int, default=100, help="reparametrization period T")
    parser.add_argument("--samples", type=int, default=1000, help="inputs per reparametrization")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    import natgrad

    if args.synthetic or not C.mnist_available():
        x_all, y_all = C.synthetic_classification(2048, (784,), 10)
    else:
        x_all, y_all = C.load_mnist_test(n=2048)
    x, y = x_all[: args.batch_size], y_all[: args.batch_size]

    plain = mlp()
    whitened = natgrad.nn.whiten(mlp())
    prong = natgrad.optim.PRONG(
        whitened, torch.optim.SGD(whitened.parameters(), lr=0.01, momentum=0.9), x_all,
        every=10**9, samples=args.samples,
    )
    fns = {
        "sgd": sgd_step(plain, torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9), x, y),
        "whitened": sgd_step(whitened, prong, x, y),
        "reparametrize": prong.reparametrize,
    }
    stats: dict = {}
    timings = M.time_round_robin(fns, warmup=1, repeats=2 if args.quick else 7, max_foreign=0.1, stats=stats)
    t = {name: timing.median for name, timing in timings.items()}
    spread = {name: [min(timing.samples), max(timing.samples)] for name, timing in timings.items()}
    overhead = t["reparametrize"] / (args.every * t["whitened"])
    prong_vs_sgd = (t["whitened"] + t["reparametrize"] / args.every) / t["sgd"]
    rows = [
        ["SGD step (plain model)", f"{t['sgd'] * 1e3:.2f} ms", ""],
        ["SGD step (whitened model)", f"{t['whitened'] * 1e3:.2f} ms", f"{t['whitened'] / t['sgd']:.2f}x SGD"],
        [f"reparametrize ({args.samples} inputs)", f"{t['reparametrize'] * 1e3:.1f} ms",
         f"samples {spread['reparametrize'][0] * 1e3:.0f}-{spread['reparametrize'][1] * 1e3:.0f} ms"],
        [f"reparametrization overhead at T={args.every}", f"{overhead * 100:.1f} %", "target <= 10 %"],
        ["PRONG step, amortised", f"{prong_vs_sgd:.2f}x SGD", ""],
    ]
    print(C.format_table(["quantity", "value", "note"], rows, "lrl"))
    C.write_json_atomic(args.out, {
        "benchmark": "prong",
        "environment": C.environment_info(args.quick),
        "settings": {"every": args.every, "samples": args.samples, "batch_size": args.batch_size},
        "seconds": t,
        "seconds_min_max": spread,
        "rounds": stats,
        "reparam_overhead": overhead,
        "reparam_overhead_target": 0.10,
        "prong_vs_sgd": prong_vs_sgd,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
