"""Updates for the parameters of modules K-FAC has no layer adapter for (norm layers,
embeddings, custom modules): ``"adam"`` (Adam's normalised direction), ``"sgd"`` (the plain
gradient) or ``"diagonal"`` (the gradient divided by a running diagonal Fisher + damping,
from per-example gradients: an extra functional pass over those modules on statistics steps).
"""

from __future__ import annotations

from torch import Tensor

OTHER_RULES = ("adam", "sgd", "diagonal")
BETAS = (0.9, 0.999)
EPS = 1e-8


def check_other(rule: str) -> str:
    if rule not in OTHER_RULES:
        raise ValueError(f"other must be one of {list(OTHER_RULES)}, got {rule!r}")
    return rule


def other_direction(rule: str, grad: Tensor, state: dict, damping: float) -> Tensor:
    """The direction Δ (descent is −Δ) for one block's flat gradient; ``state`` persists."""
    if rule == "sgd":
        return grad
    if rule == "diagonal":
        diagonal = state.get("fisher_diagonal")
        if diagonal is None:
            raise RuntimeError("no diagonal Fisher yet for the other parameters (no statistics step ran)")
        return grad / (diagonal + damping)
    step = state.get("adam_step", 0) + 1
    m = state.get("adam_m", grad.new_zeros(grad.shape)) * BETAS[0] + (1 - BETAS[0]) * grad
    v = state.get("adam_v", grad.new_zeros(grad.shape)) * BETAS[1] + (1 - BETAS[1]) * grad * grad
    state.update(adam_step=step, adam_m=m, adam_v=v)
    m_hat = m / (1 - BETAS[0] ** step)
    v_hat = v / (1 - BETAS[1] ** step)
    return m_hat / (v_hat.sqrt() + EPS)
