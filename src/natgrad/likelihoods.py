"""Output distributions p(y | f(x)) of a network and their Fisher information.

A likelihood turns the network output ``f`` (logits or means, shape ``[N, *out]``) into a
distribution over targets. Everything natgrad needs from it:

* ``nll(output, target)`` -> ``[N]``: -log p(y|f) per example (summed over output values);
* ``score(output, target)`` -> ``[N, *out]``: ∂(-log p(y|f))/∂f, the vector back-propagated
  for the Monte-Carlo and empirical Fisher;
* ``sample(output)``: y ~ p(y|f);
* ``sqrt_fisher_columns(output)``: vectors ``s_k`` ``[N, *out]`` with
  ``D = Σ_k s_k s_kᵀ`` per example, D = E_y[score scoreᵀ] the Fisher of the output
  distribution; back-propagating them gives the exact (closed-form) Fisher;
* ``fisher_vector(output, u)`` -> ``D u`` per example (used by the matrix-free Fisher).

A user adds a distribution by subclassing :class:`Likelihood`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


class Likelihood(ABC):
    """Base class of output distributions. Subclasses implement the abstract methods."""

    name: str = "likelihood"

    def check_output(self, output: Tensor) -> None:
        """Raise ValueError if ``output`` [N, *out] cannot parametrise this distribution."""
        if output.dim() < 2:
            raise ValueError(
                f"{self.name} likelihood expects a model output of shape [N, ...] with a batch "
                f"dimension, got shape {tuple(output.shape)}"
            )
        if not torch.isfinite(output).all():
            raise ValueError(
                "the model output contains NaN or Inf: the inputs or the parameters contain "
                "NaN/Inf, or the model overflows; check them"
            )

    def check_target(self, output: Tensor, target: Tensor) -> None:
        """Raise ValueError if ``target`` does not fit ``output``."""
        if target.shape != output.shape:
            raise ValueError(
                f"{self.name} likelihood expects targets of the output's shape "
                f"{tuple(output.shape)}, got {tuple(target.shape)}"
            )
        if not torch.isfinite(target).all():
            raise ValueError("the targets contain NaN or Inf")

    @abstractmethod
    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """-log p(target | output) per example, shape [N]."""

    @abstractmethod
    def sample(self, output: Tensor) -> Tensor:
        """Draw one target per example from p(y | output)."""

    def score(self, output: Tensor, target: Tensor) -> Tensor:
        """∂ nll / ∂ output per example, shape of ``output`` (autograd by default)."""
        with torch.enable_grad():
            f = output.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.nll(f, target).sum(), f)
        return grad

    @abstractmethod
    def num_sqrt_columns(self, output: Tensor) -> int:
        """How many vectors :meth:`sqrt_fisher_columns` yields (backprops of the exact Fisher)."""

    @abstractmethod
    def sqrt_fisher_columns(self, output: Tensor) -> Iterator[Tensor]:
        """Yield s_k [N, *out] with Σ_k s_k s_kᵀ = D(output) for every example."""

    @abstractmethod
    def fisher_vector(self, output: Tensor, u: Tensor) -> Tensor:
        """D(output) u per example; ``u`` has the shape of ``output``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Categorical(Likelihood):
    """Softmax over logits ``[N, C]``; targets are class indices ``[N]``.

    D = diag(p) − p pᵀ. Its square root S = diag(√p) − p √pᵀ has S √p = 0, so a Householder
    reflection H with H e_C = −√p makes the last column of S H vanish: C − 1 columns suffice.
    """

    name = "categorical"

    def check_output(self, output: Tensor) -> None:
        super().check_output(output)
        if output.dim() != 2 or output.shape[1] < 2:
            raise ValueError(
                "categorical likelihood expects logits of shape [N, C] with C >= 2 classes, "
                f"got {tuple(output.shape)}; flatten extra dimensions or use 'bernoulli'"
            )

    def check_target(self, output: Tensor, target: Tensor) -> None:
        if target.dim() != 1 or target.shape[0] != output.shape[0]:
            raise ValueError(
                f"categorical likelihood expects class-index targets of shape [{output.shape[0]}], "
                f"got {tuple(target.shape)}"
            )
        if target.dtype.is_floating_point or target.dtype == torch.bool:
            raise TypeError(
                f"categorical targets must be integer class indices, got dtype {target.dtype}; "
                "use target.long()"
            )
        classes = output.shape[1]
        if target.numel() and (target.min() < 0 or target.max() >= classes):
            raise ValueError(
                f"categorical targets must lie in [0, {classes - 1}] for {classes} logits, "
                f"got values in [{int(target.min())}, {int(target.max())}]"
            )

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target.long(), reduction="none")

    def sample(self, output: Tensor) -> Tensor:
        """One class per row by inversion of the CDF: the first k with u·total < cdf_k.

        ``u`` is scaled by the row's total so rounding never selects a zero-probability class;
        ~10× faster than ``torch.multinomial`` for a batch of rows.
        """
        cdf = output.detach().softmax(dim=1).cumsum(dim=1)
        u = torch.rand_like(cdf[:, -1:]) * cdf[:, -1:]
        return (cdf <= u).sum(dim=1)

    def score(self, output: Tensor, target: Tensor) -> Tensor:
        p = output.detach().softmax(dim=1)
        return p - F.one_hot(target.long(), p.shape[1]).to(p.dtype)

    def num_sqrt_columns(self, output: Tensor) -> int:
        return output.shape[1] - 1

    def sqrt_fisher_columns(self, output: Tensor) -> Iterator[Tensor]:
        p = output.detach().softmax(dim=1)  # [N, C]
        root = p.sqrt()
        classes = p.shape[1]
        # S[n] = diag(√p) − p √pᵀ, columns S_k = √p_k (e_k − p).
        s = torch.diag_embed(root) - p.unsqueeze(2) * root.unsqueeze(1)  # [N, C, C]
        w = root.clone()
        w[:, -1] += 1.0
        w = w / w.norm(dim=1, keepdim=True)  # ‖√p + e_C‖ ≥ √2: well conditioned
        sw = torch.einsum("nij,nj->ni", s, w)
        reflected = s - 2.0 * sw.unsqueeze(2) * w.unsqueeze(1)  # S H; last column is 0
        for k in range(classes - 1):
            yield reflected[:, :, k]

    def fisher_vector(self, output: Tensor, u: Tensor) -> Tensor:
        p = output.detach().softmax(dim=1)
        return p * u - p * (p * u).sum(dim=1, keepdim=True)


