"""What each process of ``dist_bench.py`` runs: the cases (the MLP under DDP with SGD, K-FAC or
EKFAC), DDP's all-reduce counted by a synchronous comm hook, natgrad's collectives counted by
label, the link test, and ``worker``, the entry point ``dist_bench.py`` spawns on every rank."""
from __future__ import annotations

import datetime
import gc
import os
import statistics
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as Fn

import _common as C
import dist_costs as K

INVERSE_EVERY = 10
# name: (method, sharding, stat_every)
CASES = {
    "sgd": ("sgd", None, 1),
    "kfac-inverses": ("kfac", "inverses", 1),
    "kfac-gradients": ("kfac", "gradients", 1),
    "ekfac-inverses": ("ekfac", "inverses", 1),
    "kfac-inverses-stat10": ("kfac", "inverses", 10),
    "kfac-gradients-stat10": ("kfac", "gradients", 10),
}
LINK_SIZES = [2 ** 10, 2 ** 16, 2 ** 19, 2 ** 21]  # float32 elements: 4 KB … 8 MB


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.Tanh(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


class DDPCounter:
    """DDP comm hook state: all-reduce each bucket synchronously, count bytes and seconds
    (``wait``: in a barrier just before, i.e. waiting for the slowest rank)."""

    def __init__(self, world: int) -> None:
        self.world, self.bytes, self.seconds, self.wait, self.calls = world, 0, 0.0, 0.0, 0


def counting_hook(state: DDPCounter, bucket):
    buffer = bucket.buffer()
    start = time.perf_counter()
    dist.barrier()
    state.wait += time.perf_counter() - start
    start = time.perf_counter()
    dist.all_reduce(buffer)
    state.seconds += time.perf_counter() - start
    state.bytes += buffer.numel() * buffer.element_size()
    state.calls += 1
    buffer.div_(state.world)
    future = torch.futures.Future()
    future.set_result(buffer)
    return future


def label_tally(comm) -> dict:
    """Split the Communicator's accounting by the collective's label (wraps its private
    ``_run``; the totals used for the figures are the public ``payload_bytes``/``seconds``).
    A barrier before each collective takes the waiting for the slowest rank out of the
    transfer time: {label: [bytes, transfer seconds, wait seconds]}."""
    tally: dict[str, list] = {}
    run = comm._run

    def counted(what, op, tensor):
        start = time.perf_counter()
        dist.barrier(group=comm.group)
        wait = time.perf_counter() - start
        b, s = comm.payload_bytes, comm.seconds
        run(what, op, tensor)
        entry = tally.setdefault(what, [0, 0.0, 0.0])
        entry[0] += comm.payload_bytes - b
        entry[1] += comm.seconds - s
        entry[2] += wait

    comm._run = counted
    return tally


def run_case(rank: int, world: int, name: str, cfg: dict, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    import natgrad.optim as O

    method, sharding, stat_every = CASES[name]
    model = build_model()
    counter = DDPCounter(world)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
        net.register_comm_hook(counter, counting_hook)
    schedule = O.Schedule(stat_every=stat_every, inverse_every=INVERSE_EVERY)
    if method == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    else:
        cls = O.KFAC if method == "kfac" else O.EKFAC
        opt = cls(net, likelihood="categorical", schedule=schedule, sharding=sharding)
    comm = getattr(opt, "comm", None)
    tally = label_tally(comm) if comm is not None else {}
    batch, local = cfg["global_batch"], cfg["global_batch"] // world
    n_batches = len(x) // batch
    records = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        g = step % n_batches
        rows = slice(g * batch + rank * local, g * batch + (rank + 1) * local)
        xb, yb = x[rows], y[rows]
        if world > 1:
            dist.barrier()
        before = (comm.payload_bytes, comm.seconds) if comm is not None else (0, 0.0)
        labels = {k: list(v) for k, v in tally.items()}
        ddp = (counter.bytes, counter.seconds, counter.wait)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = net(xb)
        loss = Fn.cross_entropy(out, yb)
        if method == "sgd":
            loss.backward()
            opt.step()
        else:
            opt.backward(loss, out)
            opt.step()
        seconds = time.perf_counter() - start
        if step < cfg["warmup"]:
            continue
        nat_bytes = comm.payload_bytes - before[0] if comm is not None else 0
        nat_seconds = comm.seconds - before[1] if comm is not None else 0.0
        by_label = {k: [x - y for x, y in zip(v, labels.get(k, [0, 0.0, 0.0]))] for k, v in tally.items()}
        records.append({
            "step": step, "kind": K.step_kinds([step], stat_every, INVERSE_EVERY)[0],
            "seconds": seconds, "natgrad_bytes": nat_bytes, "natgrad_seconds": nat_seconds,
            "ddp_bytes": counter.bytes - ddp[0], "ddp_seconds": counter.seconds - ddp[1],
            "wait_seconds": counter.wait - ddp[2] + sum(v[2] for v in by_label.values()),
            "by_label": {k: v for k, v in by_label.items() if v[0] or v[1]},
            "loss": float(loss.detach()),
        })
    return records


def link_test(world: int, reps: int) -> dict:
    """Median seconds of an all-reduce and of a broadcast (from rank 0) of each size."""
    out: dict[str, list] = {"allreduce": [], "broadcast": []}
    for n in LINK_SIZES:
        buf = torch.ones(n)
        for op, fn in (("allreduce", lambda: dist.all_reduce(buf)), ("broadcast", lambda: dist.broadcast(buf, 0))):
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[op].append({"bytes": 4 * n, "seconds": statistics.median(times)})
    return out


def worker(rank: int, world: int, directory: str, cfg: dict) -> None:
    torch.set_num_threads(1)
    result: dict = {"rank": rank, "cases": {}, "errors": {}}
    try:
        if world > 1:
            dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank,
                                    world_size=world, timeout=datetime.timedelta(seconds=cfg["timeout"]))
        n = cfg["n_images"]
        if cfg["synthetic"]:
            x, y = C.synthetic_classification(n, (784,), 10)
        else:
            x, y = C.load_mnist_test(cfg["mnist_dir"], n=n)
        for name in cfg["cases"]:
            try:
                result["cases"][name] = run_case(rank, world, name, cfg, x, y)
            except Exception:
                result["errors"][name] = traceback.format_exc()
                if world > 1:
                    raise  # the other ranks would wait forever in the next collective
        if world > 1:
            result["link"] = link_test(world, cfg["link_reps"])
    except BaseException:
        result["fatal"] = traceback.format_exc()
    finally:
        if world > 1 and dist.is_initialized():
            # DDP wrappers left in reference cycles hold the group: destroyed only at interpreter
            # exit, after gloo's threads, they aborted a rank now and then ("terminate called
            # without an active exception", 1 run in 5). Collect them while the group still exists.
            gc.collect()
            dist.destroy_process_group()
    torch.save(result, os.path.join(directory, f"result-{rank}.pt"))
