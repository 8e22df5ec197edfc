"""Ready-made quantized Bayesian classifiers, written as ordinary Pyro models."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import torch
from pyro.nn import PyroModule

from pyro_bqn import nn as qnn
from pyro_bqn.distributions.moment_likelihoods import MomentCategorical
from pyro_bqn.levels import LevelSet, ternary
from pyro_bqn.moments import Moments
from pyro_bqn.nn.quantized_linear import QuantizedLinear

__all__ = ["QuantizedMLP", "ACTIVATIONS"]

ACTIVATIONS = {"sign": qnn.Sign, "relu": qnn.ReLU}


class QuantizedMLP(PyroModule):
    """A classifier ``sizes[0] -> ... -> sizes[-1]`` with quantized Bayesian weights.

    Each hidden layer is ``QuantizedLinear (no bias) -> BatchNorm1d -> activation``; the
    output layer is a ``QuantizedLinear`` with a real-valued bias followed by a learnable
    :class:`~pyro_bqn.nn.Temperature` (initialised at ``sqrt(fan_in)``, since logits of
    ``±1`` weights and activations grow like the square root of the fan-in). The observed
    site ``"obs"`` has a :class:`~pyro_bqn.distributions.MomentCategorical` likelihood.

    :param sizes: layer widths, input first, number of classes last (at least two entries).
    :param levels: weight levels of every layer (default ternary).
    :param activation: ``"sign"`` (binary activations, as in Binarized Neural Networks) or
        ``"relu"``.

    ``forward(x, y=None, num_data=None)``: ``x`` of shape ``(B, sizes[0])`` (any trailing shape
    that flattens to it), labels ``y`` of shape ``(B,)``; ``num_data`` is the size of the whole
    training set when ``x`` is a minibatch, so the likelihood is scaled by ``num_data / B``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        levels: LevelSet | None = None,
        activation: str = "sign",
    ) -> None:
        super().__init__()
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes must list at least two positive widths, got {list(sizes)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.sizes = tuple(int(s) for s in sizes)
        levels = levels if levels is not None else ternary()
        layers: list[torch.nn.Module] = [qnn.Flatten()]
        for fan_in, fan_out in zip(self.sizes[:-2], self.sizes[1:-1], strict=True):
            layers += [
                QuantizedLinear(fan_in, fan_out, levels=levels, bias=False),
                qnn.BatchNorm1d(fan_out),
                ACTIVATIONS[activation](),
            ]
        layers.append(QuantizedLinear(self.sizes[-2], self.sizes[-1], levels=levels))
        self.body = PyroModule[torch.nn.Sequential](*layers)
        self.temperature = qnn.Temperature(self.sizes[-2] ** 0.5)

    def logits(self, x: torch.Tensor) -> torch.Tensor | Moments:
        """Output logits (a tensor, or :class:`~pyro_bqn.Moments` in moment mode), ``(B, C)``."""
        return self.temperature(self.body(x))

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None
    ) -> torch.Tensor:
        logits = self.logits(x)
        batch = x.shape[0]
        if num_data is not None and num_data < batch:
            raise ValueError(f"num_data={num_data} is smaller than the batch ({batch})")
        # A plate of the full data size over this minibatch scales the likelihood N / B.
        with pyro.plate("data", num_data or batch, subsample=torch.arange(batch)):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)
