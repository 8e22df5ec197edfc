"""Inference: the sampling-free ELBO, the quantized autoguide and predictive helpers."""

from pyro_bqn.infer.auto_quantized_guide import AutoQuantizedGuide
from pyro_bqn.infer.continual import posterior_as_prior
from pyro_bqn.infer.deterministic_elbo import DeterministicELBO
from pyro_bqn.infer.fit import fit
from pyro_bqn.infer.moment_messenger import MomentMessenger
from pyro_bqn.infer.predict import eval_mode, predict, predict_by_sampling, predictive_distribution
from pyro_bqn.infer.scale_latents import ScaleLatentsMessenger
from pyro_bqn.infer.sparsity import most_probable_sparsity, zero_share

__all__ = [
    "AutoQuantizedGuide",
    "DeterministicELBO",
    "MomentMessenger",
    "ScaleLatentsMessenger",
    "eval_mode",
    "fit",
    "most_probable_sparsity",
    "posterior_as_prior",
    "predict",
    "predict_by_sampling",
    "predictive_distribution",
    "zero_share",
]
