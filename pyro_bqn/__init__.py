"""pyro_bqn: sampling-free Bayesian quantized neural networks for Pyro."""

import importlib
from typing import TYPE_CHECKING

from pyro_bqn import data, distributions, infer, levels, nn
from pyro_bqn.checkpoint import load_checkpoint, save_checkpoint
from pyro_bqn.export import QuantizedNetwork, export_network
from pyro_bqn.infer import (
    AutoQuantizedGuide,
    DeterministicELBO,
    fit,
    predict,
    predict_by_sampling,
)
from pyro_bqn.models import QuantizedMLP
from pyro_bqn.moments import MomentRuleError, Moments, SiteMoments
from pyro_bqn.nn.quantized_conv import QuantizedConv2d
from pyro_bqn.nn.quantized_linear import QuantizedLinear

if TYPE_CHECKING:
    from pyro_bqn import diagnostics
    from pyro_bqn.diagnostics import to_inference_data

__version__ = "0.1.0"

__all__ = [
    "AutoQuantizedGuide",
    "DeterministicELBO",
    "MomentRuleError",
    "Moments",
    "QuantizedConv2d",
    "QuantizedLinear",
    "QuantizedMLP",
    "QuantizedNetwork",
    "SiteMoments",
    "data",
    "diagnostics",
    "distributions",
    "export_network",
    "fit",
    "infer",
    "levels",
    "load_checkpoint",
    "nn",
    "predict",
    "predict_by_sampling",
    "save_checkpoint",
    "to_inference_data",
]


def __getattr__(name: str) -> object:
    # The diagnostics load matplotlib, xarray and ArviZ (about 1.5 s): on first use only.
    if name == "diagnostics":
        return importlib.import_module("pyro_bqn.diagnostics")
    if name == "to_inference_data":
        return importlib.import_module("pyro_bqn.diagnostics").to_inference_data
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "diagnostics", "to_inference_data"})
