"""Gaussian helpers shared by the moment rules of :mod:`pyro_bqn.nn`.

The rules divide by standard deviations that may be zero (a deterministic unit) and
evaluate ``Phi`` and ``phi`` far in their tails (a confident unit). The helpers here keep
values *and* gradients finite in both cases:

* :func:`safe_std` floors the variance at :func:`variance_floor` before the square root;
* :func:`standardize` clips standard scores to ``[-40, 40]``, beyond which ``Phi`` is
  exactly 0 or 1 and ``phi`` exactly 0 in float32 and float64, so the clip changes no
  value, only keeps ``z**2`` and products like ``z * phi(z)`` away from overflow.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "normal_cdf",
    "normal_pdf",
    "variance_floor",
    "safe_std",
    "standardize",
    "gaussian_max",
]

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_Z_MAX = 40.0


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF ``Phi(z)``, elementwise.

    Computed as ``erfc(-z / sqrt 2) / 2`` so the lower tail keeps its relative precision
    (``1 + erf`` would cancel to zero there).
    """
    return 0.5 * torch.erfc(-z * _SQRT_HALF)


def normal_pdf(z: torch.Tensor) -> torch.Tensor:
    """Standard normal density ``phi(z) = exp(-z^2 / 2) / sqrt(2 pi)``, elementwise."""
    return torch.exp(-0.5 * z.square()) * _INV_SQRT_2PI


def variance_floor(dtype: torch.dtype) -> float:
    """The smallest variance the moment rules divide by: ``sqrt(finfo(dtype).tiny)``.

    With it ``1 / std**2`` stays finite for any sane mean, so the backward pass of
    ``mean / std`` never forms ``0 * inf`` (about ``1e-19`` in float32, ``1e-154`` in float64).
    """
    return torch.finfo(dtype).tiny ** 0.5


def safe_std(var: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(var, variance_floor))``; same shape as ``var``."""
    return var.clamp_min(variance_floor(var.dtype)).sqrt()


def standardize(x: torch.Tensor, loc: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The standard score ``(x - loc) / std`` clipped to ``[-40, 40]`` (broadcasting)."""
    return ((x - loc) / std).clamp(-_Z_MAX, _Z_MAX)


def gaussian_max(
    mean0: torch.Tensor, var0: torch.Tensor, mean1: torch.Tensor, var1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of ``max(x0, x1)`` for independent ``x0 ~ N(mean0, var0)`` and
    ``x1 ~ N(mean1, var1)`` (Clark, 1961); exact for two Gaussians.

    With ``alpha = sqrt(var0 + var1)`` and ``beta = (mean0 - mean1) / alpha``:

    .. math::

        E = \mu_0 \Phi(\beta) + \mu_1 \Phi(-\beta) + \alpha \phi(\beta),\quad
        E[\max^2] = (\mu_0^2 + \sigma_0^2)\Phi(\beta) + (\mu_1^2 + \sigma_1^2)\Phi(-\beta)
                    + (\mu_0 + \mu_1)\alpha\phi(\beta).

    The variance ``E[max^2] - E^2`` is evaluated in the centred form (shift both inputs by
    ``mean1``, which moves the maximum and leaves its variance alone)

    .. math::

        \sigma_0^2\Phi(\beta) + \sigma_1^2\Phi(-\beta) + \alpha^2\big[\beta^2\Phi(\beta)
        \Phi(-\beta) + \beta\phi(\beta)(\Phi(-\beta) - \Phi(\beta)) - \phi(\beta)^2\big],

    which avoids the cancellation of two large second moments, and clamped at 0.
    ``ReLU`` is the case ``mean1 = var1 = 0``.

    All arguments broadcast together; both results have the broadcast shape.
    """
    total_var = var0 + var1
    diff = mean0 - mean1
    std = safe_std(total_var)
    beta = standardize(diff, 0.0, std)
    cdf, cdf_neg, pdf = normal_cdf(beta), normal_cdf(-beta), normal_pdf(beta)
    mean = mean1 + diff * cdf + std * pdf
    spread = beta.square() * cdf * cdf_neg + beta * pdf * (cdf_neg - cdf) - pdf.square()
    var = var0 * cdf + var1 * cdf_neg + total_var * spread
    return mean, var.clamp_min(0.0)
