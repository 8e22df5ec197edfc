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
        raise ValueError(
            f"{name} must be a torch.Tensor of shape (K,), got {type(values).__name__}"
        )
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
        # right=True puts a value equal to a threshold in the upper bucket: ties go up.
        index = torch.bucketize(x.detach(), self.thresholds.detach(), right=True)
        return self.values[index]

    def extra_repr(self) -> str:
        return f"values={[round(v, 4) for v in self.values.tolist()]}"


class LearnableLevels(LevelSet):
    """An asymmetric level set whose values are learned and stay strictly increasing.

    Parametrised as ``v_1 = first`` and

        ``v_{k+1} = v_k + softplus(raw_gap_k) + min_gap * max(1, |v_k|)``,

    so every finite parameter value gives strictly increasing levels (until they overflow
    the dtype). The minimum gap is relative for levels beyond ``[-1, 1]`` because an absolute
    one is lost to rounding there: in float32, ``3e4 + 1e-3 == 3e4``. For levels inside
    ``[-1, 1]`` it is simply ``min_gap``.

    :param init: initial levels, strictly increasing, shape ``(K,)``; neighbours must be more
        than ``min_gap * max(1, |v_k|)`` apart.
    :param min_gap: the minimum relative gap; at least twice the machine epsilon of the
        default dtype, so that the gap survives rounding.
    """

    def __init__(self, init: torch.Tensor | Sequence[float], min_gap: float = 1e-3) -> None:
        super().__init__(init)
        init_values = self._values
        smallest = 2 * torch.finfo(init_values.dtype).eps
        if not min_gap >= smallest:
            raise ValueError(
                f"min_gap must be at least {smallest:.3g} (twice the machine epsilon of "
                f"{init_values.dtype}), got {min_gap}"
            )
        gaps = init_values[1:] - init_values[:-1] - min_gap * self._scale(init_values[:-1])
        if (gaps <= 0).any():
            raise ValueError(
                f"init levels must be more than min_gap * max(1, |v_k|) apart "
                f"(min_gap={min_gap}), got {init_values.tolist()}"
            )
        self.min_gap = min_gap
        self.first = torch.nn.Parameter(init_values[:1].clone())
        # Inverse softplus, so that the initial levels are reproduced.
        self.raw_gaps = torch.nn.Parameter(gaps + torch.log(-torch.expm1(-gaps)))

    @staticmethod
    def _scale(values: torch.Tensor) -> torch.Tensor:
        return values.abs().clamp(min=1.0)

    @property
    def values(self) -> torch.Tensor:
        # Sequential, not a cumsum: each minimum gap depends on the level below it.
        levels = [self.first]
        for raw_gap in F.softplus(self.raw_gaps).split(1):
            below = levels[-1]
            levels.append(below + raw_gap + self.min_gap * self._scale(below))
        return torch.cat(levels)


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
