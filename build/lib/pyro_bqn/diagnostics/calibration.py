"""Calibration of the top-1 prediction: binned statistics, the expected and maximum
calibration errors, and a JSON-ready report of the scalar metrics.

**Binning convention.** The top-1 confidence ``c_i = max_c p_ic`` is put into one of ``M``
equal-width bins ``I_1 = [0, 1/M], I_m = ((m-1)/M, m/M]`` for ``m = 2..M``: every bin
includes its right edge (Guo et al., 2017, "On Calibration of Modern Neural Networks"), so a
confidence of exactly ``1/2`` with ``M = 2`` lies in the first bin and a confidence of one
in the last. The inner edges are computed as ``m / M`` in ``probs``' dtype, so a confidence
written as the literal ``m / M`` lands on its edge exactly. The predicted class is
``argmax_c p_ic`` with ties going to the lowest index; ``correct_i = 1[argmax = y_i]``.

With ``B_m`` the samples in bin ``m`` and ``N`` the number of samples:

* ``ECE = Σ_m (|B_m|/N) |acc(B_m) - conf(B_m)| = (1/N) Σ_m |Σ_{i∈B_m} (correct_i - c_i)|``
* ``MCE = max over non-empty m of |acc(B_m) - conf(B_m)|``

where ``acc`` and ``conf`` are the mean of ``correct_i`` and of ``c_i`` over the bin.
Both are plug-in estimates: even a perfectly calibrated model has a positive expected ECE
of order ``sqrt(M / N)``, so compare models on the same ``N`` and ``M``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyro_bqn.diagnostics._validation import TensorLike, as_labels, as_probs, check_num_bins
from pyro_bqn.diagnostics.scoring import accuracy, brier_score, nll

__all__ = [
    "CalibrationBins",
    "calibration_bins",
    "calibration_report",
    "expected_calibration_error",
    "maximum_calibration_error",
]


class CalibrationBins(NamedTuple):
    """Per-bin statistics of the top-1 confidence (see the module docstring for the bins).

    :ivar edges: bin edges ``m / M`` for ``m = 0..M``, shape ``(M + 1,)``.
    :ivar counts: number of samples in each bin, int64, shape ``(M,)``.
    :ivar confidence: mean top-1 confidence in each bin, NaN where the bin is empty,
        shape ``(M,)``.
    :ivar accuracy: fraction of correct top-1 predictions in each bin, NaN where the bin is
        empty, shape ``(M,)``.
    """

    edges: torch.Tensor
    counts: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor


class _BinSums(NamedTuple):
    counts: torch.Tensor
    confidence_sum: torch.Tensor
    correct_sum: torch.Tensor


def _bin_sums(probs: TensorLike, y: TensorLike, num_bins: int) -> _BinSums:
    num_bins = check_num_bins(num_bins)
    probs = as_probs(probs).detach()
    y = as_labels(y, probs)
    confidence, predicted = probs.max(-1)
    correct = (predicted == y).to(probs.dtype)
    inner_edges = torch.arange(1, num_bins, dtype=probs.dtype, device=probs.device) / num_bins
    # right=False gives edges[m-1] < c <= edges[m]: each bin includes its right edge, and
    # c = 0 (impossible for a probability vector's maximum anyway) falls into the first.
    index = torch.bucketize(confidence, inner_edges, right=False)
    zeros = torch.zeros(num_bins, dtype=probs.dtype, device=probs.device)
    return _BinSums(
        counts=torch.bincount(index, minlength=num_bins),
        confidence_sum=zeros.index_add(0, index, confidence),
        correct_sum=zeros.index_add(0, index, correct),
    )


def _ece(sums: _BinSums) -> torch.Tensor:
    # The summed form |Σ (correct - c)| / N avoids dividing by bin counts (and is exact for
    # dyadic inputs, which the tests rely on).
    return (sums.correct_sum - sums.confidence_sum).abs().sum() / sums.counts.sum()


def _mce(sums: _BinSums) -> torch.Tensor:
    filled = sums.counts > 0
    gaps = (sums.correct_sum - sums.confidence_sum)[filled].abs() / sums.counts[filled]
    return gaps.max()


def _bins_from_sums(sums: _BinSums) -> CalibrationBins:
    counts = sums.counts
    num_bins = counts.shape[0]
    edges = torch.arange(num_bins + 1, dtype=sums.confidence_sum.dtype, device=counts.device)
    # 0/0 = NaN marks empty bins, which plots then leave blank.
    return CalibrationBins(
        edges=edges / num_bins,
        counts=counts,
        confidence=sums.confidence_sum / counts,
        accuracy=sums.correct_sum / counts,
    )


def calibration_bins(probs: TensorLike, y: TensorLike, num_bins: int = 15) -> CalibrationBins:
    """Bin the top-1 confidences into ``num_bins`` equal-width, right-closed bins.

    :param probs: predictive probabilities, shape ``(N, C)``, rows summing to one.
    :param y: integer labels, shape ``(N,)``, values in ``[0, C)``.
    :param num_bins: number of bins ``M >= 1``.
    :returns: :class:`CalibrationBins` with tensors of shape ``(M + 1,)`` and ``(M,)``.
    """
    return _bins_from_sums(_bin_sums(probs, y, num_bins))


def expected_calibration_error(
    probs: TensorLike, y: TensorLike, num_bins: int = 15
) -> torch.Tensor:
    """Expected calibration error of the top-1 prediction with ``num_bins`` equal-width bins:
    ``ECE = Σ_m (|B_m|/N) |acc(B_m) - conf(B_m)|`` (bins and notation in the module docstring).

    :param probs: predictive probabilities, shape ``(N, C)``, rows summing to one.
    :param y: integer labels, shape ``(N,)``, values in ``[0, C)``.
    :param num_bins: number of bins ``M >= 1``.
    :returns: 0-dim tensor in ``[0, 1]``.
    """
    return _ece(_bin_sums(probs, y, num_bins))


def maximum_calibration_error(probs: TensorLike, y: TensorLike, num_bins: int = 15) -> torch.Tensor:
    """Maximum calibration error of the top-1 prediction with ``num_bins`` equal-width bins:
    ``MCE = max_m |acc(B_m) - conf(B_m)|`` over the non-empty bins (module docstring).

    A bin holding few samples can dominate it; read it together with the bin counts.

    :param probs: predictive probabilities, shape ``(N, C)``, rows summing to one.
    :param y: integer labels, shape ``(N,)``, values in ``[0, C)``.
    :param num_bins: number of bins ``M >= 1``.
    :returns: 0-dim tensor in ``[0, 1]``.
    """
    return _mce(_bin_sums(probs, y, num_bins))


def calibration_report(probs: TensorLike, y: TensorLike, num_bins: int = 15) -> dict[str, float]:
    """The scalar metrics of a predictive distribution, as plain floats for JSON.

    :param probs: predictive probabilities, shape ``(N, C)``, rows summing to one.
    :param y: integer labels, shape ``(N,)``, values in ``[0, C)``.
    :param num_bins: number of bins for ECE and MCE, ``>= 1``.
    :returns: ``{"nll", "accuracy", "error", "ece", "mce", "brier"}``: the mean negative
        log-likelihood (:func:`~pyro_bqn.diagnostics.scoring.nll`, nats), top-1 accuracy and
        its complement ``1 - accuracy``, the two calibration errors, and the multi-class
        Brier score (:func:`~pyro_bqn.diagnostics.scoring.brier_score`).
    """
    probs = as_probs(probs).detach()
    y = as_labels(y, probs)
    sums = _bin_sums(probs, y, num_bins)
    acc = accuracy(probs, y).item()
    return {
        "nll": nll(probs, y).item(),
        "accuracy": acc,
        "error": 1.0 - acc,
        "ece": _ece(sums).item(),
        "mce": _mce(sums).item(),
        "brier": brier_score(probs, y).item(),
    }
