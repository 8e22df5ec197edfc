"""Moment-aware neural-network layers."""

from pyro_bqn.nn.batch_norm import BatchNorm1d, BatchNorm2d
from pyro_bqn.nn.flatten import Flatten
from pyro_bqn.nn.local_reparameterization import LocalReparameterization, RelaxedSign
from pyro_bqn.nn.pooling import AvgPool2d, MaxPool2d
from pyro_bqn.nn.quantized_activation import QuantizedActivation, Sign
from pyro_bqn.nn.quantized_conv import QuantizedConv2d
from pyro_bqn.nn.quantized_linear import QuantizedLinear
from pyro_bqn.nn.recalibrate import reestimate_batch_norm
from pyro_bqn.nn.relu import ReLU
from pyro_bqn.nn.temperature import Temperature
from pyro_bqn.nn.training_mode import training_mode

__all__ = [
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Flatten",
    "LocalReparameterization",
    "MaxPool2d",
    "QuantizedActivation",
    "QuantizedConv2d",
    "QuantizedLinear",
    "ReLU",
    "RelaxedSign",
    "Sign",
    "Temperature",
    "reestimate_batch_norm",
    "training_mode",
]
