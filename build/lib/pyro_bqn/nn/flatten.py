"""Flattening, for tensors and for means and variances."""

from __future__ import annotations

import torch
from pyro.nn import PyroModule

from pyro_bqn.moments import Moments, split_moments

__all__ = ["Flatten"]


class Flatten(PyroModule):
    """Flatten dimensions ``start_dim`` to ``end_dim`` into one, like :class:`torch.nn.Flatten`.

    For :class:`~pyro_bqn.moments.Moments` the mean and the variance are flattened alike
    (flattening moves entries, it mixes none). Shape ``(N, C, H, W) -> (N, C * H * W)`` with
    the defaults.

    :param start_dim: first dimension to flatten.
    :param end_dim: last dimension to flatten.
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        """:param x: a tensor, or :class:`~pyro_bqn.moments.Moments`.
        :returns: the same kind as ``x``, flattened."""
        mean, var = split_moments(x)
        if var is None:
            return x.flatten(self.start_dim, self.end_dim)
        return Moments(
            mean.flatten(self.start_dim, self.end_dim), var.flatten(self.start_dim, self.end_dim)
        )

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
