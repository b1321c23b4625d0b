"""Scale-out on torch.distributed: the few collectives natgrad needs, bucketed and accounted.

natgrad has no communication layer of its own: a :class:`Communicator` wraps a
``torch.distributed`` process group (gloo on CPU, NCCL on GPUs) and offers

* :meth:`Communicator.all_reduce` — the sum over ranks of a list of tensors in few flat
  buckets; symmetric matrices (Kronecker factors, covariances) travel as upper triangles,
  d(d+1)/2 instead of d² numbers;
* :meth:`Communicator.broadcast_owned` — every rank broadcasts the tensors it computed (a layer's
  inverse on its owner rank, see :func:`assign_owners`), one bucket per owner;
* :meth:`Communicator.broadcast_objects` — the same for results whose shapes only their owner
  knows (PRONG's whitenings);
* :meth:`Communicator.all_gather_rows` — concatenation over ranks along the first dimension
  (ranks may hold different numbers of rows);
* :meth:`Communicator.check_same` — that every rank holds the same model and configuration.

Every call counts the bytes this rank hands to the collective (``payload_bytes``) and the time
spent in it (``seconds``): :mod:`benchmarks` reports them. A collective that fails — another
rank died, or the group's timeout (``init_process_group(timeout=...)``) expired — raises
:class:`DistributedError` naming the operation, instead of a bare gloo/NCCL message.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

BUCKET_BYTES = 32 * 2**20


class DistributedError(RuntimeError):
    """A collective operation failed on this rank (a peer failed or the group timed out)."""


def unwrap(model: object) -> nn.Module:
    """The module inside DistributedDataParallel/DataParallel wrappers (TypeError for non-modules)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def resolve_group(model: nn.Module | None, process_group: object = None) -> "Communicator | None":
    """The communicator for ``process_group``; ``None`` selects the group of a
    DistributedDataParallel ``model``, else the default group if torch.distributed is
    initialised. Returns ``None`` when there is nothing to communicate (one process)."""
    if process_group is None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            process_group = model.process_group
        elif dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        else:
            return None
    elif not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group first (or launch with torchrun)"
        )
    elif not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    if dist.get_world_size(process_group) == 1:
        return None
    return Communicator(process_group)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: greedy longest-processing-time scheduling of ``costs`` (e.g.
    d_A³ + d_G³ flops of a layer's inverses) onto ``world`` ranks; deterministic, so every rank
    computes the same assignment."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def _pack(tensor: Tensor, symmetric: bool) -> Tensor:
    if not symmetric:
        return tensor.reshape(-1)
    d = tensor.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=tensor.device)
    return tensor[..., rows, cols].reshape(-1)


def _unpack(flat: Tensor, like: Tensor, symmetric: bool) -> Tensor:
    if not symmetric:
        return flat.view_as(like)
    d = like.shape[-1]
    rows, cols = torch.triu_indices(d, d, device=like.device)
    out = torch.empty_like(like)
    values = flat.view(*like.shape[:-2], -1)
    out[..., rows, cols] = values
    out[..., cols, rows] = values
    return out


