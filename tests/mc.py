"""Monte Carlo checks with tolerances derived from the sample size."""

from __future__ import annotations

import torch


def assert_mean_var_match(
    samples: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    z: float = 5.0,
    atol: float = 1e-6,
) -> None:
    """Check analytic ``mean``/``var`` against ``samples`` of shape ``(S,) + mean.shape``.

    The mean may differ from the sample mean by ``z`` standard errors ``sqrt(var / S)``; the
    variance from the sample variance by ``z`` standard errors of a sample variance,
    ``sqrt((m4 - s^4) / S)`` with ``m4`` the sample fourth central moment.
    """
    s = samples.shape[0]
    sample_mean = samples.mean(0)
    centred = samples - sample_mean
    sample_var = centred.square().mean(0)
    m4 = centred.pow(4).mean(0)
    mean_tol = z * (sample_var / s).sqrt() + atol
    var_tol = z * ((m4 - sample_var.square()).clamp_min(0) / s).sqrt() + atol
    mean_err = (mean - sample_mean).abs()
    var_err = (var - sample_var).abs()
    assert (mean_err <= mean_tol).all(), f"mean off by {mean_err.max():.3g} > tol"
    assert (var_err <= var_tol).all(), f"variance off by {var_err.max():.3g} > tol"
