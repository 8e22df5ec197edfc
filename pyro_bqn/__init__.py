"""pyro_bqn: sampling-free Bayesian quantized neural networks for Pyro."""

from pyro_bqn import distributions, levels
from pyro_bqn.moments import MomentRuleError, Moments, SiteMoments

__version__ = "0.1.0"

__all__ = [
    "MomentRuleError",
    "Moments",
    "SiteMoments",
    "distributions",
    "levels",
]
