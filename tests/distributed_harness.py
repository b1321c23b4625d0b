"""Run a function on R gloo processes (CPU) and collect what each rank returns.

``run_ranks(world, fn, *args)`` spawns ``world`` processes, each joins a fresh gloo group
(file rendezvous in a temporary directory, a short timeout so a broken test fails instead of
hanging), calls ``fn(rank, world, *args)`` single-threaded and returns the list of results in
rank order. ``fn`` must be a module-level function (spawn pickles it by name). An exception on
any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import datetime
import gc
import os
import tempfile
import traceback

import torch
import torch._dynamo  # noqa: F401  see below
import torch.distributed as dist
import torch.multiprocessing as mp


# Imported after a group exists (as DDP and torch optimizers do), torch._dynamo keeps the group
# alive past destroy_process_group and its gloo threads can abort the rank at exit
# (pytorch/pytorch#190489); imported at module level, it is loaded before _worker joins a group.


def _worker(rank: int, world: int, directory: str, timeout: float, fn, args) -> None:
    torch.set_num_threads(1)
    path = os.path.join(directory, f"result-{rank}.pt")
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            result = {"ok": fn(rank, world, *args)}
        finally:
            gc.collect()  # DDP wrappers in reference cycles hold the group: free them while it exists
            dist.destroy_process_group()
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, path)


def run_ranks(world: int, fn, *args, timeout: float = 60.0) -> list:
    """``[fn(0, world, *args), …, fn(world − 1, world, *args)]``, each on its own process."""
    with tempfile.TemporaryDirectory() as directory:
        context = mp.start_processes(
            _worker, args=(world, directory, timeout, fn, args), nprocs=world, join=False, start_method="spawn"
        )
        while not context.join(timeout=timeout * 4):
            pass
        results = []
        for rank in range(world):
            path = os.path.join(directory, f"result-{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} wrote no result")
            result = torch.load(path, weights_only=False)
            if "error" in result:
                raise RuntimeError(f"rank {rank} failed:\n{result['error']}")
            results.append(result["ok"])
        return results
