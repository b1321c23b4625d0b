"""J v on S rows of the batch, for the quadratic model with τ₂ < 1 (Martens & Grosse §6.4).

The quadratic model needs only the quadratic forms (J_n a)ᵀ D_n (J_n b) over the kept rows. On
the user's graph (:class:`~natgrad.linearized.LinearizedOutput`) J v is a double backward through
the whole batch, whatever rows are kept (:class:`BatchRows`): about 2K products per layer of N
rows for K directions. :class:`ReplayedRows` re-runs the model on the S rows' inputs under
``torch.func.jvp``, vmapped over the directions: one forward of the S rows plus two products
per layer and direction, (1 + 2K) S rows in all — fewer when S ≤ N/4, for models large enough
that this, not torch.func's fixed dispatch cost, dominates.

The replay must reproduce the batch's output on those rows: it runs under the autocast dtype
the user's forward ran under, without touching the torch RNG or the model's buffers, and its
output is compared with the batch's rows. A model whose rows depend on the rest of the batch or
on randomness (BatchNorm in training mode, dropout) fails that check with
:class:`ReplayMismatch`; the optimizer then takes them from the batch's graph.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from ..data import cyclic_rows
from ..linearized import LinearizedOutput


class ReplayMismatch(RuntimeError):
    """The model re-run on the kept rows did not reproduce the batch's output there."""


class BatchRows:
    """The linearization ``whole`` of a batch restricted to ``count`` consecutive rows from
    ``start`` (mod N, wrapping): ``output`` [S, *out] and J v on those rows, taken from the
    batch's graph (the double backward runs through all N rows; the others are dropped)."""

    def __init__(self, whole: LinearizedOutput, start: int, count: int) -> None:
        self.whole = whole
        self.start = start
        self.count = count
        self.output = cyclic_rows(whole.output.detach(), start, count)

    def jvps(self, vectors: list[Tensor]) -> list[Tensor]:
        return [cyclic_rows(jv, self.start, self.count) for jv in self.whole.jvps(vectors)]


class ReplayedRows(BatchRows):
    """The same rows' J v by re-running ``model`` on their inputs (``inputs`` [N, ...] the whole
    batch's; ``params`` name → parameter, in the flat vectors' order; ``autocast`` the dtype the
    user's forward ran under, None without autocast). :meth:`jvps` raises
    :class:`ReplayMismatch` if the replay does not reproduce the batch's rows."""

    def __init__(
        self,
        whole: LinearizedOutput,
        start: int,
        count: int,
        model: nn.Module,
        params: dict[str, Tensor],
        inputs: Tensor,
        autocast: torch.dtype | None,
    ) -> None:
        super().__init__(whole, start, count)
        self.model = model
        self.params = params
        self.inputs = cyclic_rows(inputs.detach(), start, count)
        self.autocast = autocast

    def jvps(self, vectors: list[Tensor]) -> list[Tensor]:
        """[J v for v in vectors] on the rows, each [S, *out]; flat vectors [P]."""
        stacked = torch.stack(vectors)  # [K, P]
        tangents, primals, offset = {}, {}, 0
        for name, param in self.params.items():
            size = param.numel()
            tangents[name] = stacked[:, offset : offset + size].view(len(vectors), *param.shape)
            primals[name] = param.detach()
            offset += size
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}  # running stats stay

        def output_of(values: dict[str, Tensor]) -> Tensor:
            return functional_call(self.model, {**buffers, **values}, (self.inputs,))

        def push(tangent: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            return jvp(output_of, (primals,), (tangent,))

        device = self.inputs.device
        autocast = (
            torch.autocast(device.type, dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext()
        )
        # no_grad: no graph, and the optimizer's capture hooks stay idle during the replay
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
                replayed, pushed = vmap(push, out_dims=(None, 0), randomness="same")(tangents)
        except RuntimeError as exc:  # e.g. a buffer updated in place (BatchNorm in training mode)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ReplayMismatch(f"the model could not be re-run on rows of its batch under torch.func: {first}") from exc
        self._check(replayed)
        return list(pushed)

    def _check(self, replayed: Tensor) -> None:
        expected = self.output
        if replayed.shape != expected.shape:
            raise ReplayMismatch(
                f"re-run on {expected.shape[0]} rows the model returned shape {tuple(replayed.shape)}, "
                f"not the batch's rows' {tuple(expected.shape)}"
            )
        precision = max(torch.finfo(expected.dtype).eps, torch.finfo(replayed.dtype).eps)
        tolerance = max(1e-4, 16 * precision) * float(expected.abs().max())
        error = float((replayed.to(expected.dtype) - expected).abs().max())
        if not error <= tolerance:
            raise ReplayMismatch(
                f"re-run on {expected.shape[0]} of its rows the model's output differs from the batch's "
                f"by up to {error:.3g} (its rows depend on the rest of the batch or on randomness: "
                "BatchNorm in training mode, dropout, ...)"
            )
