"""Quantized activations: a step function onto ``M`` output values, and its ``M = 2`` case
:class:`Sign`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro.nn import PyroModule

from pyro_bqn.levels import LevelSet, check_levels
from pyro_bqn.moments import Moments, split_moments
from pyro_bqn.nn.gaussian import normal_cdf, safe_std, standardize

__all__ = ["QuantizedActivation", "Sign", "quantized_activation_moments"]


def quantized_activation_moments(
    mean: torch.Tensor, var: torch.Tensor, values: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of the step function ``a(h)`` for ``h ~ N(mean, var)``.

    ``a(h) = a_j`` for ``t_{j-1} <= h < t_j`` (with ``t_0 = -inf``, ``t_M = +inf``), so
    ``P(a_j) = Phi((t_j - mu)/s) - Phi((t_{j-1} - mu)/s)``. Writing the step function as
    ``a_1 + sum_j d_j 1[h >= t_j]`` with ``d_j = a_{j+1} - a_j`` and ``p_j = P(h >= t_j)``:

    .. math::

        E[a] = a_1 + \sum_j d_j p_j,\qquad
        \mathrm{Var}[a] = \sum_j d_j p_j \Big(d_j (1 - p_j) + 2 \sum_{i<j} d_i (1 - p_i)\Big),

    using ``Cov(1[h >= t_i], 1[h >= t_j]) = p_j (1 - p_i)`` for ``t_i < t_j``. For increasing
    values every term is non-negative, so the variance needs no cancelling subtraction.

    :param mean: ``mu``, any shape ``S``.
    :param var: ``s^2``, shape ``S``.
    :param values: ``(a_1, ..., a_M)``, shape ``(M,)``, increasing.
    :param thresholds: ``(t_1, ..., t_{M-1})``, shape ``(M - 1,)``, increasing.
    :returns: ``(mean, var)`` of ``a(h)``, each of shape ``S``.
    """
    if values.shape[0] == 2:
        # One threshold: the same formulas without the trailing level dimension, which
        # halves the work in binary networks (the common case, e.g. Sign).
        z = standardize(thresholds[0], mean, safe_std(var))
        above, below = normal_cdf(-z), normal_cdf(z)
        step = values[1] - values[0]
        return values[0] + step * above, (step.square() * above * below).clamp_min(0.0)
    std = safe_std(var).unsqueeze(-1)
    z = standardize(thresholds, mean.unsqueeze(-1), std)
    above, below = normal_cdf(-z), normal_cdf(z)
    steps = values[1:] - values[:-1]
    out_mean = values[0] + (steps * above).sum(-1)
    weighted_below = steps * below
    below_before = torch.cumsum(weighted_below, dim=-1) - weighted_below
    out_var = (steps * above * (weighted_below + 2.0 * below_before)).sum(-1)
    return out_mean, out_var.clamp_min(0.0)


def _check_thresholds(thresholds: torch.Tensor) -> torch.Tensor:
    if thresholds.dim() != 1 or thresholds.numel() < 1:
        raise ValueError(
            f"thresholds must have shape (M - 1,) with M >= 2, got shape {tuple(thresholds.shape)}"
        )
    if not torch.isfinite(thresholds).all():
        raise ValueError(f"thresholds must be finite, got {thresholds.tolist()}")
    if (thresholds[1:] <= thresholds[:-1]).any():
        raise ValueError(
            f"thresholds must be sorted in strictly increasing order, got {thresholds.tolist()}"
        )
    return thresholds


