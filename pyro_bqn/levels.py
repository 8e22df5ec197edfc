"""Level sets: the finite values a quantized weight or activation may take.

A level set holds ``K >= 2`` strictly increasing, finite values ``v_1 < ... < v_K`` and
the ``K - 1`` thresholds between neighbours (the midpoints ``(v_k + v_{k+1}) / 2``) that
quantized activations and nearest-level rounding use.

Level sets are :class:`~pyro.nn.PyroModule` s so a learnable one can live inside a model
and be optimised by :class:`~pyro.infer.SVI` like any other parameter. A learnable level set
is a *parameter of the model*: it reaches Pyro's param store (and the optimiser, checkpoints
and exported networks) when a layer reads it inside its own call, which
:class:`~pyro_bqn.QuantizedLinear` and :class:`~pyro_bqn.QuantizedConv2d` do at every call.
Give each layer its own copy (:meth:`LevelSet.copy`): the levels of Bayesian asymmetric
quantization (Chien & Chang, *Pattern Recognition* 139, 2023) are per layer.

:func:`from_spec` reads a level set from a short text (``"ternary"``, ``"2bit"``,
``"learnable:-1,-0.2,0.4,1.2"``), e.g. a command-line option.
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
    "from_spec",
    "layer_levels",
    "LearnableThresholds",
]

#: ``from_spec("<n>bit")`` goes up to this many bits (256 levels).
MAX_BITS = 8


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


def _relative_scale(values: torch.Tensor) -> torch.Tensor:
    return values.abs().clamp(min=1.0)


def _check_min_gap(min_gap: float, dtype: torch.dtype) -> None:
    smallest = 2 * torch.finfo(dtype).eps
    if not min_gap >= smallest:
        raise ValueError(
            f"min_gap must be at least {smallest:.3g} (twice the machine epsilon of "
            f"{dtype}), got {min_gap}"
        )


def _raw_gaps(values: torch.Tensor, min_gap: float, name: str) -> torch.Tensor:
    """The unconstrained gaps that :func:`_increasing` maps back to ``values`` ``(n,)``."""
    gaps = values[1:] - values[:-1] - min_gap * _relative_scale(values[:-1])
    if (gaps <= 0).any():
        raise ValueError(
            f"init {name} must be more than min_gap * max(1, |v_k|) apart "
            f"(min_gap={min_gap}), got {values.tolist()}"
        )
    # Inverse softplus, so that the initial values are reproduced.
    return gaps + torch.log(-torch.expm1(-gaps))


def _increasing(first: torch.Tensor, raw_gaps: torch.Tensor, min_gap: float) -> torch.Tensor:
    """``v_1 = first``, ``v_{k+1} = v_k + softplus(raw_gap_k) + min_gap * max(1, |v_k|)``."""
    # Sequential, not a cumsum: each minimum gap depends on the value below it.
    values = [first]
    for raw_gap in F.softplus(raw_gaps).split(1):
        below = values[-1]
        values.append(below + raw_gap + min_gap * _relative_scale(below))
    return torch.cat(values)


class LearnableThresholds(PyroModule):
    """``n >= 1`` learnable, strictly increasing values: the partition points of a quantizer
    (the thresholds of a :class:`~pyro_bqn.nn.QuantizedActivation`, or of a weight's
    partition posterior in :class:`~pyro_bqn.AutoQuantizedGuide`).

    Parametrised as :class:`LearnableLevels` is (``first`` and softplus gaps, parameters
    ``first`` of shape ``(1,)`` and ``raw_gaps`` of shape ``(n - 1,)``), so any finite
    parameter values give strictly increasing thresholds.

    :param init: the initial values, strictly increasing and finite, shape ``(n,)``.
    :param min_gap: the minimum relative gap, as for :class:`LearnableLevels`.
    """

    def __init__(self, init: torch.Tensor | Sequence[float], min_gap: float = 1e-3) -> None:
        super().__init__()
        values = torch.as_tensor(init, dtype=torch.get_default_dtype()).detach().clone()
        if values.dim() != 1 or values.numel() < 1 or not torch.isfinite(values).all():
            raise ValueError(
                f"thresholds must be a finite (n,) tensor with n >= 1, got {values.tolist()}"
            )
        if (values[1:] <= values[:-1]).any():
            raise ValueError(
                f"thresholds must be sorted in strictly increasing order, got {values.tolist()}"
            )
        _check_min_gap(min_gap, values.dtype)
        self.min_gap = min_gap
        self.first = torch.nn.Parameter(values[:1].clone())
        self.raw_gaps = torch.nn.Parameter(_raw_gaps(values, min_gap, "thresholds"))

    @property
    def values(self) -> torch.Tensor:
        """The thresholds, shape ``(n,)``, strictly increasing."""
        return _increasing(self.first, self.raw_gaps, self.min_gap)

    def extra_repr(self) -> str:
        return f"values={[round(v, 4) for v in self.values.tolist()]}"


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

    @property
    def learnable(self) -> bool:
        """Whether the values are learned (parameters), not fixed."""
        return False

    def copy(self) -> LevelSet:
        """An independent level set with the same current values (and, for a learnable
        one, its own parameters, equal to these): one per layer, as Chien's levels are.

        Usage::

            >>> from pyro_bqn import levels
            >>> shared = levels.learnable([-1.0, -0.2, 0.4, 1.2])
            >>> per_layer = [shared.copy() for _ in range(3)]
            >>> per_layer[0].first is per_layer[1].first
            False
        """
        new = LevelSet(self.values.detach()).to(self._values)
        with torch.no_grad():
            # Exactly, in this set's dtype: the constructor reads values in the default one.
            new._values.copy_(self._values)
        return new

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
        _check_min_gap(min_gap, init_values.dtype)
        self.min_gap = min_gap
        self.first = torch.nn.Parameter(init_values[:1].clone())
        self.raw_gaps = torch.nn.Parameter(_raw_gaps(init_values, min_gap, "levels"))

    @property
    def values(self) -> torch.Tensor:
        return _increasing(self.first, self.raw_gaps, self.min_gap)

    @property
    def learnable(self) -> bool:
        return True

    def copy(self) -> LearnableLevels:
        """A learnable level set with its own parameters, equal to these (the same current
        levels and ``min_gap``)."""
        new = LearnableLevels(self._values, self.min_gap).to(self._values)
        with torch.no_grad():
            new.first.copy_(self.first)
            new.raw_gaps.copy_(self.raw_gaps)
        return new


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


def from_spec(text: str, max_bits: int = MAX_BITS) -> LevelSet:
    """A level set from a short text, e.g. a command-line option.

    ``binary``, ``ternary``, ``<n>bit`` (``2**n`` uniform levels, ``1 <= n <= max_bits``) or
    comma-separated values (``-0.7,0.1,1.3``); any of them after ``learnable:`` gives a
    learnable level set starting there (``learnable:-1,-0.2,0.4,1.2``, ``learnable:2bit``).
    A learnable set is one set of parameters: give each layer its own :meth:`LevelSet.copy`.

    :raises ValueError: naming what was expected, for any other text.
    """
    name = text.strip().lower()
    prefix = "learnable:"
    learn = name.startswith(prefix)
    if learn:
        name = name[len(prefix) :].strip()
    if name in ("binary", "ternary"):
        values = (binary if name == "binary" else ternary)().values
    elif name.endswith("bit") and name[:-3].isdigit():
        bits = int(name[:-3])
        if not 1 <= bits <= max_bits:
            raise ValueError(f"levels <n>bit needs 1 <= n <= {max_bits}, got {text!r}")
        values = uniform(bits).values
    else:
        try:
            numbers = [float(v) for v in name.split(",")]
        except ValueError:
            raise ValueError(
                "levels must be binary, ternary, <n>bit or comma-separated numbers, optionally "
                f"after 'learnable:', got {text!r}"
            ) from None
        if len(numbers) > 2**max_bits:
            raise ValueError(f"levels: at most {2**max_bits} values, got {len(numbers)}")
        values = torch.tensor(numbers)
    return learnable(values) if learn else from_values(values)


def layer_levels(model: torch.nn.Module) -> dict[str, list[float]]:
    """``{module name: current level values}`` of every submodule of ``model`` that holds a
    level set as ``levels`` (quantized layers and activations), in module order: e.g. the
    learned levels of each layer, for a report.

    Usage::

        >>> import torch
        >>> from pyro_bqn import QuantizedLinear
        >>> model = torch.nn.Sequential(QuantizedLinear(3, 2, levels=ternary()))
        >>> layer_levels(model)
        {'0': [-1.0, 0.0, 1.0]}
    """
    return {
        name: module.levels.values.detach().cpu().tolist()
        for name, module in model.named_modules()
        if isinstance(getattr(module, "levels", None), LevelSet)
    }
