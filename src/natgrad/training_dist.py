"""Distributed ``natgrad train``: DistributedDataParallel on torch.distributed, and ``--nproc``.

natgrad has no communication layer of its own: when ``torch.distributed`` is initialised with
more than one process (e.g. launched by ``torchrun``, or ``natgrad train --nproc N``, which runs
torchrun's elastic agent in-process), :func:`natgrad.training.train` trains the same run on
every rank:

* the model is wrapped in ``DistributedDataParallel``; every rank draws the same sequence of
  global batches (same seed) and trains on a contiguous slice of each: ``batch_size`` is the
  global batch and must be divisible by the world size. The slices of an epoch's last, shorter
  batch may differ by one example; the gradients are then averaged with weights n_r / n (a DDP
  communication hook), so R ranks step as one process with the whole batch would (exactly so in
  exact arithmetic for the deterministic estimators; the sums are ordered differently).
* ``train_loss`` is the mean over the global batch (one small all-reduce per step); the full
  evaluation runs on rank 0 only; with a time budget, rank 0's clock decides for every rank.
* rank 0 alone writes ``metrics.jsonl``, ``summary.json`` and ``checkpoint.pt`` (atomically);
  every rank returns the same summary (``records`` are rank 0's; empty on the other ranks).
* every rank draws its Monte-Carlo samples from its own torch RNG stream, seeded from
  ``(seed, rank)`` after the model is built; the checkpoint holds every rank's RNG state
  (gathered to rank 0), and on resume each rank restores its own. Every rank reads the
  checkpoint from the same path (a shared filesystem across machines). Resuming with another
  world size is an error: the RNG streams and batch slices belong to the world size.
* at the start every rank checks that all ranks have the same configuration and the same model
  (names, shapes, parameter values): a mismatch is a ValueError on every rank.

A failing rank or a collective that exceeds the process group's timeout ends every rank: the
failing process exits, torchrun's agent stops the others, and ``natgrad train --nproc`` prints
the first failure (its rank and message) and exits nonzero.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import importlib
import json
import logging
import math
import os
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .distributed import Communicator, DistributedError, model_fingerprint

__all__ = ["Ranks", "SINGLE", "current", "check_batch", "resume_world_error", "process_group_from_env",
           "record_error", "launch", "DEFAULT_TIMEOUT", "FAIL_ENV", "WORKER_ENV"]

DEFAULT_TIMEOUT = 300.0
# Test hook, read by natgrad.training: "RANK:STEP" makes that rank raise a RuntimeError just
# before training step STEP; "RANK:STEP:hang" makes it sleep instead (a hung rank, ended by the
# other ranks' process-group timeout). Only the failure tests of the distributed trainer use it.
FAIL_ENV = "NATGRAD_TEST_FAIL"
# Set by ``launch`` for its workers: they report errors through the error file only.
WORKER_ENV = "NATGRAD_LAUNCHED_WORKER"
# Where torchrun's agent expects a worker's error (read back by ``launch`` and by torchrun).
_ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


# --------------------------------------------------------------------------- per-rank helpers

class Ranks:
    """The ranks of the default process group, as the trainer sees them (see the module docstring).

    :data:`SINGLE` is the one-process case: rank 0 of 1, every method a no-op."""

    def __init__(self, group=None) -> None:
        self.group = group
        self.comm = None if group is None else Communicator(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self.world = 1 if group is None else dist.get_world_size(group)
        self.weight = 1.0  # this rank's share n_r / n of the current global batch
        self._fail: tuple[int, bool] | None | bool = False  # test hook, read on first use

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _collective(self, what: str, fn: Callable):
        try:
            return fn()
        except RuntimeError as error:
            if isinstance(error, DistributedError):
                raise
            raise DistributedError(
                f"rank {self.rank}/{self.world}: {what} failed — another rank stopped, or the process group "
                f"timed out (--timeout): {error}") from error

    # ------------------------------------------------------------ setup
    def check_batch(self, batch_size: int, n: int) -> None:
        check_batch(batch_size, self.world, n)

    def check_same(self, config: dict, model: nn.Module) -> None:
        """ValueError on every rank unless all ranks have the same ``config`` and model."""
        if self.comm is None:
            return
        description, checksums = model_fingerprint(model)
        self.comm.check_same(json.dumps(config, sort_keys=True) + "|" + description, checksums,
                             "natgrad train: configuration and initial model")

    def seed(self, seed: int) -> None:
        """Give this rank its own torch RNG stream (Monte-Carlo samples), seeded from (seed, rank)."""
        if self.comm is not None:
            digest = hashlib.sha256(f"natgrad:{seed}:{self.rank}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model DDP-wrapped, gradients averaged with weights ``self.weight`` (or ``model``)."""
        if self.comm is None:
            return model
        ddp = self._collective("wrapping the model in DistributedDataParallel",
                               lambda: nn.parallel.DistributedDataParallel(model, process_group=self.group))
        ddp.register_comm_hook(self, _weighted_all_reduce)
        return ddp

    def leader_does(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on rank 0; its ValueError/OSError is raised on every rank."""
        error = None
        if self.leader:
            try:
                fn(*args)
            except (ValueError, OSError) as exc:
                error = exc
        if self.comm is None:
            if error is not None:
                raise error
            return
        message = self.share(None if error is None else str(error), "sharing rank 0's result")
        if error is not None:
            raise error
        if message is not None:
            raise ValueError(message)

    # ------------------------------------------------------------ checkpoints
    def rng_states(self) -> dict | None:
        """Checkpoint entries on rank 0 (``None`` elsewhere): ``torch_rng`` (rank 0's),
        ``world_size`` and, with several ranks, ``rank_rngs`` (every rank's, gathered)."""
        rngs = self.gather(torch.get_rng_state())
        if rngs is None:
            return None
        return {"torch_rng": rngs[0], "world_size": self.world, **({"rank_rngs": rngs} if self.world > 1 else {})}

    def restore_rng(self, checkpoint: dict, where) -> None:
        """Restore this rank's torch RNG state; ValueError if the checkpoint's world size differs."""
        world = checkpoint.get("world_size", 1)
        if world != self.world:
            raise ValueError(resume_world_error(where, world, self.world))
        torch.set_rng_state(checkpoint["rank_rngs"][self.rank] if world > 1 else checkpoint["torch_rng"])

    # ------------------------------------------------------------ steps
    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the rows of ``x`` (the training inputs an optimizer
        draws statistics from, e.g. PRONG, which reparametrizes on the union of the ranks' draws)."""
        return x if self.comm is None else torch.tensor_split(x, self.world)[self.rank]

    def test_hook(self, step: int) -> None:
        """``NATGRAD_TEST_FAIL=RANK:STEP[:hang]`` (tests only): that rank raises a RuntimeError
        before training step STEP, or with ``:hang`` sleeps instead (a hung rank)."""
        if self._fail is False:
            spec = os.environ.get(FAIL_ENV, "").split(":")
            ok = len(spec) >= 2 and spec[0].isdigit() and spec[1].isdigit() and int(spec[0]) == self.rank
            self._fail = (int(spec[1]), spec[2:] == ["hang"]) if ok else None
        if self._fail is None or self._fail[0] != step:
            return
        if self._fail[1]:
            time.sleep(3600)
        raise RuntimeError(f"injected failure ({FAIL_ENV}) on rank {self.rank} at step {step}")

    def local(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's contiguous slice of the global batch ``(x, y)``."""
        if self.comm is None:
            return x, y
        n = x.shape[0]
        start = self.rank * (n // self.world) + min(self.rank, n % self.world)
        size = n // self.world + (1 if self.rank < n % self.world else 0)
        self.weight = size / n
        return x[start:start + size], y[start:start + size]

    def mean_loss(self, value: float) -> float:
        """The global batch's mean loss from this rank's mean ``value``."""
        if self.comm is None:
            return value
        (total,) = self.comm.all_reduce_numbers([value * self.weight], "the batch loss all-reduce")
        return total

    def leader_value(self, value: float) -> float:
        """Rank 0's ``value`` on every rank."""
        if self.comm is None:
            return value
        (total,) = self.comm.all_reduce_numbers([value if self.leader else 0.0], "sharing rank 0's clock")
        return total

    def gather(self, obj) -> list | None:
        """``[obj of rank 0, ..., obj of rank R−1]`` on rank 0, ``None`` elsewhere."""
        if self.comm is None:
            return [obj]
        out = [None] * self.world if self.leader else None
        self._collective("gathering the ranks' RNG states",
                         lambda: dist.gather_object(obj, out, dst=0, group=self.group))
        return out

    def share(self, obj, what: str = "sharing rank 0's summary"):
        """Rank 0's ``obj`` on every rank."""
        if self.comm is None:
            return obj
        return self.comm.broadcast_objects({"obj": obj}, {"obj": 0}, f"natgrad train: {what}")["obj"]


def _weighted_all_reduce(state, bucket):  # no annotations: DDP checks them against its own types
    """DDP communication hook: Σ_r (n_r / n) ∇(mean loss of rank r) = ∇(mean loss of the batch).

    On 3+ ranks each parameter's gradient is reduced on its own: the rounding of a sum over 3+
    ranks depends on where a value sits in the reduced buffer, and DDP re-orders its buckets
    after its first iteration, so with whole buckets a resumed run's first step would differ from
    the uninterrupted run's in the last bits (on 2 ranks a + b is exact either way)."""
    buffer = bucket.buffer()
    buffer.mul_(state.weight)
    if state.world < 3:
        future = dist.all_reduce(buffer, group=state.group, async_op=True).get_future()
        return future.then(lambda f: f.value()[0])
    pieces = torch.split(buffer, [p.numel() for p in bucket.parameters()])
    works = [dist.all_reduce(piece, group=state.group, async_op=True) for piece in pieces]
    return torch.futures.collect_all([w.get_future() for w in works]).then(lambda _: buffer)


SINGLE = Ranks()


def current() -> Ranks:
    """The default process group's ranks if torch.distributed is initialised with several
    processes, else :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Ranks(dist.group.WORLD)
    return SINGLE


def resume_world_error(where, saved: int, world: int) -> str:
    return (f"the checkpoint in {str(where)!r} was written by a run on {saved} process(es); resume it on {saved} "
            f"(natgrad train --nproc {saved}), not {world}: its RNG streams and batch slices belong to that number "
            "of processes")


def check_batch(batch_size: int, world: int, n: int | None = None) -> None:
    """ValueError unless the global ``batch_size`` splits evenly over ``world`` ranks (and, with
    ``n`` training examples, every rank gets at least one example of the epoch's last batch)."""
    if world == 1:
        return
    if batch_size % world:
        raise ValueError(f"the batch size ({batch_size}) is the global batch and must be divisible by the number "
                         f"of processes ({world}): use e.g. --batch-size {batch_size - batch_size % world or world}")
    if n is not None and 0 < n % batch_size < world:
        raise ValueError(f"the last batch of each epoch has {n % batch_size} example(s) ({n} examples, batch "
                         f"{batch_size}), fewer than the {world} processes: choose another batch size")


# --------------------------------------------------------------------------- process group from torchrun

@contextmanager
def process_group_from_env(timeout: float = DEFAULT_TIMEOUT):
    """Under torchrun (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ... in the environment) join the
    default process group — gloo: ``natgrad train`` computes on the CPU — with ``timeout``
    seconds per collective, and leave it at the end; otherwise do nothing. Yields the rank."""
    if "WORLD_SIZE" not in os.environ or (dist.is_available() and dist.is_initialized()):
        yield dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                         "(or natgrad train --nproc N)")
    # torch._dynamo (imported by any torch optimizer anyway) keeps references to a process group
    # that exists when it is imported, so that destroy_process_group would not free the group:
    # its gloo threads would outlive the interpreter and abort the process at exit ("terminate
    # called without an active exception", pytorch/pytorch#190489). Imported first, it does not.
    importlib.import_module("torch._dynamo")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    try:
        yield dist.get_rank()
    finally:
        gc.collect()  # DDP wrappers in reference cycles hold the group too (see above)
        dist.destroy_process_group()


def record_error(error: BaseException, when: float | None = None) -> None:
    """Write ``error`` to torchelastic's error file of this worker (if the agent gave one): the
    message, and natgrad's own entry with the rank and the precise time ``when`` it was raised
    (default now), by which :func:`launch` finds the first failure."""
    path = os.environ.get(_ERROR_FILE_ENV)
    if not path:
        return
    rank = int(os.environ.get("RANK", 0))
    message = f"{type(error).__name__}: {error}"
    data = {"message": message, "timestamp": int(time.time()),
            "natgrad": {"rank": rank, "message": message, "text": str(error), "time": when or time.time(),
                        "usage": isinstance(error, (ValueError, TypeError, NotImplementedError, OSError))}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


# --------------------------------------------------------------------------- natgrad train --nproc

def launch(argv: list[str], nproc: int, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str | None]:
    """Run ``python -m natgrad.cli.main *argv`` on ``nproc`` local processes with torchrun's elastic
    agent (standalone rendezvous, no restarts). Returns ``(exit code, error message or None)``:
    the message names the first rank that failed (by the time it raised) and what it raised;
    the agent has stopped every other rank by then."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", rdzv_configs={"timeout": int(max(timeout, 60))}, max_restarts=0,
        monitor_interval=0.1, start_method="spawn", shutdown_timeout=5,
    )
    quiet = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
             if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))]
    levels = [log.level for log in quiet]
    saved = {k: os.environ.get(k) for k in (WORKER_ENV, "OMP_NUM_THREADS")}
    os.environ[WORKER_ENV] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        for log in quiet:  # natgrad reports the failure itself, in one message
            log.setLevel(logging.CRITICAL)
        elastic_launch(config, sys.executable)("-m", "natgrad.cli.main", *argv)
        return 0, None
    except ChildFailedError as failed:
        return _failure_message(failed.failures, nproc, timeout)
    except SignalException as signal:  # e.g. Ctrl-C: the agent has stopped the ranks
        return 130, f"interrupted by signal {signal.sigval.name}; every rank has been stopped"
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _failure_message(failures: dict, nproc: int, timeout: float) -> tuple[int, str]:
    """Exit code and message for the ranks' ``failures`` (torchelastic's ProcessFailure by rank)."""
    reports = []  # (time raised, rank, "Type: message", message, usage error?)
    for rank, failure in failures.items():
        own = failure.error_file_data.get("natgrad") if isinstance(failure.error_file_data, dict) else None
        if own:
            reports.append((own["time"], rank, own["message"], own["text"], own["usage"]))
        elif failure.exitcode < 0:  # stopped by the agent (SIGTERM), or killed/crashed: then first
            name = failure.signal_name()
            reports.append((math.inf if name == "SIGTERM" else -math.inf, rank, f"stopped by signal {name}", "", False))
        else:
            reports.append((math.inf, rank, f"exited with code {failure.exitcode} without a Python error", "", False))
    reports.sort()
    _, rank, message, text, usage = reports[0]
    if usage and len(reports) == nproc and all(r[3] == text for r in reports):
        return 2, text  # every rank raised the same error about the input, e.g. a bad option
    lines = [f"rank {rank} of {nproc} failed: {message}"]
    lines += [f"  rank {other}: {_shorten(what)}" for _, other, what, _, _ in reports[1:]]
    lines.append(f"  every rank has been stopped (collectives wait at most --timeout {timeout:g} s)")
    return 1, "\n".join(lines)


def _shorten(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
