"""The two network shapes every method of the benchmark is built in: an MLP and a
LeNet-style CNN, declared once and assembled from whatever layers a method uses.

A method supplies its layer factories (float, straight-through, quantized Bayesian, ...)
in a :class:`Layers`; :meth:`Architecture.layers` returns the named modules in order::

    mlp:  flatten → [linear(no bias) → bn1d → act] × len(hidden) → linear(bias)
    cnn:  reshape → [conv 5x5, pad 2 (no bias) → bn2d → act → maxpool 2] × 2
                  → flatten → linear(no bias) → bn1d → act → linear(bias)

The CNN follows the LeNet-5 layout of the BQN paper's image experiments (two 5x5
convolutions, each followed by 2x2 max pooling, then a dense hidden layer), with batch
norm before every activation as in Binarized Neural Networks; ``hidden = (c1, c2, h)``
gives the two convolutions' channels and the dense width (LeNet-5: ``20, 50, 500``).
Padding keeps the image size, so any image with sides divisible by 4 works (MNIST: 28).
Hidden layers have no bias: the batch norm after them has its own shift.

Usage::

    >>> from collections import OrderedDict
    >>> import torch
    >>> arch = Architecture("cnn", (1, 28, 28), 10, (4, 8, 16))
    >>> net = torch.nn.Sequential(OrderedDict(arch.layers(TORCH_LAYERS)))
    >>> net(torch.randn(3, 784)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "Architecture", "Layers", "Reshape", "TORCH_LAYERS"]

#: The kinds :class:`Architecture` builds.
ARCHITECTURES = ("mlp", "cnn")
_KERNEL, _PADDING, _POOL = 5, 2, 2


class Reshape(nn.Module):
    """Views each example as ``shape``: ``(N, ...) -> (N, *shape)`` (flat data to images,
    or images to vectors). Only ever applied to the data, which is a plain tensor."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


@dataclass(frozen=True)
class Layers:
    """How one method builds each kind of layer of an :class:`Architecture`.

    ``linear(in, out, bias=...)``, ``conv(in, out, kernel_size, padding=..., bias=...)``,
    ``batch_norm1d(C)``, ``batch_norm2d(C)``, ``activation()``, ``max_pool(kernel_size)``,
    ``flatten()``.
    """

    linear: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]
    batch_norm1d: Callable[[int], nn.Module]
    batch_norm2d: Callable[[int], nn.Module]
    activation: Callable[[], nn.Module]
    max_pool: Callable[[int], nn.Module]
    flatten: Callable[[], nn.Module]

    def replace(self, **changes: Any) -> Layers:
        """A copy with some factories replaced."""
        return Layers(**{**self.__dict__, **changes})


#: Plain PyTorch layers, ReLU activations (the full-precision network).
TORCH_LAYERS = Layers(
    linear=nn.Linear,
    conv=nn.Conv2d,
    batch_norm1d=nn.BatchNorm1d,
    batch_norm2d=nn.BatchNorm2d,
    activation=nn.ReLU,
    max_pool=nn.MaxPool2d,
    flatten=nn.Flatten,
)


@dataclass(frozen=True)
class Architecture:
    """A network shape: ``kind`` (``"mlp"`` or ``"cnn"``), the shape of one input example,
    the number of classes and the hidden sizes (MLP: the hidden widths; CNN:
    ``(c1, c2, h)``, see the module docstring).

    :raises ValueError: naming what is wrong, at construction.
    """

    kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    hidden: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.kind!r}")
        sizes = (*self.input_shape, self.num_classes, *self.hidden)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
            raise ValueError(f"sizes must be positive integers, got {self}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.kind == "cnn":
            if len(self.input_shape) != 3 or any(s % 4 for s in self.input_shape[1:]):
                raise ValueError(
                    "a cnn needs image inputs (C, H, W) with H and W divisible by 4, got "
                    f"{self.input_shape}"
                )
            if len(self.hidden) != 3:
                raise ValueError(
                    f"a cnn's hidden sizes are (conv1 channels, conv2 channels, dense width), "
                    f"got {self.hidden}"
                )

    @property
    def num_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The widths of the dense layers, input first (the MLP's whole shape)."""
        if self.kind == "mlp":
            return (self.num_features, *self.hidden, self.num_classes)
        channels, height, width = self.input_shape
        flat = self.hidden[1] * (height // 4) * (width // 4)
        return (flat, self.hidden[2], self.num_classes)

    @property
    def num_weights(self) -> int:
        """Weights of the linear and convolution layers (biases and batch norm excluded)."""
        dense = sum(a * b for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=False))
        if self.kind == "mlp":
            return dense
        in_channels, c1, c2 = self.input_shape[0], self.hidden[0], self.hidden[1]
        return dense + (in_channels * c1 + c1 * c2) * _KERNEL * _KERNEL

    def layers(self, make: Layers) -> list[tuple[str, nn.Module]]:
        """The named modules of this shape, built with ``make`` (see the module docstring);
        the last is the output layer (``"out"``), before any output scale."""
        if self.kind == "mlp":
            modules: list[tuple[str, nn.Module]] = [("flatten", make.flatten())]
        else:
            modules = [("reshape", Reshape(self.input_shape))]
            channels = (self.input_shape[0], *self.hidden[:2])
            for i, (fan_in, fan_out) in enumerate(zip(channels[:-1], channels[1:], strict=True), 1):
                conv = make.conv(fan_in, fan_out, _KERNEL, padding=_PADDING, bias=False)
                modules += [
                    (f"conv{i}", conv),
                    (f"bn_conv{i}", make.batch_norm2d(fan_out)),
                    (f"act_conv{i}", make.activation()),
                    (f"pool{i}", make.max_pool(_POOL)),
                ]
            modules.append(("flatten", make.flatten()))
        sizes = self.sizes
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-2], sizes[1:-1], strict=True), 1):
            modules += [
                (f"fc{i}", make.linear(fan_in, fan_out, bias=False)),
                (f"bn{i}", make.batch_norm1d(fan_out)),
                (f"act{i}", make.activation()),
            ]
        modules.append(("out", make.linear(sizes[-2], sizes[-1], bias=True)))
        return modules
