"""Distributions over quantization levels, the spike-and-slab prior and moment-aware likelihoods."""

from pyro_bqn.distributions import kl  # noqa: F401  (registers the KL divergences)
from pyro_bqn.distributions.kl import InertPriorWarning
from pyro_bqn.distributions.moment_likelihoods import (
    MomentBernoulli,
    MomentCategorical,
    MomentNormal,
)
from pyro_bqn.distributions.multiple_spike_and_slab import MultipleSpikeAndSlab
from pyro_bqn.distributions.quantized_categorical import LevelSupport, QuantizedCategorical
from pyro_bqn.distributions.relaxed_quantized_categorical import (
    RelaxedQuantizedCategorical,
    RelaxedQuantizedCategoricalStraightThrough,
)
from pyro_bqn.distributions.relaxed_value import RelaxedLevelValue
from pyro_bqn.distributions.wrappers import base_distribution, is_moment_likelihood

__all__ = [
    "InertPriorWarning",
    "LevelSupport",
    "MomentBernoulli",
    "MomentCategorical",
    "MomentNormal",
    "MultipleSpikeAndSlab",
    "QuantizedCategorical",
    "RelaxedLevelValue",
    "RelaxedQuantizedCategorical",
    "RelaxedQuantizedCategoricalStraightThrough",
    "base_distribution",
    "is_moment_likelihood",
]
