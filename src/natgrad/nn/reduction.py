"""Reparametrization statistics over a torch.distributed process group.

With a :class:`~natgrad.distributed.Communicator`, each rank sums its own inputs
(:func:`~natgrad.nn.whitening.layer_sums`) and the sums are combined into those of the union of
all ranks' inputs — the sums, not the means, so ranks may hold different numbers of rows.
Every shift is the layer's current ``μ``, a buffer all replicas share, so the sums add up as
they are. Per statistics pass:

* one bucketed SUM all-reduce of every layer's ``s1`` and ``s2`` (``s2`` as its upper
  triangle), in the precision of the sums;
* one float64 MAX all-reduce of the per-feature ``high`` and ``−low`` (MAX of ``−low`` is
  minus the MIN of ``low``) and of the row and example counts, each rank writing its own
  counts into its own slot (a MAX over slots that only one rank fills is an exact gather; the
  counts are then added in rank order, the same sum on every rank).

Before the pass, :func:`agree_on_pass` runs one small MAX all-reduce that checks that every
rank holds the same whitened layers (names, sizes, dtypes) — a clear ValueError instead of
mismatched collectives — and makes the choice of float64 sums common: a rank given a one-shot
iterator must sum in float64 at once (no second pass), so every rank does. Decisions taken
after the pass (the float64 fallback, empty layers) use reduced quantities only and are
therefore identical on every rank.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from ..distributed import Communicator, resolve_group
from .whitened import WhitenedLayer
from .whitening import LayerSums

__all__ = ["check_process_group", "communicator_for", "agree_on_pass", "reduce_sums"]


def check_process_group(process_group: object) -> object:
    """``process_group`` if it is None or a ``torch.distributed.ProcessGroup``, else TypeError."""
    if process_group is None:
        return None
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD "
            f"or one made by torch.distributed.new_group) or None, got {type(process_group).__name__}"
        )
    return process_group


def communicator_for(process_group: object) -> Communicator | None:
    """The communicator of an explicit ``process_group`` (None: local, no communication)."""
    if check_process_group(process_group) is None:
        return None
    return resolve_group(None, process_group)


def _signature(text: str) -> float:
    """48 bits of the SHA-256 of ``text``, exact in float64."""
    return float(int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "little"))


def agree_on_pass(comm: Communicator, layers: list[tuple[str, WhitenedLayer]], dtype: torch.dtype,
                  one_shot: bool) -> bool:
    """Check that every rank has the same whitened layers and sums in ``dtype``, and return
    whether any rank's inputs are a one-shot iterator (then every rank sums in float64).

    Raises:
        ValueError: on every rank, when the ranks' whitened layers differ.
    """
    layout = ";".join(f"{name}:{layer.whitened_features}:{layer.centred}:{layer.weight.dtype}"
                      for name, layer in layers) + f"|{dtype}"
    sig = _signature(layout)
    device = layers[0][1].weight.device
    local = torch.tensor([float(one_shot), sig, -sig], dtype=torch.float64, device=device)
    flag, high, minus_low = comm.all_reduce_max(local, "reparametrize: layer check").tolist()
    if high != -minus_low:
        raise ValueError(
            f"reparametrize: the ranks' whitened layers differ (rank {comm.rank} reporting): every rank must "
            "hold the same model, with the same whitened layers (names, sizes, bias or not) and dtype"
        )
    return flag > 0


def reduce_sums(comm: Communicator, sums: dict[str, LayerSums], examples: int) -> int:
    """Replace every layer's sums by their totals over the ranks (in place) and return the total
    number of examples. Two collectives; see the module docstring."""
    items = list(sums.values())
    reduced = comm.all_reduce([s.s1 for s in items] + [s.s2 for s in items],
                              [False] * len(items) + [True] * len(items), "reparametrize: sums")
    device = items[0].s2.device
    slots = torch.zeros(comm.world, len(items) + 1, dtype=torch.float64, device=device)
    slots[comm.rank] = torch.tensor([float(s.count) for s in items] + [float(examples)], dtype=torch.float64)
    extremes = torch.cat([torch.cat([s.high, -s.low]).double() for s in items])
    maxima = comm.all_reduce_max(torch.cat([slots.reshape(-1), extremes]), "reparametrize: ranges")
    counts = maxima[: slots.numel()].view_as(slots).sum(0).tolist()
    offset = slots.numel()
    for i, s in enumerate(items):
        d = s.s1.shape[0]
        s.s1, s.s2 = reduced[i], reduced[len(items) + i]
        high, minus_low = maxima[offset: offset + 2 * d].to(s.s2.dtype).split(d)
        s.high, s.low = high, -minus_low
        s.count = int(counts[i])
        offset += 2 * d
    return int(counts[-1])
