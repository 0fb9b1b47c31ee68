"""jsoftmax: the softmax family for JAX, with defined behaviour at every edge."""

from jsoftmax.calibration import expected_calibration_error, fit_temperature, reliability_bins
from jsoftmax.core import log_softmax, logsumexp, softmax
from jsoftmax.divergence import entropy, kl_divergence
from jsoftmax.fused import fused_linear_cross_entropy
from jsoftmax.fused_divergence import fused_linear_kl_divergence
from jsoftmax.losses import softmax_cross_entropy, softmax_cross_entropy_with_integer_labels
from jsoftmax.sampling import gumbel_softmax, sample
from jsoftmax.segment import segment_log_softmax, segment_logsumexp, segment_softmax

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "entropy",
    "expected_calibration_error",
    "fit_temperature",
    "fused_linear_cross_entropy",
    "fused_linear_kl_divergence",
    "gumbel_softmax",
    "kl_divergence",
    "log_softmax",
    "logsumexp",
    "reliability_bins",
    "sample",
    "segment_log_softmax",
    "segment_logsumexp",
    "segment_softmax",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
