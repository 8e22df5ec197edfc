"""2-d average and max pooling, for tensors and for means and variances."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from pyro_bqn.moments import Moments, split_moments
from pyro_bqn.nn.gaussian import gaussian_max

__all__ = ["AvgPool2d", "MaxPool2d"]


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair
    ):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


class _Pool2d(PyroModule):
    """Argument handling and dispatch shared by the pooling layers.

    Windows never overlap the border: ``padding``, ``ceil_mode`` (and ``dilation``) are
    accepted only at torch's defaults, so a network pools identically in both modes.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int = 0,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "stride")
        name = type(self).__name__
        if padding not in (0, (0, 0)):
            raise ValueError(
                f"{name} supports padding=0 only (its moment rule has no padded entries), "
                f"got padding={padding!r}"
            )
        if ceil_mode:
            raise ValueError(f"{name} supports ceil_mode=False only")

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        """:param x: a tensor, or :class:`~pyro_bqn.moments.Moments`, of shape
            ``(N, C, H, W)`` or ``(C, H, W)``.
        :returns: the same kind as ``x``, of shape ``(..., H_out, W_out)`` with
            ``H_out = (H - kernel_h) // stride_h + 1`` (likewise ``W_out``)."""
        mean, var = split_moments(x)
        if var is None:
            return self._pool_tensor(x)
        if mean.dim() not in (3, 4):
            raise ValueError(
                f"{type(self).__name__} expects (N, C, H, W) or (C, H, W) input, got shape "
                f"{tuple(mean.shape)}"
            )
        return Moments(*self._pool_moments(mean, var))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class AvgPool2d(_Pool2d):
    """Average pooling over ``kernel_size`` windows, as :class:`torch.nn.AvgPool2d`.

    * **Tensor in**: :func:`torch.nn.functional.avg_pool2d`.
    * **Moments in**: over each window of ``n = kernel_h * kernel_w`` independent inputs,
      mean ``sum(mu) / n`` and variance ``sum(s^2) / n^2``.

    :param kernel_size: window size, an int or ``(kernel_h, kernel_w)``.
    :param stride: window step, an int or a pair; default ``kernel_size``.
    :param padding: must be 0.
    :param ceil_mode: must be False.
    """

    def _pool_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride)

    def _pool_moments(
        self, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.kernel_size[0] * self.kernel_size[1]
        return self._pool_tensor(mean), self._pool_tensor(var) / count


class MaxPool2d(_Pool2d):
    """Max pooling over ``kernel_size`` windows, as :class:`torch.nn.MaxPool2d`.

    * **Tensor in**: :func:`torch.nn.functional.max_pool2d`.
    * **Moments in**: Clark's rule (:func:`~pyro_bqn.nn.gaussian.gaussian_max`) folded
      pairwise over each window in row-major order, ``max(max(max(x_1, x_2), x_3), ...)``,
      treating each partial maximum as Gaussian. Exact in mean and variance for two inputs
      (e.g. ``kernel_size=(1, 2)``); an approximation for larger windows (on random 2x2
      windows: mean within about 3% of the largest input standard deviation, variance
      within about 10% of the largest input variance).

    :param kernel_size: window size, an int or ``(kernel_h, kernel_w)``.
    :param stride: window step, an int or a pair; default ``kernel_size``.
    :param padding: must be 0.
    :param dilation: must be 1.
    :param ceil_mode: must be False.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int = 0,
        dilation: int = 1,
        ceil_mode: bool = False,
    ) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode)
        if dilation not in (1, (1, 1)):
            raise ValueError(f"MaxPool2d supports dilation=1 only, got dilation={dilation!r}")

    def _pool_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride)

    def _windows(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The ``kernel_h * kernel_w`` strided views of ``x``, one per window offset, each of
        shape ``(..., H_out, W_out)``."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        height, width = x.shape[-2:]
        if height < kh or width < kw:
            raise ValueError(
                f"MaxPool2d kernel_size={self.kernel_size} is larger than the input's spatial "
                f"size {(height, width)}"
            )
        h_span = sh * ((height - kh) // sh) + 1
        w_span = sw * ((width - kw) // sw) + 1
        return [
            x[..., i : i + h_span : sh, j : j + w_span : sw] for i in range(kh) for j in range(kw)
        ]

    def _pool_moments(
        self, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        means, variances = self._windows(mean), self._windows(var)
        out_mean, out_var = means[0], variances[0]
        for next_mean, next_var in zip(means[1:], variances[1:], strict=True):
            out_mean, out_var = gaussian_max(out_mean, out_var, next_mean, next_var)
        return out_mean, out_var
