"""Inference: the sampling-free ELBO, the quantized autoguide and predictive helpers."""

from pyro_bqn.infer.auto_quantized_guide import AutoQuantizedGuide
from pyro_bqn.infer.deterministic_elbo import DeterministicELBO
from pyro_bqn.infer.moment_messenger import MomentMessenger
from pyro_bqn.infer.predict import predict, predictive_distribution

__all__ = [
    "AutoQuantizedGuide",
    "DeterministicELBO",
    "MomentMessenger",
    "predict",
    "predictive_distribution",
]
