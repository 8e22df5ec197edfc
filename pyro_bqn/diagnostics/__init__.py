"""Diagnostics of a predictive distribution: calibration, scores, uncertainty and plots.

Metrics take predictive probabilities ``probs`` of shape ``(N, C)`` and integer labels
``y`` of shape ``(N,)`` as torch tensors or numpy arrays; inputs are validated and a
mistake raises :class:`ValueError` naming the argument.

Diagnostics of the weight posterior: :func:`to_inference_data` (ArviZ ``InferenceData`` of
drawn networks) and sampling-free per-layer summaries (:func:`posterior_summary`).

The plots, :func:`to_inference_data` and the posterior summaries are imported when first
used, with matplotlib, xarray and ArviZ.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

from pyro_bqn.diagnostics.calibration import (
    CalibrationBins,
    calibration_bins,
    calibration_report,
    expected_calibration_error,
    maximum_calibration_error,
)
from pyro_bqn.diagnostics.scoring import NLL_FLOOR, accuracy, brier_score, nll
from pyro_bqn.diagnostics.uncertainty import mutual_information, ood_auroc, predictive_entropy

if TYPE_CHECKING:
    from pyro_bqn.diagnostics.inference_data import to_inference_data
    from pyro_bqn.diagnostics.plots import entropy_histogram, reliability_diagram, save_figure
    from pyro_bqn.diagnostics.posterior_summary import (
        PosteriorSummaryRecorder,
        plot_posterior_summary,
        plot_summary_history,
        posterior_summary,
    )

# The submodules that load matplotlib, xarray or ArviZ (about 1.5 s), and the names they
# give this package: imported on first use, so that `import pyro_bqn` does not pay for them.
_LAZY_MODULES = ("inference_data", "plots", "posterior_summary")
_LAZY_NAMES = {
    "to_inference_data": "inference_data",
    "entropy_histogram": "plots",
    "reliability_diagram": "plots",
    "save_figure": "plots",
    "PosteriorSummaryRecorder": "posterior_summary",
    "plot_posterior_summary": "posterior_summary",
    "plot_summary_history": "posterior_summary",
    "posterior_summary": "posterior_summary",
}


def __getattr__(name: str) -> object:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """This package's module type. Importing a submodule sets the package attribute of its
    name to the module; for ``posterior_summary``, the function of that name must stay
    (``from pyro_bqn.diagnostics import posterior_summary`` is the function)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY_NAMES:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES, *_LAZY_MODULES})


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
