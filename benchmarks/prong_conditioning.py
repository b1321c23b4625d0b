#!/usr/bin/env python
"""Why PRONG works: per layer, the condition number of the K-FAC input factor and of the
K-FAC Fisher block during training, PRONG against SGD.

Both runs start from the same initialisation and see the same batches: SGD (momentum 0.9) on
the task's model, and PRONG (``natgrad.optim.PRONG``: the same SGD on the whitened model,
reparametrized every ``--every`` steps from ``--samples`` training inputs, ε = ``--eps``).
Every ``--record-every`` steps, ``natgrad.diagnostics.condition_numbers`` measures on a fixed
set of ``--probe`` training inputs, per layer: ``cond(A + δI)`` of the input factor
``A = E[[h; 1][h; 1]ᵀ]`` (for PRONG's whitened layers ``h_e = U (h − μ)``) and
``cond(G ⊗ A + δI)`` of the K-FAC block (exact Fisher of the categorical output), with the
damping δ = ``--damping`` (the last layer's output factor is singular — softmax is invariant
to a common shift of the logits — so without damping its block is always infinite).

    python benchmarks/prong_conditioning.py            # -> results/prong_conditioning.{json,png}
    python benchmarks/prong_conditioning.py --png docs/prong_conditioning.png   # the README's figure
    python benchmarks/prong_conditioning.py --quick    # CI smoke run (tests/test_prong_conditioning_quick.py)
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.use_repo_sources()

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
QUANTITIES = {"input_factor": "input factor A", "kfac_block": "K-FAC block G ⊗ A"}


def record(conds: dict, model: torch.nn.Module, probe: torch.Tensor, damping: float) -> None:
    import natgrad

    for layer, values in natgrad.diagnostics.condition_numbers(model, probe, damping=damping).items():
        for quantity in QUANTITIES:
            value = values[quantity]
            conds.setdefault(layer, {}).setdefault(quantity, []).append(value if math.isfinite(value) else None)


def train(args) -> dict:
    import natgrad
    from natgrad.tasks import get_task

    task = get_task(args.task)
    data = task.load()
    torch.manual_seed(args.seed)
    sgd_model = task.make_model()
    prong_model = natgrad.nn.whiten(copy.deepcopy(sgd_model))
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=args.lr, momentum=0.9)
    prong = natgrad.optim.PRONG(prong_model, torch.optim.SGD(prong_model.parameters(), lr=args.lr, momentum=0.9),
                                data.x_train, every=args.every, samples=args.samples, eps=args.eps, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    probe = data.x_train[torch.randperm(data.x_train.shape[0], generator=g)[: args.probe]]
    runs = {"sgd": (sgd_model, sgd), "prong": (prong_model, prong)}
    out = {name: {"conditions": {}, "loss": []} for name in runs}
    steps: list[int] = []
    n = data.x_train.shape[0]
    for step in range(args.steps + 1):
        if step % args.record_every == 0 or step == args.steps:
            steps.append(step)
            for name, (model, _) in runs.items():
                record(out[name]["conditions"], model, probe, args.damping)
                with torch.no_grad():
                    out[name]["loss"].append(float(task.loss(model(data.x_train), data.y_train)))
        if step == args.steps:
            break
        index = torch.randint(0, n, (task.batch_size,), generator=g)
        for model, opt in runs.values():
            opt.zero_grad()
            task.loss(model(data.x_train[index]), data.y_train[index]).backward()
            opt.step()
    return {"task": task.name, "description": task.description, "steps": steps, **out}


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = list(result["sgd"]["conditions"])
    fig = Figure(figsize=(3.2 * len(layers), 5.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(QUANTITIES), len(layers), squeeze=False, sharex=True)
    for row, (quantity, label) in enumerate(QUANTITIES.items()):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            for name, color in (("sgd", "tab:blue"), ("prong", "tab:orange")):
                points = [(s, v) for s, v in zip(result["steps"], result[name]["conditions"][layer][quantity])
                          if v is not None and v > 0]
                if points:
                    ax.plot(*zip(*points), color=color, label=name.upper())
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            if row == 0:
                ax.set_title(f"layer {layer}", fontsize=10)
            if col == 0:
                ax.set_ylabel(f"cond, {label}", fontsize=9)
            if row == len(QUANTITIES) - 1:
                ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"{result['task']}: PRONG (T={s['every']}, ε={s['eps']:g}) vs SGD, lr {s['lr']:g}, "
                 f"damping δ={s['damping']:g}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d-mlp", help="a natgrad task (default mnist1d-mlp)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--record-every", type=int, default=50, help="measure every this many steps")
    parser.add_argument("--lr", type=float, default=0.03, help="SGD learning rate (both runs; PRONG diverges at 0.1 on mnist1d-mlp)")
    parser.add_argument("--every", type=int, default=100, help="PRONG's reparametrization period T")
    parser.add_argument("--samples", type=int, default=1000, help="PRONG's inputs per reparametrization")
    parser.add_argument("--eps", type=float, default=1e-2, help="PRONG's ε")
    parser.add_argument("--damping", type=float, default=1e-4, help="δ in cond(M + δI)")
    parser.add_argument("--probe", type=int, default=1000, help="training inputs the condition numbers are measured on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="digits-mlp, 60 steps (CI smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "prong_conditioning.json", help="JSON path")
    parser.add_argument("--png", type=Path, default=None, help="plot path (default: --out with the suffix .png)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.task, args.steps, args.record_every, args.every, args.samples, args.probe = "digits-mlp", 60, 20, 20, 300, 300
    for name in ("steps", "record_every", "every", "samples", "probe"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = train(args)
    result["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "png", "no_plot")}
    result["seconds"] = time.perf_counter() - start
    result["note"] = "condition numbers: null = infinite (singular matrix, damping 0)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    C.write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    for layer in result["sgd"]["conditions"]:
        last = {name: result[name]["conditions"][layer] for name in ("sgd", "prong")}
        print(f"layer {layer}: input factor SGD {last['sgd']['input_factor'][-1]} PRONG {last['prong']['input_factor'][-1]}; "
              f"K-FAC block SGD {last['sgd']['kfac_block'][-1]} PRONG {last['prong']['kfac_block'][-1]}")
    if not args.no_plot:
        png = args.png or args.out.with_suffix(".png")
        plot(result, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
