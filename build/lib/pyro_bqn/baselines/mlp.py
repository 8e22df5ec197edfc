"""The multilayer-perceptron skeleton shared by every plain-PyTorch baseline.

Every baseline network has the same shape, so they differ only in the linear layer (float,
straight-through quantized, or weights written by an optimizer) and the activation::

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

__all__ = ["MLP", "LinearFactory", "LogitScale", "check_sizes"]


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


class MLP(nn.Sequential):
    """The shared baseline network; input ``(N, ...)`` (flattened to ``(N, sizes[0])``),
    output logits ``(N, sizes[-1])``.

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
        sizes = check_sizes(sizes)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-2], sizes[1:-1], strict=True), 1):
            layers[f"fc{i}"] = linear(fan_in, fan_out, bias=False)
            layers[f"bn{i}"] = nn.BatchNorm1d(fan_out)
            layers[f"act{i}"] = activation()
        layers["out"] = linear(sizes[-2], sizes[-1], bias=True)
        if output_scale is not None:
            layers["scale"] = LogitScale(output_scale, learnable=learn_output_scale)
        super().__init__(layers)
        self.sizes = sizes
