"""The statistics and the eigendecomposition behind PRONG's reparametrization.

Three steps, kept apart so that a data-parallel reduction (:mod:`natgrad.nn.reduction`) is
slotted in after the first:

1. :func:`layer_sums` — one forward pass; per whitened layer, sums over the rows ``h`` of its
   input around a shift ``c`` (the layer's current ``μ``, a buffer every replica shares):
   ``count``, ``s1 = Σ (h − c)`` and ``s2 = Σ (h − c)(h − c)ᵀ``, plus the per-feature minimum
   and maximum of ``h − c`` (``low``, ``high``). With a common shift they can be all-reduced
   over processes as they are (sums with SUM, ``low``/``high`` with MIN/MAX), which
   ``reparametrize(..., process_group=...)`` does.
2. :meth:`LayerSums.moments` — the population moments ``μ = c + s1/n`` and
   ``Σ = s2/n − (s1/n)(s1/n)ᵀ``; for a layer without bias ``μ = 0`` and ``Σ = E[h hᵀ]``. The
   shift keeps the subtraction free of cancellation once ``μ`` has been estimated. A feature
   that is constant on the sample (``low = high``: an MNIST border pixel, a dead unit) gets its
   exact moments: its row and column of Σ are exactly 0.
3. :func:`whitening_from_moments` — the zero rows of Σ are exact eigenvectors (eigenvalue 0,
   gain ``ε^(-1/2)``); the rest, ``Σ_aa = Q Λ Qᵀ``, is eigendecomposed (in a sample of 1,000
   MNIST test images 182 of the 784 pixels are constant). The ZCA whitener is ``U = Q (Λ + εI)^(-1/2) Qᵀ`` and
   ``U⁻¹ = Q (Λ + εI)^(1/2) Qᵀ`` comes from the same ``Q`` and ``Λ``: nothing is inverted, and
   :meth:`Whitening.times_inverse` applies ``U⁻¹`` without forming it when that is cheaper.

Precision. Float64 models compute in float64. Other models compute in float32 (about twice
as fast) when its rounding errors stay below ε/10 on the eigenvalues of Σ, so that the gains
``(λ + ε)^(-1/2)`` are right to ~5 % even along the null directions of a singular Σ (constant
pixels, dead units). The error estimates, with ``u`` the float32 machine epsilon, are
``√n · u · max_i s2_ii / n`` for the sums (dot products of length ``n``) and
``√k · u · λ_max`` for the eigendecomposition (a backward-stable ``k × k`` eigh; on MNIST's
784×784 pixel covariance the measured eigenvalue error is about 9× below this estimate).
Float32 sums that fail the test are recomputed in float64 by the caller; a float32
eigendecomposition that raises, has non-finite values, an eigenvalue below −ε/10 (Σ is
positive semi-definite) or fails the estimate is redone in float64, and the change of
coordinates then runs in float64 too. Function preservation does not depend on this choice:
``V`` and ``U`` are changed with the same ``Q`` and ``Λ``, so ``V' U' = V U`` to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from .whitened import WhitenedLayer

__all__ = ["LayerSums", "Whitening", "layer_sums", "statistics_dtype", "whitening_from_moments"]

FLOAT32_EPS = torch.finfo(torch.float32).eps
# float32 is used when its estimated error is at most this fraction of ε
TOLERANCE = 0.1


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of the statistics of a model in ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _float32_accurate(error: float, eps: float) -> bool:
    return math.isfinite(error) and error <= TOLERANCE * eps


class LayerSums:
    """Sums over the input rows ``h`` of one whitened layer, around the fixed shift ``c``:
    ``count``, ``s1 = Σ (h − c)`` (shape ``[d]``), ``s2 = Σ (h − c)(h − c)ᵀ`` (``[d, d]``), and
    ``low``/``high``, the per-feature minimum and maximum of ``h − c`` (``[d]``)."""

    def __init__(self, shift: Tensor, centred: bool, dtype: torch.dtype) -> None:
        d = shift.shape[0]
        kw = {"dtype": dtype, "device": shift.device}
        self.centred = centred
        self.shift = shift.detach().to(dtype).clone()
        self.count = 0
        self.s1 = torch.zeros(d, **kw)
        self.s2 = torch.zeros(d, d, **kw)
        self.low = torch.full((d,), math.inf, **kw)
        self.high = torch.full((d,), -math.inf, **kw)

    def add(self, rows: Tensor) -> None:
        """Add the rows ``[n, d]`` (in any floating dtype)."""
        if rows.shape[0] == 0:
            return
        x = rows.detach().to(self.s2.dtype) - self.shift
        self.s1 += x.sum(0)
        self.s2.addmm_(x.T, x)
        low, high = torch.aminmax(x, dim=0)
        torch.minimum(self.low, low, out=self.low)
        torch.maximum(self.high, high, out=self.high)
        self.count += x.shape[0]

    def moments(self) -> tuple[Tensor, Tensor]:
        """``(μ, Σ)``: population moments (1/n); for a layer without bias ``(0, E[h hᵀ])``.
        The rows and columns of Σ of constant features (exactly 0 for a layer without bias)
        are exactly 0."""
        if self.count == 0:
            raise ValueError("no rows were added: the layer was not called on the inputs")
        constant = self.low == self.high
        m1 = torch.where(constant, self.low, self.s1 / self.count)
        if self.centred:
            mean, cov = self.shift + m1, self.s2 / self.count - torch.outer(m1, m1)
        else:
            constant &= self.low == 0
            mean, cov = torch.zeros_like(m1), self.s2 / self.count
        if bool(constant.any()):
            cov[constant] = 0.0
            cov[:, constant] = 0.0
        return mean, cov

    def float32_accurate(self, eps: float) -> bool:
        """Whether float32 sums are accurate enough for ``eps`` (see the module docstring);
        always True for float64 sums."""
        if self.s2.dtype == torch.float64 or self.count == 0:
            return True
        scale = float(self.s2.diagonal().max()) / self.count
        return _float32_accurate(math.sqrt(self.count) * FLOAT32_EPS * scale, eps)


def input_batches(inputs) -> Iterator[Tensor]:
    """Input tensors from a tensor, an ``(x, y, ...)`` tuple, or an iterable (DataLoader) of
    tensors or ``(x, y, ...)`` batches."""
    if isinstance(inputs, Tensor):
        yield inputs
        return
    if isinstance(inputs, tuple) and inputs and isinstance(inputs[0], Tensor):
        yield inputs[0]
        return
    if isinstance(inputs, (str, bytes, dict)) or not isinstance(inputs, Iterable):
        raise TypeError(
            "inputs must be a tensor, an (x, y) tuple, or a DataLoader/iterable of tensors or (x, y) "
            f"batches, got {type(inputs).__name__}"
        )
    for batch in inputs:
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(f"each batch must be a tensor or an (x, y) pair of tensors, got {type(batch).__name__}")
        yield batch


@torch.no_grad()
def layer_sums(
    model: nn.Module, layers: list[tuple[str, WhitenedLayer]], inputs, dtype: torch.dtype
) -> tuple[dict[str, LayerSums], int]:
    """Run ``model`` on ``inputs`` once and sum every whitened layer's input rows in ``dtype``.

    Returns ``({name: LayerSums}, number of examples)``. The model runs in its current mode;
    buffers of other modules (BatchNorm running statistics) are restored afterwards. The shift
    of each layer is its current ``μ`` (0 for a layer without bias), identical on every replica
    of a data-parallel model: reducing ``count``, ``s1`` and ``s2`` by summation over processes
    yields the sums of the union of the inputs.
    """
    model_dtype, device = layers[0][1].weight.dtype, layers[0][1].weight.device
    sums = {name: LayerSums(layer.mean, layer.centred, dtype) for name, layer in layers}

    def make_hook(name: str, layer: WhitenedLayer):
        def hook(module, args):
            if args and isinstance(args[0], Tensor):
                sums[name].add(layer.layer_rows(args[0]))

        return hook

    own = {id(b) for _, layer in layers for b in (layer.mean, layer.whitener)}
    saved = [(b, b.detach().clone()) for b in model.buffers() if id(b) not in own]
    handles = [layer.register_forward_pre_hook(make_hook(name, layer)) for name, layer in layers]
    examples = 0
    try:
        for x in input_batches(inputs):
            if x.dim() == 0 or x.shape[0] == 0:
                continue
            x = x.to(dtype=model_dtype, device=device) if x.is_floating_point() else x.to(device=device)
            model(x)
            examples += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        for buffer, value in saved:
            buffer.copy_(value)
    return sums, examples


@dataclass(frozen=True)
class Whitening:
    """The ZCA whitening ``U = (Σ + εI)^(-1/2)`` of a covariance ``Σ`` of ``d`` features, with
    the mean ``μ`` (``[d]``). The features ``active`` (indices ``[k]``, None for all) span the
    block ``Σ_aa = Q Λ Qᵀ`` (``eigenvalues`` ``[k]`` ascending, clamped at 0; ``eigenvectors``
    ``[k, k]``); the other rows and columns of Σ are 0. All tensors share one dtype."""

    mean: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    eps: float
    active: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.eigenvectors.dtype

    @property
    def gains(self) -> Tensor:
        """``(λ + ε)^(1/2)`` of the active block: U⁻¹'s eigenvalues there (U's are their reciprocals)."""
        return (self.eigenvalues + self.eps).sqrt()

    @property
    def spectrum(self) -> Tensor:
        """All ``d`` eigenvalues of Σ, ascending (the inactive features' are 0)."""
        zeros = self.eigenvalues.new_zeros(self.mean.shape[0] - self.eigenvalues.shape[0])
        return torch.cat([zeros, self.eigenvalues])

    @property
    def condition(self) -> float:
        """The condition number of ``Σ + εI``."""
        lam = self.spectrum
        return float((lam[-1] + self.eps) / (lam[0] + self.eps))

    def whitener(self) -> Tensor:
        """``U = Q diag((λ + ε)^(-1/2)) Qᵀ`` on the active block, ``ε^(-1/2)`` on the
        diagonal elsewhere (``[d, d]``, symmetric)."""
        q = self.eigenvectors
        block = (q / self.gains) @ q.T
        if self.active is None:
            return block
        d = self.mean.shape[0]
        u = torch.eye(d, dtype=self.dtype, device=q.device) * self.eps ** -0.5
        u[self.active[:, None], self.active] = block
        return u

    def times_inverse(self, m: Tensor) -> Tensor:
        """``m U⁻¹`` over the dimension 1 of ``m`` (a weight ``[out, in, ...]``), in this
        whitening's dtype. ``U⁻¹`` is applied as ``(m Q diag((λ + ε)^(1/2))) Qᵀ`` when ``m`` has
        fewer rows than features, otherwise formed first (fewer operations either way)."""
        x = m.to(self.dtype).movedim(1, -1)
        q = self.eigenvectors
        sub = x if self.active is None else x.index_select(-1, self.active)
        if sub.numel() < q.shape[0] ** 2:
            block = (sub @ (q * self.gains)) @ q.T
        else:
            block = sub @ ((q * self.gains) @ q.T)
        if self.active is None:
            return block.movedim(-1, 1)
        out = x * self.eps ** 0.5
        out.index_copy_(-1, self.active, block)
        return out.movedim(-1, 1)


def _eigh(cov: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        lam, vecs = torch.linalg.eigh(cov)
    except torch.linalg.LinAlgError:
        return None
    return lam, vecs


def _float32_eigh(cov: Tensor, eps: float) -> tuple[Tensor, Tensor] | None:
    """``eigh`` in float32 if it succeeds and is accurate enough for ``eps``, else None."""
    found = _eigh(cov.float())
    if found is None:
        return None
    lam, vecs = found
    if lam.numel() == 0:
        return found
    error = math.sqrt(cov.shape[0]) * FLOAT32_EPS * abs(float(lam[-1]))
    if float(lam[0]) < -TOLERANCE * eps or not _float32_accurate(error, eps) or not bool(torch.isfinite(vecs).all()):
        return None
    return found


def whitening_from_moments(mean: Tensor, cov: Tensor, eps: float) -> Whitening:
    """The ZCA whitening of ``(μ, Σ)`` from one eigendecomposition of the block of ``Σ``
    outside its zero rows and columns (read from its lower triangle), in ``cov``'s precision
    if it is float64 or float32 is accurate enough for ``eps``, else in float64. Eigenvalues
    are clamped at 0, so a singular ``Σ`` is fine.

    Raises:
        ValueError: ``mean`` or ``cov`` is not finite.
    """
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(cov).all())):
        raise ValueError("its inputs are not finite (NaN or inf in the inputs or activations): "
                         "cannot estimate a whitening")
    nonzero = cov != 0
    used = nonzero.any(0) | nonzero.any(1)
    active = None if bool(used.all()) else used.nonzero().squeeze(1)
    block = cov if active is None else cov[active[:, None], active]
    found = None if block.dtype == torch.float64 else _float32_eigh(block, eps)
    if found is None:
        found = _eigh(block.double())
    if found is None:  # float64 eigh of a finite symmetric matrix does not fail in practice
        raise ValueError("the eigendecomposition of the covariance did not converge")
    lam, vecs = found
    return Whitening(mean.to(vecs.dtype), lam.clamp(min=0.0), vecs, eps, active)
