"""The network skeleton shared by every plain-PyTorch baseline.

Every baseline network has one of the shapes of :mod:`pyro_bqn.architectures` (an MLP or
a LeNet-style CNN), so baselines differ only in their layers (float, straight-through
quantized, or weights written by an optimizer) and activation, then an optional learned
logit scale::

    flatten → [linear(no bias) → BatchNorm1d → activation] × (L − 1) → linear(bias) → scale

Hidden linear layers carry no bias because the batch norm after them has its own shift.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from pyro_bqn.architectures import TORCH_LAYERS, Architecture, Layers

__all__ = ["MLP", "LinearFactory", "LogitScale", "Network", "check_sizes", "mlp_architecture"]


class LinearFactory(Protocol):
    """Builds a linear layer: ``factory(in_features, out_features, bias=...)``."""

    def __call__(self, in_features: int, out_features: int, bias: bool = ...) -> nn.Module: ...


def check_sizes(sizes: Sequence[int]) -> list[int]:
    """Validate layer widths ``(d_in, h_1, ..., d_out)`` and return them as a list.

    :raises ValueError: if there are fewer than two widths or a width is not a positive int.
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output width, got {sizes}")
    for size in sizes:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"sizes must be positive integers, got {sizes}")
    return sizes


class LogitScale(nn.Module):
    """Multiplies the logits by a positive scalar ``s = exp(log_scale)``.

    A network whose last layer has weights in ``{-1, 1}`` and inputs in ``{-1, 1}`` produces
    logits of size about ``sqrt(fan_in)``, which saturates the softmax; scaling them by
    ``1 / sqrt(fan_in)`` (and optionally learning ``s``) keeps the predictive calibrated.
    ``s`` is stored on the log scale so that it stays positive while it is learned.

    :param init: initial (or fixed) scale, ``> 0``.
    :param learnable: learn ``s`` (a parameter) or keep it fixed (a buffer).
    """

    def __init__(self, init: float, learnable: bool = True) -> None:
        super().__init__()
        if not (isinstance(init, int | float) and math.isfinite(init) and init > 0):
            raise ValueError(f"output_scale must be a positive finite number, got {init!r}")
        log_scale = torch.tensor(math.log(init), dtype=torch.get_default_dtype())
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        """The current scale ``s``, a scalar tensor."""
        return self.log_scale.exp()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale

    def extra_repr(self) -> str:
        learnable = isinstance(self.log_scale, nn.Parameter)
        return f"scale={self.scale.item():.4g}, learnable={learnable}"


class Network(nn.Sequential):
    """A baseline network of any :class:`~pyro_bqn.architectures.Architecture`: its layers
    built by ``layers``, then an optional :class:`LogitScale`. Input ``(N, ...)`` (reshaped
    to the architecture's input shape), output logits ``(N, num_classes)``.

    Children are named as :meth:`Architecture.layers` names them (``flatten``, ``fc1``,
    ``bn1``, ``act1``, ..., ``out`` for an MLP), then ``scale``.

    :param architecture: the shape.
    :param layers: the layer factories (default :data:`~pyro_bqn.architectures.TORCH_LAYERS`).
    :param output_scale: initial :class:`LogitScale`, or ``None`` for no scaling.
    :param learn_output_scale: learn the output scale rather than keep it fixed.
    """

    def __init__(
        self,
        architecture: Architecture,
        layers: Layers = TORCH_LAYERS,
        *,
        output_scale: float | None = None,
        learn_output_scale: bool = True,
    ) -> None:
        modules = OrderedDict(architecture.layers(layers))
        if output_scale is not None:
            modules["scale"] = LogitScale(output_scale, learnable=learn_output_scale)
        super().__init__(modules)
        self.architecture = architecture
        self.sizes = list(architecture.sizes)


def mlp_architecture(sizes: Sequence[int]) -> Architecture:
    """The :class:`~pyro_bqn.architectures.Architecture` of an MLP of widths
    ``(d_in, h_1, ..., d_out)``."""
    sizes = check_sizes(sizes)
    return Architecture("mlp", (sizes[0],), sizes[-1], tuple(sizes[1:-1]))


class MLP(Network):
    """The shared baseline MLP; input ``(N, ...)`` (flattened to ``(N, sizes[0])``), output
    logits ``(N, sizes[-1])``: a :class:`Network` of :func:`mlp_architecture`.

    Children are named ``flatten``, ``fc1``, ``bn1``, ``act1``, ..., ``out`` and ``scale``.

    :param sizes: layer widths ``(d_in, h_1, ..., h_{L-1}, d_out)``.
    :param linear: builds each linear layer (default :class:`torch.nn.Linear`).
    :param activation: builds each hidden activation (default :class:`torch.nn.ReLU`).
    :param output_scale: initial :class:`LogitScale`, or ``None`` for no scaling.
    :param learn_output_scale: learn the output scale rather than keep it fixed.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        linear: LinearFactory = nn.Linear,
        activation: Callable[[], nn.Module] = nn.ReLU,
        output_scale: float | None = None,
        learn_output_scale: bool = True,
    ) -> None:
        super().__init__(
            mlp_architecture(sizes),
            TORCH_LAYERS.replace(linear=linear, activation=activation),
            output_scale=output_scale,
            learn_output_scale=learn_output_scale,
        )
