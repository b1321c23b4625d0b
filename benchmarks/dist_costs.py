#!/usr/bin/env python
"""Bytes and seconds of distributed K-FAC, by formula: natgrad's design and KAISA's.

Used by ``dist_bench.py`` (the predicted bytes next to the measured ones) and by
``docs/distributed-costs.md`` (the cost model evaluated for ResNet-50). As a script it prints
the ResNet-50 tables of the doc and, with ``--png``, draws its figure:

    python benchmarks/dist_costs.py                       # tables (markdown) on stdout
    python benchmarks/dist_costs.py --png docs/distributed-costs.png

Counting conventions (all per rank, float32 = 4 bytes):

* payload — the bytes a rank hands to a collective (what ``natgrad.distributed.Communicator``
  counts in ``payload_bytes``; for a broadcast every member of the group counts the buffer);
* wire — the bytes a rank sends, on average over the ranks, with a ring all-reduce
  (2(R−1)/R · n per rank) and a tree/pipeline broadcast (the R−1 receivers get n once each:
  (g−1)·n in all for a group of g ranks, shared over the R ranks).

KAISA (Pauloski et al., SC'21; kfac-pytorch ``KFACPreconditioner`` defaults:
``symmetry_aware=False``, ``compute_method=EIGEN``, ``compute_eigenvalue_outer_product=True``,
``colocate_factors=True``, ``grad_worker_fraction=COMM_OPT`` = 1): factors all-reduced as full
d² matrices on factor-update steps; on inverse-update steps each layer's inverse worker
broadcasts Q_A (d_A²), Q_G (d_G²) and 1/(d_G d_Aᵀ + λ) (d_G·d_A) to its gradient-worker group
(f·R ranks); on every step, when f < 1, each layer's preconditioned gradient (d_G·d_A) is
broadcast from its gradient worker to its receiver group (1/f ranks).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.use_repo_sources()

F32 = 4
BROADCAST_LABELS = {"inverses", "preconditioned gradients"}  # natgrad's broadcast labels


@dataclass(frozen=True)
class Layer:
    name: str
    d_a: int  # C_in·k² (+1 with a bias)
    d_g: int  # C_out
    positions: int = 1  # output locations T (1 for Linear)

    @property
    def params(self) -> int:  # weight (+ bias) = d_G · d_A
        return self.d_a * self.d_g

    @property
    def macs(self) -> int:  # forward multiply-adds per example
        return self.positions * self.d_a * self.d_g


def tri(d: int) -> int:
    return d * (d + 1) // 2


def mlp_layers() -> list[Layer]:
    """The 784-512-256-10 MLP (Linear layers with biases)."""
    return [Layer(f"fc{i}", i_ + 1, o) for i, (i_, o) in enumerate([(784, 512), (512, 256), (256, 10)])]


def resnet50_layers() -> list[Layer]:
    """torchvision's ResNet-50 (v1.5: stride on the 3×3 conv) at 224×224: 53 convolutions
    without bias and the 2048→1000 classifier with bias, with their output locations."""
    layers = [Layer("conv1", 3 * 49, 64, 112 * 112)]
    c_in, res = 64, 56
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 1) else 1
            out_res = res // stride
            p = f"layer{stage}.{b}"
            layers += [Layer(p + ".conv1", c_in, planes, res * res),
                       Layer(p + ".conv2", planes * 9, planes, out_res * out_res),
                       Layer(p + ".conv3", planes, 4 * planes, out_res * out_res)]
            if b == 0:
                layers.append(Layer(p + ".downsample", c_in, 4 * planes, out_res * out_res))
            c_in, res = 4 * planes, out_res
    layers.append(Layer("fc", 2048 + 1, 1000))
    return layers


RESNET50_BN_PARAMS = 53_120  # 2 · Σ C_out of the 53 BatchNorm layers: updated by `other`, in DDP's all-reduce


# --------------------------------------------------------------------------------------
# Bytes per step, natgrad
# --------------------------------------------------------------------------------------
def step_kinds(steps, stat_every: int, inverse_every: int) -> list[str]:
    """'inverse' (inverses recomputed: every inverse_every steps and steps 0-2), 'statistics'
    (statistics only) or 'plain', for each step index (as natgrad's Schedule)."""
    return ["inverse" if (s % inverse_every == 0 or s < 3) else
            "statistics" if s % stat_every == 0 else "plain" for s in steps]


def natgrad_step_payload(layers, method: str, sharding: str, stat: bool, inverse: bool,
                         world: int, first: bool = False) -> dict[str, int]:
    """Payload bytes per rank of one natgrad step, by Communicator label (``what``).
    ``method``: kfac | ekfac | sgd; factored damping (K-FAC's default)."""
    if world == 1 or method == "sgd":
        return {}
    out = {"quadratic model": 8 * (2 if first else 4)}  # float64 Fisher-norm sums + count
    tri_sum = sum(tri(l.d_a) + tri(l.d_g) for l in layers)
    if stat:
        out["Kronecker factors"] = F32 * (tri_sum + 1)  # + the example count, same bucket
        if method == "ekfac":
            out["EKFAC scales"] = F32 * sum(l.params for l in layers)
    if inverse and sharding == "inverses":
        if method == "ekfac":  # eigenvalues and full eigenvector matrices
            out["inverses"] = F32 * sum(l.d_a + l.d_a ** 2 + l.d_g + l.d_g ** 2 for l in layers)
        else:  # (A + ·)⁻¹, (G + ·)⁻¹ as upper triangles
            out["inverses"] = F32 * tri_sum
    if sharding == "gradients":
        out["preconditioned gradients"] = F32 * sum(l.params for l in layers)
    return out


def natgrad_payload(layers, method, sharding, stat_every, inverse_every, steps, world) -> dict[str, int]:
    """Σ over ``steps`` (indices) of :func:`natgrad_step_payload`, by label."""
    total: dict[str, int] = {}
    for s, kind in zip(steps, step_kinds(steps, stat_every, inverse_every)):
        one = natgrad_step_payload(layers, method, sharding, s % stat_every == 0, kind == "inverse",
                                   world, first=s == 0)
        for k, v in one.items():
            total[k] = total.get(k, 0) + v
    return total


def wire(label: str, payload: float, world: int) -> float:
    """Average bytes sent per rank for ``payload`` handed to the collective labelled ``label``."""
    if world == 1:
        return 0.0
    return payload * ((world - 1) / world if label in BROADCAST_LABELS else 2 * (world - 1) / world)


# --------------------------------------------------------------------------------------
# Bytes per step, KAISA (kfac-pytorch) for the same model and schedule
# --------------------------------------------------------------------------------------
def kaisa_step_bytes(layers, world: int, fraction: float, stat: bool, inverse: bool,
                     symmetry_aware: bool = False) -> dict[str, tuple[float, float]]:
    """{component: (payload, wire)} per rank (averaged over ranks) for one KAISA step with
    gradient-worker fraction ``fraction`` (1 = COMM-OPT, 1/R = MEM-OPT)."""
    if world == 1:
        return {}
    workers = max(1, round(world * fraction))  # gradient workers per layer (group size)
    out: dict[str, tuple[float, float]] = {}
    if stat:
        n = F32 * sum((tri(l.d_a) + tri(l.d_g)) if symmetry_aware else (l.d_a ** 2 + l.d_g ** 2)
                      for l in layers)
        out["factors"] = (n, 2 * (world - 1) / world * n)
    if inverse and workers > 1:  # each layer: one broadcast in a group of `workers` ranks
        n = F32 * sum(l.d_a ** 2 + l.d_g ** 2 + l.d_g * l.d_a for l in layers)
        out["inverses"] = (n * workers / world, n * (workers - 1) / world)
    receivers = world // workers
    if receivers > 1:  # each layer: `workers` broadcasts, each in a group of `receivers` ranks
        n = F32 * sum(l.params for l in layers)
        out["gradients"] = (n, n * (receivers - 1) * workers / world)
    return out


def kaisa_payload(layers, world, fraction, stat_every, inverse_every, steps) -> dict[str, list[float]]:
    total: dict[str, list[float]] = {}
    for s in steps:  # kfac-pytorch has no extra refreshes on the first steps
        for k, (p, w) in kaisa_step_bytes(layers, world, fraction, s % stat_every == 0,
                                          s % inverse_every == 0).items():
            t = total.setdefault(k, [0.0, 0.0])
            t[0] += p
            t[1] += w
    return total


# --------------------------------------------------------------------------------------
# Time model
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hardware:
    flops: float = 40e12  # dense matmul rate per rank (forward/backward, statistics, preconditioning)
    inverse_flops: float = 1e12  # rate of the d×d factorizations (small, latency-bound kernels)
    bandwidth: float = 12.5e9  # bytes/s per rank (100 Gb/s network)
    latency: float = 20e-6  # seconds per message step

    def allreduce(self, nbytes: float, world: int) -> float:  # ring
        if world == 1:
            return 0.0
        return 2 * (world - 1) / world * nbytes / self.bandwidth + 2 * (world - 1) * self.latency

    def broadcast(self, nbytes: float, world: int) -> float:  # pipelined, binomial start-up
        if world == 1:
            return 0.0
        return nbytes / self.bandwidth + math.ceil(math.log2(world)) * self.latency


def owners(costs: list[float], world: int) -> list[int]:
    from natgrad.distributed import assign_owners  # the optimizer's own greedy assignment

    return assign_owners(costs, world)


def model_step(layers, world: int, batch: int, stat_every: int, inverse_every: int, sharding: str,
               hw: Hardware, extra_params: int = 0) -> dict[str, float]:
    """Seconds per step per rank (amortised over the schedule) of each part, for global batch
    ``batch`` split over ``world`` ranks; ``extra_params`` (e.g. BatchNorm) only in DDP's
    all-reduce. Factored damping (Cholesky inverses, ≈ d³ flops per factor)."""
    local = batch / world
    params = sum(l.params for l in layers) + extra_params
    cost = [float(l.d_a ** 3 + l.d_g ** 3) for l in layers]
    own = owners(cost, world) if sharding != "replicated" else [0] * len(layers)
    load = [0.0] * world
    for c, r in zip(cost, own):
        load[r] += c
    precond = [2.0 * (l.d_g ** 2 * l.d_a + l.d_g * l.d_a ** 2) for l in layers]
    if sharding == "gradients":  # each rank its own layers; the slowest rank sets the pace
        per_rank = [0.0] * world
        for p, r in zip(precond, own):
            per_rank[r] += p
        precond_flops = max(per_rank)
    else:
        precond_flops = sum(precond)
    tri_bytes = F32 * sum(tri(l.d_a) + tri(l.d_g) for l in layers)
    out = {
        "forward+backward": 2 * 3 * local * sum(l.macs for l in layers) / hw.flops,
        # the Monte-Carlo Fisher backprop (≈ one forward's MACs) and the factor sums
        "statistics": 2 * local * sum(l.macs + l.positions * (l.d_a ** 2 + l.d_g ** 2) for l in layers)
        / hw.flops / stat_every,
        "inverses": (max(load) if sharding != "replicated" else sum(cost)) / hw.inverse_flops / inverse_every,
        "preconditioning": precond_flops / hw.flops,
        "DDP all-reduce": hw.allreduce(F32 * params, world),
        "factor all-reduce": hw.allreduce(tri_bytes, world) / stat_every,
        "inverse broadcast": (hw.broadcast(tri_bytes, world) / inverse_every
                              if sharding == "inverses" else 0.0),
        "gradient broadcast": (hw.broadcast(F32 * sum(l.params for l in layers), world)
                               if sharding == "gradients" else 0.0),
    }
    return out


COMPUTE = ("forward+backward", "statistics", "inverses", "preconditioning")


def tables(hw: Hardware, batch: int, worlds, stat_every: int, inverse_every: int) -> str:
    layers = resnet50_layers()
    lines = [f"ResNet-50: {len(layers)} K-FAC layers, {sum(l.params for l in layers):,} of their "
             f"parameters (+{RESNET50_BN_PARAMS:,} BatchNorm), {sum(l.macs for l in layers) / 1e9:.2f} "
             f"GMAC forward per image; global batch {batch}, stat_every={stat_every}, "
             f"inverse_every={inverse_every}; {hw}", ""]
    for sharding in ("inverses", "gradients", "replicated"):
        lines += [f"sharding={sharding!r} (ms per step per rank)", "",
                  "| R | fwd+bwd | stats | inverses | precond | DDP | factors | inv bcast | grad bcast "
                  "| compute | comm | comm/compute |", "|" + "---|" * 12]
        for r in worlds:
            m = model_step(layers, r, batch, stat_every, inverse_every, sharding, hw, RESNET50_BN_PARAMS)
            comp = sum(m[k] for k in COMPUTE)
            comm = sum(v for k, v in m.items() if k not in COMPUTE)
            cells = [f"{1e3 * v:.2f}" for v in m.values()]
            lines.append(f"| {r} | " + " | ".join(cells) + f" | {1e3 * comp:.1f} | {1e3 * comm:.1f} "
                         f"| {comm / comp:.2f} |")
        lines.append("")
    lines += ["Bytes per step per rank (wire model, MB, averaged over a period; DDP's "
              f"{F32 * (sum(l.params for l in layers) + RESNET50_BN_PARAMS) / 1e6:.0f} MB payload not included)", "",
              "| R | natgrad inverses | natgrad gradients | KAISA COMM-OPT | KAISA HYBRID-OPT 0.5 | KAISA MEM-OPT |",
              "|" + "---|" * 6]
    steps = range(10 * inverse_every, 20 * inverse_every)
    for r in worlds[1:]:
        cells = []
        for sharding in ("inverses", "gradients"):
            tot = natgrad_payload(layers, "kfac", sharding, stat_every, inverse_every, steps, r)
            cells.append(sum(wire(k, v, r) for k, v in tot.items()) / len(steps))
        for f in (1.0, 0.5, 1.0 / r):
            tot = kaisa_payload(layers, r, f, stat_every, inverse_every, steps)
            cells.append(sum(w for _, w in tot.values()) / len(steps) if r * f >= 1 else float("nan"))
        lines.append(f"| {r} | " + " | ".join(f"{c / 1e6:.0f}" for c in cells) + " |")
    return "\n".join(lines)


def plot(path: Path, hw: Hardware, batch: int, worlds) -> None:
    """Compute and communication per step against R, for two schedules (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = resnet50_layers()
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), sharey=True)
    for ax, (stat_every, inverse_every) in zip(axes, [(1, 10), (10, 100)]):
        for sharding, style in (("inverses", "-"), ("gradients", "--"), ("replicated", ":")):
            ms = [model_step(layers, r, batch, stat_every, inverse_every, sharding, hw, RESNET50_BN_PARAMS)
                  for r in worlds]
            ax.plot(worlds, [1e3 * sum(m[k] for k in COMPUTE) for m in ms], "C0" + style,
                    label=f"compute ({sharding})")
            ax.plot(worlds[1:], [1e3 * sum(v for k, v in m.items() if k not in COMPUTE) for m in ms[1:]],
                    "C3" + style, label=f"communication ({sharding})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks R")
        ax.set_title(f"stat_every={stat_every}, inverse_every={inverse_every}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms per step per rank (model)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"K-FAC on ResNet-50, global batch {batch} (cost model, docs/distributed-costs.md)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def fit_link(link: dict, world: int) -> tuple[float, float]:
    """(latency α, bandwidth β) of the ring model fitted (least squares) to the benchmark's
    all-reduce timings on ``world`` ranks: t = 2(R−1)α + 2(R−1)/R · n/β."""
    pts = [(2 * (world - 1) / world * x["bytes"], x["seconds"]) for x in link["allreduce"]]
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return max(my - slope * mx, 0.0) / (2 * (world - 1)), 1.0 / slope


def validate(path: Path) -> str:
    """The MLP cost model against a dist_bench JSON: communication per step (ms) predicted
    from the fitted α, β and the byte counts, next to the measured one; computation at R > 1
    predicted from R = 1 with the flop rate fitted there (same rate for every part)."""
    import json

    doc = json.loads(Path(path).read_text())
    layers = mlp_layers()
    lines = ["| R | case | α µs | β MB/s | comm model ms | comm measured ms | compute model ms "
             "| compute measured ms |", "|" + "---|" * 8]
    one = {r["case"]: r for r in doc["runs"] if r["world"] == 1 and not r["error"]}
    batch = doc["settings"]["global_batch"]
    for r in doc["runs"]:
        if r["error"] or r["world"] == 1 or r["method"] == "sgd" or str(r["world"]) not in doc["link"]:
            continue
        world, sharding = r["world"], r["sharding"]
        alpha, beta = fit_link(doc["link"][str(world)], world)
        hw = Hardware(flops=1.0, inverse_flops=1.0, bandwidth=beta, latency=alpha)
        m = model_step(layers, world, batch, r["stat_every"], r["inverse_every"], sharding, hw)
        comm = sum(v for k, v in m.items() if k not in COMPUTE)
        base = one.get(r["case"])
        comp = "-"
        if base:
            m1 = model_step(layers, 1, batch, r["stat_every"], r["inverse_every"], sharding, hw)
            rate = sum(m1[k] for k in COMPUTE) / base["mean"]["compute_seconds"]
            comp = f"{1e3 * sum(m[k] for k in COMPUTE) / rate:.1f}"
        lines.append(f"| {world} | {r['case']} | {1e6 * alpha:.0f} | {beta / 1e6:.0f} | {1e3 * comm:.1f} "
                     f"| {1e3 * r['mean']['comm_seconds']:.1f} | {comp} | {1e3 * r['mean']['compute_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--png", type=Path, default=None, help="write the figure here")
    p.add_argument("--batch", type=int, default=2048, help="global batch (default 2048)")
    p.add_argument("--stat-every", type=int, default=1)
    p.add_argument("--inverse-every", type=int, default=10)
    p.add_argument("--flops", type=float, default=Hardware.flops)
    p.add_argument("--inverse-flops", type=float, default=Hardware.inverse_flops)
    p.add_argument("--bandwidth", type=float, default=Hardware.bandwidth, help="bytes/s per rank")
    p.add_argument("--latency", type=float, default=Hardware.latency, help="seconds per message step")
    p.add_argument("--validate", type=Path, default=None, metavar="JSON",
                   help="instead: the MLP model against a dist_bench.py result")
    args = p.parse_args(argv)
    if args.validate:
        print(validate(args.validate))
        return 0
    hw = Hardware(args.flops, args.inverse_flops, args.bandwidth, args.latency)
    worlds = [1, 2, 4, 8, 16, 32, 64]
    print(tables(hw, args.batch, worlds, args.stat_every, args.inverse_every))
    if args.png:
        plot(args.png, hw, args.batch, worlds)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
