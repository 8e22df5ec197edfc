"""Distributions over quantization levels, the spike-and-slab prior and moment-aware likelihoods."""

from pyro_bqn.distributions.quantized_categorical import LevelSupport, QuantizedCategorical
from pyro_bqn.distributions.relaxed_value import RelaxedLevelValue

__all__ = ["LevelSupport", "QuantizedCategorical", "RelaxedLevelValue"]
