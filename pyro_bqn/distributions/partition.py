"""Level probabilities of a latent Gaussian weight quantized by learned partitions.

A weight of Bayesian asymmetric M-ary quantization (Chien & Chang, "Bayesian asymmetric
quantized neural networks", *Pattern Recognition* 139, 2023) is a real value quantized to
the levels by *partitions*: ``w = v_k`` where ``t_{k-1} <= u < t_k`` (``t_0 = -inf``,
``t_K = +inf``). With a Gaussian variational posterior ``u ~ N(m, s^2)`` on the latent real
weight, ``w`` is categorical over the levels with

    ``q_k = Phi((t_k - m) / s) - Phi((t_{k-1} - m) / s)``,

so the partitions ``t`` (shared by a layer and learned) and each weight's ``(m, s)`` give a
posterior over the levels that the sampling-free ELBO handles like any other categorical.
"""

from __future__ import annotations

import torch

__all__ = ["partition_log_probs"]

# Standard scores are clamped to +-_Z_CLAMP and the open ends of the first and last interval
# sit at +-_Z_END, beyond them: log Phi and its gradient stay finite there (in float32 too,
# since _Z_END^2 / 2 < 3.4e38), so no 0 * inf reaches a backward pass.
_Z_CLAMP = 1e17
_Z_END = 1e18


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurately for ``x`` near 0 and far below it."""
    x = x.clamp(max=-1e-12)  # x = 0 only when rounding merges two standard scores
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def partition_log_probs(
    loc: torch.Tensor, scale: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    """``log q_k = log(Phi((t_k - m)/s) - Phi((t_{k-1} - m)/s))`` for every weight.

    Each interval probability is a difference of two normal CDFs taken in the tail where it
    does not cancel (``Phi(b) - Phi(a) = Phi(-a) - Phi(-b)``), in log space, so that
    probabilities far below machine epsilon keep their logarithm and a finite gradient.

    :param loc: ``m``, the latent weights' means, any shape ``S``.
    :param scale: ``s``, positive, shape ``S`` (or broadcastable).
    :param thresholds: ``t_1 < ... < t_{K-1}``, shape ``(K - 1,)``.
    :returns: log-probabilities stored levels first, shape ``(K,) + S`` (contiguous, the
        layout :class:`~pyro_bqn.distributions.QuantizedCategorical` reads fastest; pass
        ``result.movedim(0, -1)`` as its ``logits``).
    """
    view = (-1,) + (1,) * loc.dim()
    z = ((thresholds.reshape(view) - loc) / scale).clamp(-_Z_CLAMP, _Z_CLAMP)
    end = torch.full_like(z[:1], _Z_END)
    upper = torch.cat([z, end])
    lower = torch.cat([-end, z])
    # Mirror the intervals that lie mostly above the mean into the lower tail.
    flip = (lower + upper) > 0
    a = torch.where(flip, -upper, lower)
    b = torch.where(flip, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    return log_b + _log1mexp(torch.special.log_ndtr(a) - log_b)
