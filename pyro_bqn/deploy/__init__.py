"""The most probable network, deployed: a standalone PyTorch program or an ONNX graph in
integer arithmetic (docs/deployment.md)."""

from pyro_bqn.deploy.integer_network import integer_levels, integer_network

__all__ = ["integer_levels", "integer_network"]
