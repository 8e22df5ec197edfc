"""A 2-D convolution with quantized Bayesian weights."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistributionMixin
from torch.nn.modules.utils import _pair

from pyro_bqn.levels import LevelSet
from pyro_bqn.moments import Moments
from pyro_bqn.nn.quantized_layer import QuantizedLayer, add_bias, propagate
from pyro_bqn.priors import PriorFactory

__all__ = ["QuantizedConv2d"]


class QuantizedConv2d(QuantizedLayer):
    r"""A 2-D convolution whose kernel is a Pyro sample site over a level set.

    Moments propagate as for :class:`~pyro_bqn.QuantizedLinear` with ``conv2d`` in place of
    the matrix product (a convolution is linear in input and in kernel):
    ``mu = conv(m, E[W])``, ``sigma^2 = conv(m^2, Var[W]) + conv(s, E[W^2])``.

    Shapes: input ``(N, in_channels, H, W)``, weight
    ``(out_channels, in_channels // groups, kH, kW)``, output ``(N, out_channels, H', W')``.
    Arguments as :class:`torch.nn.Conv2d` (zero padding only) plus those of
    :class:`~pyro_bqn.nn.quantized_layer.QuantizedLayer`.

    Example::

        >>> import torch
        >>> from pyro_bqn import QuantizedConv2d, levels
        >>> conv = QuantizedConv2d(1, 4, kernel_size=3, padding=1, levels=levels.binary())
        >>> conv(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 4, 8, 8])

    **References**

    [1] *Sampling-free learning of Bayesian quantized neural networks*, J. Su, M. Cvitkovic,
        F. Huang (ICLR 2020)
    [2] *Discrete-valued neural networks using variational inference*, W. Roth, F. Pernkopf
        (2018): the probabilistic forward pass this propagation follows
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        levels: LevelSet | Sequence[float] | torch.Tensor | None = None,
        prior: TorchDistributionMixin | PriorFactory | None = None,
        bias: bool = True,
        bias_prior_scale: float = 1.0,
    ) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must both be "
                f"divisible by groups={groups}"
            )
        kernel = _pair(kernel_size)
        super().__init__(
            (out_channels, in_channels // groups, *kernel),
            out_channels,
            levels,
            prior,
            bias,
            bias_prior_scale,
        )
        self.in_channels = in_channels
        self.kernel_size = kernel
        self._conv = partial(
            F.conv2d,
            stride=_pair(stride),
            padding=_pair(padding),
            dilation=_pair(dilation),
            groups=groups,
        )

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"QuantizedConv2d expected input of shape (N, in_channels={self.in_channels}, "
                f"H, W), got {tuple(x.shape)}"
            )
        y = propagate(self._conv, x, self.sampled_weight(), feature_dims=3)
        if self.bias is None:
            return y
        return add_bias(y, self.bias, (self.out_channels, 1, 1))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"weight_shape={tuple(self.weight_shape)}"
        )