class Communicator:
    """One process group with accounting; see the module docstring."""

    def __init__(self, group: dist.ProcessGroup, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.bucket_bytes = bucket_bytes
        # where small bookkeeping tensors live: NCCL reduces CUDA tensors only
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.payload_bytes = 0
        self.seconds = 0.0
        self.calls = 0

    def _run(self, what: str, op, tensor: Tensor) -> None:
        start = time.perf_counter()
        try:
            op()
        except RuntimeError as error:
            raise DistributedError(
                f"rank {self.rank}/{self.world}: {what} failed — another rank stopped or diverged from "
                f"this one, or the process group timed out (set the bound with "
                f"init_process_group(timeout=...)): {error}"
            ) from error
        self.seconds += time.perf_counter() - start
        self.payload_bytes += tensor.numel() * tensor.element_size()
        self.calls += 1

    def _buckets(self, flats: list[Tensor]) -> list[list[int]]:
        """Indices of ``flats`` grouped into buckets of one dtype and at most ``bucket_bytes``."""
        buckets: list[list[int]] = []
        current: list[int] = []
        size = 0
        for i, flat in enumerate(flats):
            nbytes = flat.numel() * flat.element_size()
            if current and (flats[current[0]].dtype != flat.dtype or size + nbytes > self.bucket_bytes):
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            buckets.append(current)
        return buckets

    def all_reduce(self, tensors: list[Tensor], symmetric: Sequence[bool] | None = None, what: str = "all-reduce") -> list[Tensor]:
        """Σ over ranks of every tensor (new tensors; inputs untouched). ``symmetric[i]``: tensor i
        is a (batch of) symmetric matrices [..., d, d] and is sent as its upper triangle."""
        symmetric = [False] * len(tensors) if symmetric is None else list(symmetric)
        flats = [_pack(t, s) for t, s in zip(tensors, symmetric)]
        reduced: list[Tensor | None] = [None] * len(tensors)
        for bucket in self._buckets(flats):
            buffer = torch.cat([flats[i] for i in bucket])
            self._run(what, lambda: dist.all_reduce(buffer, group=self.group), buffer)
            for i, piece in zip(bucket, torch.split(buffer, [flats[i].numel() for i in bucket])):
                reduced[i] = _unpack(piece, tensors[i], symmetric[i])
        return reduced  # type: ignore[return-value]

    def all_reduce_max(self, tensor: Tensor, what: str = "all-reduce max") -> Tensor:
        """The elementwise maximum over ranks of ``tensor`` (a new tensor; MIN is −max(−x))."""
        buffer = tensor.clone()
        self._run(what, lambda: dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self.group), buffer)
        return buffer

    def all_reduce_numbers(self, values: Sequence[float], what: str = "all-reduce") -> list[float]:
        """Σ over ranks of a few float64 numbers."""
        (total,) = self.all_reduce([torch.tensor(list(values), dtype=torch.float64, device=self.device)], what=what)
        return total.tolist()

    def broadcast_owned(
        self, tensors: dict[object, list[Tensor]], owners: dict[object, int], symmetric: dict[object, list[bool]],
        what: str = "broadcast",
    ) -> None:
        """Make every rank's ``tensors[key]`` (in place) equal to those of rank ``owners[key]``.

        Non-owners pass tensors of the right shape and dtype (their values are overwritten).
        One bucketed broadcast per owning rank."""
        for src in range(self.world):
            keys = [k for k in tensors if owners[k] == src]
            items = [(k, j) for k in keys for j in range(len(tensors[k]))]
            if not items:
                continue
            flats = [_pack(tensors[k][j], symmetric[k][j]) for k, j in items]
            for bucket in self._buckets(flats):
                buffer = torch.cat([flats[i] for i in bucket])
                root = dist.get_global_rank(self.group, src) if self.group is not dist.group.WORLD else src
                self._run(what, lambda: dist.broadcast(buffer, src=root, group=self.group), buffer)
                if self.rank != src:
                    for i, piece in zip(bucket, torch.split(buffer, [flats[i].numel() for i in bucket])):
                        k, j = items[i]
                        tensors[k][j].copy_(_unpack(piece, tensors[k][j], symmetric[k][j]))

    def broadcast_objects(self, objects: dict[object, object], owners: dict[object, int], what: str = "broadcast") -> dict:
        """``{key: rank owners[key]'s objects[key]}`` on every rank, for picklable results whose
        shapes only the owner knows (non-owners' entries are ignored). One call per owning rank."""
        result = dict(objects)
        for src in range(self.world):
            keys = [k for k in objects if owners[k] == src]
            if not keys:
                continue
            payload = [[objects[k] for k in keys] if src == self.rank else None]
            root = dist.get_global_rank(self.group, src) if self.group is not dist.group.WORLD else src
            device = self.device if self.device.type == "cuda" else None
            marker = torch.empty(0)
            self._run(what, lambda: dist.broadcast_object_list(payload, src=root, group=self.group, device=device), marker)
            if src == self.rank:
                self.payload_bytes += len(pickle.dumps(payload[0]))
            result.update(zip(keys, payload[0]))
        return result

    def all_gather_rows(self, tensor: Tensor, what: str = "all-gather") -> Tensor:
        """The concatenation over ranks (in rank order) of ``tensor`` along dimension 0."""
        counts = [int(c) for c in self.all_reduce_numbers(
            [tensor.shape[0] if r == self.rank else 0 for r in range(self.world)], what)]
        longest = max(counts)
        padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._run(what, lambda: dist.all_gather(parts, padded.contiguous(), group=self.group), padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def check_same(self, description: str, values: Tensor, what: str, hint: str | None = None) -> None:
        """Raise ValueError on every rank unless all ranks pass the same ``description`` (e.g.
        parameter names and shapes, options) and bitwise the same float64 ``values``; ``hint``
        replaces the default advice (same model, same parameter values, same options)."""
        digest = hashlib.sha256(description.encode()).digest()[:7]
        local = torch.cat([torch.tensor([int.from_bytes(digest, "little")], dtype=torch.float64, device=self.device),
                           values.detach().to(device=self.device, dtype=torch.float64).reshape(-1)])
        lengths = self.all_reduce_numbers([local.numel() if r == self.rank else 0 for r in range(self.world)], what)
        if len(set(lengths)) == 1:
            gathered = [torch.empty_like(local) for _ in range(self.world)]
            self._run(what, lambda: dist.all_gather(gathered, local, group=self.group), local)
            bad = [r for r in range(self.world) if not torch.equal(gathered[r], gathered[0])]
        else:
            bad = [r for r in range(self.world) if lengths[r] != lengths[0]]
        if bad:
            hint = hint or (
                "every rank must build the same model with the same parameter values "
                "(DistributedDataParallel broadcasts rank 0's at wrapping) and the same options"
            )
            raise ValueError(f"{what}: ranks {bad} differ from rank 0 (rank {self.rank} reporting): {hint}")


def model_fingerprint(model: nn.Module) -> tuple[str, Tensor]:
    """Names, shapes and dtypes of the trainable parameters, and one float64 checksum each."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    description = ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in named)
    checksums = torch.stack([p.detach().to(torch.float64).sum() for _, p in named]) if named else torch.zeros(0)
    return description, checksums