class Gaussian(Likelihood):
    """Gaussian with mean ``output`` and fixed variance σ² (MSE regression): D = I / σ²."""

    name = "gaussian"

    def __init__(self, variance: float = 1.0) -> None:
        if not isinstance(variance, (int, float)) or not math.isfinite(variance) or variance <= 0:
            raise ValueError(f"Gaussian variance must be a positive number, got {variance!r}")
        self.variance = float(variance)

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """0.5 ‖y − f‖² / σ² per example (the additive constant is dropped)."""
        return 0.5 * (output - target).pow(2).flatten(1).sum(1) / self.variance

    def sample(self, output: Tensor) -> Tensor:
        return output.detach() + math.sqrt(self.variance) * torch.randn_like(output)

    def score(self, output: Tensor, target: Tensor) -> Tensor:
        return (output.detach() - target) / self.variance

    def num_sqrt_columns(self, output: Tensor) -> int:
        return output[0].numel()

    def sqrt_fisher_columns(self, output: Tensor) -> Iterator[Tensor]:
        scale = 1.0 / math.sqrt(self.variance)
        flat = torch.zeros_like(output).flatten(1)
        for j in range(flat.shape[1]):
            column = torch.zeros_like(flat)
            column[:, j] = scale
            yield column.view_as(output)

    def fisher_vector(self, output: Tensor, u: Tensor) -> Tensor:
        return u / self.variance

    def __repr__(self) -> str:
        return f"Gaussian(variance={self.variance})"


class Bernoulli(Likelihood):
    """Independent Bernoulli outputs with logits ``output``; targets in [0, 1]: D = diag(p(1−p))."""

    name = "bernoulli"

    def check_target(self, output: Tensor, target: Tensor) -> None:
        super().check_target(output, target)
        if target.numel() and (target.min() < 0 or target.max() > 1):
            raise ValueError(
                "bernoulli targets must lie in [0, 1], got values in "
                f"[{float(target.min())}, {float(target.max())}]"
            )

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        loss = F.binary_cross_entropy_with_logits(output, target.to(output.dtype), reduction="none")
        return loss.flatten(1).sum(1)

    def sample(self, output: Tensor) -> Tensor:
        return torch.bernoulli(torch.sigmoid(output.detach()))

    def score(self, output: Tensor, target: Tensor) -> Tensor:
        return torch.sigmoid(output.detach()) - target.to(output.dtype)

    def num_sqrt_columns(self, output: Tensor) -> int:
        return output[0].numel()

    def sqrt_fisher_columns(self, output: Tensor) -> Iterator[Tensor]:
        p = torch.sigmoid(output.detach()).flatten(1)
        root = (p * (1 - p)).sqrt()
        for j in range(p.shape[1]):
            column = torch.zeros_like(p)
            column[:, j] = root[:, j]
            yield column.view_as(output)

    def fisher_vector(self, output: Tensor, u: Tensor) -> Tensor:
        p = torch.sigmoid(output.detach())
        return p * (1 - p) * u


LIKELIHOODS = {"categorical": Categorical, "gaussian": Gaussian, "bernoulli": Bernoulli}


def get_likelihood(likelihood: str | Likelihood) -> Likelihood:
    """A likelihood object from a name ("categorical", "gaussian", "bernoulli") or an instance."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"unknown likelihood {likelihood!r}; choose one of {sorted(LIKELIHOODS)} "
                "or pass a natgrad.Likelihood instance"
            )
        return LIKELIHOODS[likelihood]()
    raise TypeError(
        f"likelihood must be a name or a natgrad.Likelihood instance, got {type(likelihood).__name__}"
    )
