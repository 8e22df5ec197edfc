"""Ready-made quantized Bayesian classifiers, written as ordinary Pyro models."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import pyro
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.nn import PyroModule

from pyro_bqn import nn as qnn
from pyro_bqn.architectures import Architecture, Layers
from pyro_bqn.distributions.moment_likelihoods import MomentCategorical
from pyro_bqn.levels import LevelSet, ternary
from pyro_bqn.moments import Moments
from pyro_bqn.nn.local_reparameterization import LocalReparameterization, RelaxedSign
from pyro_bqn.nn.quantized_conv import QuantizedConv2d
from pyro_bqn.nn.quantized_linear import QuantizedLinear
from pyro_bqn.priors import PriorFactory

__all__ = ["ACTIVATIONS", "QuantizedClassifier", "QuantizedMLP", "quantized_layers"]

#: A weight prior: a distribution over the levels or a prior factory (:mod:`pyro_bqn.priors`).
Prior = TorchDistributionMixin | PriorFactory | None

ACTIVATIONS = {
    "sign": qnn.Sign,
    "relu": qnn.ReLU,
    # Roth et al. (ECML PKDD 2019): signs sampled (relaxed) in training; tau 0.5 was chosen
    # on a validation split of the MNIST subset (docs/benchmarks.md).
    "sign-lr": partial(RelaxedSign, temperature=0.5),
}


def quantized_layers(
    levels: LevelSet, activation: str = "sign", prior: Prior = None
) -> Layers:
    """The :class:`~pyro_bqn.architectures.Layers` of a Bayesian quantized network: quantized
    linear and convolution layers over ``levels`` (with ``prior``, default uniform; each
    layer gets its own copy of learnable levels), moment batch norm, the ``activation`` (a
    key of :data:`ACTIVATIONS`) and Clark's max pooling."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")

    def own_levels(layer: type[QuantizedLinear] | type[QuantizedConv2d]):
        # Learnable levels are per layer (Chien et al.): each layer learns its own copy.
        def build(*args, **kwargs):
            mine = levels.copy() if levels.learnable else levels
            return layer(*args, levels=mine, prior=prior, **kwargs)

        return build

    return Layers(
        linear=own_levels(QuantizedLinear),
        conv=own_levels(QuantizedConv2d),
        batch_norm1d=qnn.BatchNorm1d,
        batch_norm2d=qnn.BatchNorm2d,
        activation=ACTIVATIONS[activation],
        max_pool=qnn.MaxPool2d,
        flatten=qnn.Flatten,
    )


class QuantizedClassifier(PyroModule):
    """A classifier of any :class:`~pyro_bqn.architectures.Architecture` (an MLP or a
    LeNet-style CNN) with quantized Bayesian weights, as in the BQN paper's experiments.

    Hidden layers are ``quantized linear or conv (no bias) -> moment batch norm ->
    activation`` (and max pooling after each convolution block); the output layer is a
    :class:`~pyro_bqn.QuantizedLinear` with a real-valued bias followed by a learnable
    :class:`~pyro_bqn.nn.Temperature` (initialised at ``sqrt(fan_in)``, since logits of
    ``±1`` weights and activations grow like the square root of the fan-in). The observed
    site ``"obs"`` has a :class:`~pyro_bqn.distributions.MomentCategorical` likelihood.

    Usage::

        >>> arch = Architecture("cnn", (1, 28, 28), 10, (4, 8, 16))
        >>> model = QuantizedClassifier(arch)
        >>> model(torch.randn(2, 784)).shape
        torch.Size([2])

    :param architecture: the network's shape.
    :param levels: weight levels of every layer (default ternary); each layer learns its
        own copy of learnable levels.
    :param activation: ``"sign"`` (binary activations, as in Binarized Neural Networks; with
        :class:`~pyro_bqn.DeterministicELBO` this is the probabilistic forward pass),
        ``"relu"``, or ``"sign-lr"``: Roth et al.'s local reparameterization, signs drawn
        from a relaxed sample in training and the output logits sampled
        (:mod:`pyro_bqn.nn.local_reparameterization`).
    :param prior: prior of every weight over ``levels`` (default uniform): a distribution
        over the levels or a factory of :mod:`pyro_bqn.priors` (e.g. a categorical prior
        favouring zero, or Chien et al.'s multiple spike-and-slab).

    ``forward(x, y=None, num_data=None)``: ``x`` of shape ``(B, ...)`` (flat or of the
    architecture's input shape), labels ``y`` of shape ``(B,)``; ``num_data`` is the size of
    the whole training set when ``x`` is a minibatch, so the likelihood is scaled by
    ``num_data / B``.
    """

    def __init__(
        self,
        architecture: Architecture,
        levels: LevelSet | None = None,
        activation: str = "sign",
        prior: Prior = None,
    ) -> None:
        super().__init__()
        levels = levels if levels is not None else ternary()
        self.architecture = architecture
        self.sizes = architecture.sizes
        modules = architecture.layers(quantized_layers(levels, activation, prior))
        if activation == "sign-lr":  # Roth et al. also sample the output logits in training
            modules.append(("sample_logits", LocalReparameterization()))
        # Positional children, so that parameter names are "body.<index>.weight".
        self.body = PyroModule[torch.nn.Sequential](*(module for _, module in modules))
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
        with pyro.plate("data", num_data or batch, subsample=torch.arange(batch, device=x.device)):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


class QuantizedMLP(QuantizedClassifier):
    """A :class:`QuantizedClassifier` MLP ``sizes[0] -> ... -> sizes[-1]``.

    Each hidden layer is ``QuantizedLinear (no bias) -> BatchNorm1d -> activation``; the
    output layer is a ``QuantizedLinear`` with a real-valued bias followed by a learnable
    temperature.

    :param sizes: layer widths, input first, number of classes last (at least two entries).
    :param levels: weight levels of every layer (default ternary); each layer learns its
        own copy of learnable levels.
    :param activation: a key of :data:`ACTIVATIONS` (``"sign"``, ``"relu"``, ``"sign-lr"``).
    :param prior: prior of every weight over ``levels`` (default uniform).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        levels: LevelSet | None = None,
        activation: str = "sign",
        prior: Prior = None,
    ) -> None:
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes must list at least two positive widths, got {list(sizes)}")
        sizes = [int(s) for s in sizes]
        architecture = Architecture("mlp", (sizes[0],), sizes[-1], tuple(sizes[1:-1]))
        super().__init__(architecture, levels, activation, prior)