class QuantizedActivation(PyroModule):
    r"""An activation with ``M`` output values ``a_1 < ... < a_M`` switched at thresholds
    ``t_1 < ... < t_{M-1}``: ``a(h) = a_j`` for ``t_{j-1} <= h < t_j`` (a point on a
    threshold goes up).

    * **Tensor in** (a sampled or most-probable network): the step function, elementwise,
      with the straight-through gradient of ``clamp(h, a_1, a_M)`` (for :class:`Sign`,
      hardtanh's: pass the gradient where ``|h| <= 1``, as in Binarized Neural Networks).
      Learnable output values receive their ordinary gradient.
    * **Moments in** (``h ~ N(mu, s^2)``, independent entries): the mean and variance of
      ``a(h)``; see :func:`quantized_activation_moments`.

    Input and output have the same shape (any shape).

    :param levels: the output values as a :class:`~pyro_bqn.levels.LevelSet` (a learnable
        one is learned with the model).
    :param thresholds: ``(M - 1,)`` strictly increasing thresholds; default: the midpoints
        between neighbouring output values.
    :param values: the output values as a strictly increasing ``(M,)`` tensor or sequence,
        instead of ``levels``.
    """

    def __init__(
        self,
        levels: LevelSet | None = None,
        thresholds: torch.Tensor | Sequence[float] | None = None,
        values: torch.Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if (levels is None) == (values is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of levels or values")
        if levels is None:
            dtype = torch.get_default_dtype()
            levels = LevelSet(check_levels(torch.as_tensor(values, dtype=dtype), "values"))
        elif not isinstance(levels, LevelSet):
            raise ValueError(
                f"levels must be a pyro_bqn.levels.LevelSet, got {type(levels).__name__}; "
                "pass a tensor of output values as values=..."
            )
        self.levels = levels
        if thresholds is not None:
            thresholds = torch.as_tensor(thresholds, dtype=torch.get_default_dtype())
            _check_thresholds(thresholds)
            if thresholds.numel() != levels.num_levels - 1:
                raise ValueError(
                    "len(values) must equal len(thresholds) + 1, got "
                    f"{levels.num_levels} values and {thresholds.numel()} thresholds"
                )
            thresholds = thresholds.clone()
        self.register_buffer("_thresholds", thresholds)

    @property
    def values(self) -> torch.Tensor:
        """The output values ``(a_1, ..., a_M)``, shape ``(M,)``."""
        return self.levels.values

    @property
    def thresholds(self) -> torch.Tensor:
        """The thresholds ``(t_1, ..., t_{M-1})``, shape ``(M - 1,)``."""
        return self.levels.thresholds if self._thresholds is None else self._thresholds

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        """:param x: a tensor, or :class:`~pyro_bqn.moments.Moments`, of any shape.
        :returns: the same kind and shape as ``x``."""
        mean, var = split_moments(x)
        values = self.values.to(mean.dtype)
        thresholds = self.thresholds.to(mean.dtype)
        if var is not None:
            return Moments(*quantized_activation_moments(mean, var, values, thresholds))
        index = torch.bucketize(x.detach(), thresholds.detach(), right=True)
        surrogate = x.clamp(values[0].detach(), values[-1].detach())
        # Forward value: the step function; gradient wrt x: the surrogate's (the STE).
        return values[index] + (surrogate - surrogate.detach())

    def extra_repr(self) -> str:
        if self._thresholds is None:
            return ""
        return f"thresholds={[round(t, 4) for t in self._thresholds.tolist()]}"


class Sign(QuantizedActivation):
    r"""``sign(h)`` with ``sign(0) = +1``: the :class:`QuantizedActivation` with values
    ``(-1, 1)`` and threshold ``0``.

    * **Tensor in**: ``+1`` where ``h >= 0``, else ``-1``; straight-through gradient of
      hardtanh (the incoming gradient where ``|h| <= 1``, zero elsewhere).
    * **Moments in** (``h ~ N(mu, s^2)``): mean ``a = erf(mu / sqrt(2 s^2)) = 2 Phi(mu/s) - 1``,
      variance ``1 - a^2 = 4 Phi(mu/s) Phi(-mu/s)`` (the latter form is used: it does not
      cancel when ``|a|`` is close to 1).

    Input and output have the same shape (any shape).
    """

    def __init__(self) -> None:
        super().__init__(values=(-1.0, 1.0))
