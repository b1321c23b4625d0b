"""natgrad: natural-gradient training for PyTorch.

The Fisher information of a network in every structure (dense, block-diagonal, diagonal,
exact Kronecker sums, K-FAC, EKFAC, matrix-free), under the exact, Monte-Carlo and empirical
estimators, each tested against a brute-force reference.
"""

from . import diagnostics, distributed, nn, optim
from .distributed import DistributedError
from .errors import ConvergenceError, UnsupportedLayerError
from .fisher import STRUCTURES, fisher, natural_gradient
from .layers import LayerAdapter, register_layer
from .layout import Block
from .likelihoods import Bernoulli, Categorical, Gaussian, Likelihood
from .report import report
from .representations.base import FisherMatrix

__version__ = "0.1.0"


__all__ = [
    "diagnostics",
    "distributed",
    "DistributedError",
    "nn",
    "optim",
    "fisher",
    "natural_gradient",
    "report",
    "FisherMatrix",
    "Block",
    "Likelihood",
    "Categorical",
    "Gaussian",
    "Bernoulli",
    "LayerAdapter",
    "register_layer",
    "UnsupportedLayerError",
    "ConvergenceError",
    "STRUCTURES",
]
