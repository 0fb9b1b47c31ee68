"""jsoftmax: the softmax family for JAX, with defined behaviour at every edge."""

from jsoftmax.core import log_softmax, logsumexp, softmax
from jsoftmax.fused import fused_linear_cross_entropy
from jsoftmax.losses import softmax_cross_entropy, softmax_cross_entropy_with_integer_labels
from jsoftmax.sampling import gumbel_softmax, sample

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "fused_linear_cross_entropy",
    "gumbel_softmax",
    "log_softmax",
    "logsumexp",
    "sample",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
