"""Scores of predictive probabilities against observed labels: accuracy, negative
log-likelihood and the Brier score.

Each takes ``probs`` of shape ``(N, C)`` — row ``i`` the predictive distribution over the
``C`` classes for sample ``i`` — and integer labels ``y`` of shape ``(N,)``, as torch
tensors or numpy arrays, and returns a 0-dim tensor (differentiable where the formula is)
on ``probs``' device.
"""

from __future__ import annotations

import torch

from pyro_bqn.diagnostics._validation import TensorLike, as_labels, as_probs

__all__ = ["NLL_FLOOR", "accuracy", "brier_score", "nll"]

#: Default lower bound on the probability of the observed class inside the logarithm of
#: :func:`nll`, so a confidently wrong prediction costs ``-log(1e-12) ≈ 27.6`` nats
#: instead of ``inf``, whatever the dtype.
NLL_FLOOR = 1e-12


def accuracy(probs: TensorLike, y: TensorLike) -> torch.Tensor:
    """Fraction of samples whose top-1 class is the label: ``mean_i 1[argmax_c p_ic = y_i]``.

    Ties go to the lowest class index (``torch.argmax``'s rule).

    :param probs: predictive probabilities, shape ``(N, C)``, rows summing to one.
    :param y: integer labels, shape ``(N,)``, values in ``[0, C)``.
    :returns: 0-dim tensor in ``[0, 1]``.
    """
    probs = as_probs(probs)
    y = as_labels(y, probs)
    return (probs.argmax(-1) == y).to(probs.dtype).mean()


def nll(probs: TensorLike, y: TensorLike, floor: float = NLL_FLOOR) -> torch.Tensor:
    """Mean negative log-likelihood of the labels, in nats:
    ``-(1/N) Σ_i log max(p_{i, y_i}, floor)``.

    :param probs: predictive probabilities, shape ``(N, C)``, rows summing to one.
    :param y: integer labels, shape ``(N,)``, values in ``[0, C)``.
    :param floor: smallest probability allowed inside the log (default :data:`NLL_FLOOR`),
        which caps each sample's contribution at ``-log(floor)``; must lie in ``(0, 1)``.
    :returns: 0-dim tensor, ``>= 0``. Uniform predictions give ``log C``.
    """
    if not 0 < floor < 1:
        raise ValueError(f"floor must lie in (0, 1), got {floor!r}")
    probs = as_probs(probs)
    y = as_labels(y, probs)
    observed = probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return -observed.clamp_min(floor).log().mean()


def brier_score(probs: TensorLike, y: TensorLike) -> torch.Tensor:
    """Multi-class Brier score: ``(1/N) Σ_i Σ_c (p_ic - 1[c = y_i])^2``.

    This is the original (Brier, 1950) convention, summed over all ``C`` classes, so it
    ranges over ``[0, 2]`` and a uniform prediction scores ``1 - 1/C``. Binary scores that
    use the positive class only (e.g. scikit-learn's ``brier_score_loss``) are half of this
    for ``C = 2``.

    :param probs: predictive probabilities, shape ``(N, C)``, rows summing to one.
    :param y: integer labels, shape ``(N,)``, values in ``[0, C)``.
    :returns: 0-dim tensor in ``[0, 2]``.
    """
    probs = as_probs(probs)
    y = as_labels(y, probs)
    onehot = torch.nn.functional.one_hot(y, probs.shape[-1]).to(probs.dtype)
    return (probs - onehot).square().sum(-1).mean()
