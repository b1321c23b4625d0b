"""Natural-gradient optimizers: ``NGD``, ``KFAC``, ``EKFAC`` (torch.optim.Optimizer subclasses).

The loop::

    opt = natgrad.optim.KFAC(model, likelihood="categorical")
    for x, y in loader:
        opt.zero_grad()
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        opt.backward(loss, out)
        opt.step()
"""

from .config import DampingPolicy, Schedule, StepPolicy
from .ekfac import EKFAC
from .kfac import KFAC
from .ngd import NGD
from .prong import PRONG

__all__ = ["KFAC", "EKFAC", "NGD", "PRONG", "Schedule", "DampingPolicy", "StepPolicy"]
