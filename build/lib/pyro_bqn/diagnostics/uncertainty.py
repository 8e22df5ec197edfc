"""Uncertainty of a predictive distribution and how well it flags out-of-distribution inputs.

Entropies are in nats (natural logarithm) with ``0 log 0 = 0``.

* Total uncertainty: the entropy of the predictive ``H[p] = -Σ_c p_c log p_c``.
* Epistemic part: the mutual information between the label and the weights,
  ``I = H[E_w p(·|x, w)] - E_w H[p(·|x, w)]``, estimated from ``S`` predictive vectors
  computed under ``S`` weight samples. The subtracted mean entropy is the aleatoric part.
"""

from __future__ import annotations

import numpy as np
import torch

from pyro_bqn.diagnostics._validation import TensorLike, as_probs, as_scores

__all__ = ["mutual_information", "ood_auroc", "predictive_entropy"]


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    # torch.special.entr is -p log p with entr(0) = 0, so one-hot rows give 0, not NaN.
    return torch.special.entr(probs).sum(-1)


def predictive_entropy(probs: TensorLike) -> torch.Tensor:
    """Entropy of each predictive distribution: ``H_i = -Σ_c p_ic log p_ic`` (nats).

    :param probs: probabilities, shape ``(N, C)`` or more generally ``(..., C)``, summing
        to one over the last dimension.
    :returns: tensor of shape ``(N,)`` (``probs.shape[:-1]``), values in ``[0, log C]``.
    """
    return _entropy(as_probs(probs, ndim=None))


def mutual_information(sampled_probs: TensorLike) -> torch.Tensor:
    """Mutual information between label and weights, the epistemic uncertainty:
    ``I_i = H[(1/S) Σ_s p_sic] - (1/S) Σ_s H[p_si·]`` (nats).

    Zero when all ``S`` samples agree; at most ``log C``.

    :param sampled_probs: predictive probabilities under ``S`` weight samples, shape
        ``(S, N, C)``, summing to one over the last dimension. Exactly three dimensions are
        required so that an ``(N, C)`` predictive is not mistaken for ``N`` samples.
    :returns: tensor of shape ``(N,)``, ``>= 0``.
    """
    sampled_probs = as_probs(sampled_probs, name="sampled_probs", ndim=3)
    total = _entropy(sampled_probs.mean(0))
    aleatoric = _entropy(sampled_probs).mean(0)
    # Non-negative by Jensen (entropy is concave); rounding can leave a tiny negative.
    return (total - aleatoric).clamp_min(0)


def ood_auroc(score_in: TensorLike, score_out: TensorLike) -> float:
    """Area under the ROC curve for telling out-of-distribution inputs from in-distribution
    ones by a score where higher means more likely out-of-distribution (for instance
    :func:`predictive_entropy` or :func:`mutual_information`).

    Equals the probability that a random out-of-distribution score exceeds a random
    in-distribution one, ties counting one half: 1 is perfect separation, 0.5 chance.
    Computed by scikit-learn's ``roc_auc_score`` with out-of-distribution as the positive
    class.

    :param score_in: scores of in-distribution inputs, shape ``(N_in,)``.
    :param score_out: scores of out-of-distribution inputs, shape ``(N_out,)``.
    :returns: a float in ``[0, 1]``.
    """
    # Imported here: scikit-learn's metrics pull in SciPy (about a second), which the rest
    # of pyro_bqn does not need at import time.
    from sklearn.metrics import roc_auc_score

    score_in = as_scores(score_in, "score_in")
    score_out = as_scores(score_out, "score_out")
    labels = np.concatenate([np.zeros(score_in.shape[0]), np.ones(score_out.shape[0])])
    return float(roc_auc_score(labels, np.concatenate([score_in, score_out])))
