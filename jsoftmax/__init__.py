"""jsoftmax: the softmax family for JAX, with defined behaviour at every edge."""

from jsoftmax.calibration import expected_calibration_error, fit_temperature, reliability_bins
from jsoftmax.core import log_softmax, logsumexp, softmax

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "expected_calibration_error",
    "fit_temperature",
    "log_softmax",
    "logsumexp",
    "reliability_bins",
    "softmax",
]
