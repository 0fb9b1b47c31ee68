"""jsoftmax: the softmax family for JAX, with defined behaviour at every edge."""

from jsoftmax.core import log_softmax, logsumexp, softmax
from jsoftmax.fused import fused_linear_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "fused_linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "softmax",
]
