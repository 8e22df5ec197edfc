"""Inference: the sampling-free ELBO, the quantized autoguide and predictive helpers."""
