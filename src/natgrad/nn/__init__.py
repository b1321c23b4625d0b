"""Natural Neural Networks (PRONG, Desjardins et al. 2015): whitened layers and reparametrization.

::

    model = natgrad.nn.whiten(model)                 # Linear/Conv2d -> whitened layers, same function
    natgrad.nn.reparametrize(model, x_train[:1000])  # estimate μ, U; V, d changed, same function
    plain = natgrad.nn.unwhiten(model)               # back to nn.Linear/nn.Conv2d, same function

Training with periodic reparametrization is :class:`natgrad.optim.PRONG`.
"""

from .adapters import WhitenedConv2dAdapter, WhitenedLinearAdapter  # importing registers them
from .reparametrize import reparametrize, unwhiten, whiten, whitened_layers
from .whitened import WhitenedConv2d, WhitenedLayer, WhitenedLinear
from .whitening import Whitening, whitening_from_moments

__all__ = [
    "WhitenedLinear",
    "WhitenedConv2d",
    "WhitenedLayer",
    "WhitenedLinearAdapter",
    "WhitenedConv2dAdapter",
    "whiten",
    "unwhiten",
    "reparametrize",
    "whitened_layers",
    "Whitening",
    "whitening_from_moments",
]
