"""Diagnostics of a predictive distribution: calibration, scores, uncertainty and plots.

Metrics take predictive probabilities ``probs`` of shape ``(N, C)`` and integer labels
``y`` of shape ``(N,)`` as torch tensors or numpy arrays; inputs are validated and a
mistake raises :class:`ValueError` naming the argument.

Diagnostics of the weight posterior: :func:`to_inference_data` (ArviZ ``InferenceData`` of
drawn networks) and sampling-free per-layer summaries (:func:`posterior_summary`).
"""

from pyro_bqn.diagnostics.calibration import (
    CalibrationBins,
    calibration_bins,
    calibration_report,
    expected_calibration_error,
    maximum_calibration_error,
)
from pyro_bqn.diagnostics.inference_data import to_inference_data
from pyro_bqn.diagnostics.plots import entropy_histogram, reliability_diagram, save_figure
from pyro_bqn.diagnostics.posterior_summary import (
    PosteriorSummaryRecorder,
    plot_posterior_summary,
    plot_summary_history,
    posterior_summary,
)
from pyro_bqn.diagnostics.scoring import NLL_FLOOR, accuracy, brier_score, nll
from pyro_bqn.diagnostics.uncertainty import mutual_information, ood_auroc, predictive_entropy

__all__ = [
    "NLL_FLOOR",
    "CalibrationBins",
    "PosteriorSummaryRecorder",
    "accuracy",
    "brier_score",
    "calibration_bins",
    "calibration_report",
    "entropy_histogram",
    "expected_calibration_error",
    "maximum_calibration_error",
    "mutual_information",
    "nll",
    "ood_auroc",
    "plot_posterior_summary",
    "plot_summary_history",
    "posterior_summary",
    "predictive_entropy",
    "reliability_diagram",
    "save_figure",
    "to_inference_data",
]
