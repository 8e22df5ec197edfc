"""Argument checks shared by the baseline modules."""

from __future__ import annotations

import torch


def check_positive_int(value: int, name: str) -> None:
    """:raises ValueError: naming ``name`` unless ``value`` is an ``int`` ``>= 1``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    """:raises ValueError: unless ``x`` is ``(N, ...)`` with ``N >= 1`` and ``y`` is ``(N,)``
    of dtype ``torch.long``."""
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (N, ...) with N >= 1, got {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape (N,) = ({x.shape[0]},), got {tuple(y.shape)}")
    if y.dtype != torch.long:
        raise ValueError(f"y must hold integer class labels (torch.long), got {y.dtype}")
