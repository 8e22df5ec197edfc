"""Level sets: the finite values a quantized weight or activation may take.

A level set holds ``K >= 2`` strictly increasing, finite values ``v_1 < ... < v_K`` and
the ``K - 1`` thresholds between neighbours (the midpoints ``(v_k + v_{k+1}) / 2``) that
quantized activations and nearest-level rounding use.

Level sets are :class:`~pyro.nn.PyroModule` s so a learnable one can live inside a model
and be optimised by :class:`~pyro.infer.SVI` like any other parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

__all__ = [
    "LevelSet",
    "LearnableLevels",
    "binary",
    "ternary",
    "uniform",
    "from_values",
    "learnable",
    "check_levels",
]


def check_levels(values: torch.Tensor, name: str = "levels") -> torch.Tensor:
    """Validate a level tensor and return it.

    :param values: tensor of shape ``(K,)``.
    :raises ValueError: if ``values`` is not 1-D, has fewer than two entries, holds NaN or
        infinite values, or is not strictly increasing (unsorted or duplicate values).
    """
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (K,), got {type(values).__name__}")
    if values.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional (K,), got shape {tuple(values.shape)}")
    if values.numel() < 2:
        raise ValueError(f"{name} needs at least two values, got {values.numel()}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} must be finite, got {values.tolist()}")
    gaps = values[1:] - values[:-1]
    if (gaps == 0).any():
        raise ValueError(f"{name} must not contain duplicate values, got {values.tolist()}")
    if (gaps < 0).any():
        raise ValueError(f"{name} must be sorted in increasing order, got {values.tolist()}")
    return values


class LevelSet(PyroModule):
    """A fixed set of quantization levels.

    :param values: the ``K`` levels, strictly increasing and finite, shape ``(K,)``.
    """

    def __init__(self, values: torch.Tensor | Sequence[float]) -> None:
        super().__init__()
        tensor = torch.as_tensor(values, dtype=torch.get_default_dtype())
        self.register_buffer("_values", check_levels(tensor.clone()))

    @property
    def values(self) -> torch.Tensor:
        """The levels, shape ``(K,)``."""
        return self._values

    @property
    def num_levels(self) -> int:
        """``K``, the number of levels."""
        return self.values.shape[0]

    @property
    def thresholds(self) -> torch.Tensor:
        """Midpoints between neighbouring levels, shape ``(K - 1,)``."""
        values = self.values
        return 0.5 * (values[1:] + values[:-1])

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Round every entry of ``x`` to its nearest level (ties go up); same shape as ``x``."""
        index = torch.bucketize(x.detach(), self.thresholds.detach())
        return self.values[index]

    def extra_repr(self) -> str:
        return f"values={[round(v, 4) for v in self.values.tolist()]}"


class LearnableLevels(LevelSet):
    """An asymmetric level set whose values are learned and stay strictly increasing.

    Parametrised as ``v_1 = first`` and ``v_{k+1} = v_k + softplus(raw_gap_k) + min_gap``,
    so every parameter value gives strictly increasing levels; ``min_gap`` keeps the gaps
    apart where ``softplus`` underflows to zero in floating point.

    :param init: initial levels, strictly increasing, shape ``(K,)``.
    :param min_gap: smallest allowed distance between neighbouring levels.
    """

    def __init__(self, init: torch.Tensor | Sequence[float], min_gap: float = 1e-3) -> None:
        super().__init__(init)
        init_values = self._values
        if min_gap < 0:
            raise ValueError(f"min_gap must be non-negative, got {min_gap}")
        gaps = init_values[1:] - init_values[:-1] - min_gap
        if (gaps <= 0).any():
            raise ValueError(
                f"init levels must be at least min_gap={min_gap} apart, got {init_values.tolist()}"
            )
        self.min_gap = min_gap
        self.first = torch.nn.Parameter(init_values[:1].clone())
        # Inverse softplus, so that the initial levels are reproduced exactly.
        self.raw_gaps = torch.nn.Parameter(gaps + torch.log(-torch.expm1(-gaps)))

    @property
    def values(self) -> torch.Tensor:
        gaps = F.softplus(self.raw_gaps) + self.min_gap
        return torch.cat([self.first, self.first + torch.cumsum(gaps, dim=0)])


def binary() -> LevelSet:
    """The binary levels ``{-1, 1}``."""
    return LevelSet([-1.0, 1.0])


def ternary() -> LevelSet:
    """The ternary levels ``{-1, 0, 1}``."""
    return LevelSet([-1.0, 0.0, 1.0])


def uniform(bits: int) -> LevelSet:
    """``2**bits`` evenly spaced levels in ``[-1, 1]``, symmetric about zero.

    ``uniform(1)`` is :func:`binary`; ``uniform(2)`` is ``{-1, -1/3, 1/3, 1}``.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
        raise ValueError(f"bits must be a positive integer, got {bits!r}")
    return LevelSet(torch.linspace(-1.0, 1.0, 2**bits))


def from_values(values: torch.Tensor | Sequence[float]) -> LevelSet:
    """A fixed level set from user values (strictly increasing, finite, at least two)."""
    return LevelSet(values)


def learnable(init: torch.Tensor | Sequence[float], min_gap: float = 1e-3) -> LearnableLevels:
    """A learnable asymmetric level set starting at ``init``; see :class:`LearnableLevels`."""
    return LearnableLevels(init, min_gap=min_gap)
