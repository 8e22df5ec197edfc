"""Figures of calibration and uncertainty, returned as :class:`matplotlib.figure.Figure`.

New figures are built with :class:`~matplotlib.figure.Figure` directly, not through
``pyplot``: nothing is shown, no GUI backend is needed, and pyplot's global list of open
figures does not grow in a long-running loop. Pass ``ax=`` to draw into an existing
figure instead; :func:`save_figure` writes either kind to a PNG file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pyro_bqn.atomic_files import write_with
from pyro_bqn.diagnostics._validation import TensorLike, as_scores, check_num_bins
from pyro_bqn.diagnostics.calibration import _bin_sums, _bins_from_sums, _ece

__all__ = ["entropy_histogram", "reliability_diagram", "save_figure"]


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    return Figure(figsize=figsize, layout="constrained").add_subplot()


def reliability_diagram(
    probs: TensorLike, y: TensorLike, num_bins: int = 15, ax: Axes | None = None
) -> Figure:
    """Reliability diagram of the top-1 prediction.

    Bars show each bin's accuracy, hatched bars the gap up (over-confidence) or down
    (under-confidence) to the bin's mean confidence, the dashed diagonal perfect
    calibration, and dots on the right-hand axis the number of samples per bin. The title
    gives the ECE. Bins are those of
    :func:`~pyro_bqn.diagnostics.calibration.calibration_bins`; empty bins are left blank.

    :param probs: predictive probabilities, shape ``(N, C)``, rows summing to one.
    :param y: integer labels, shape ``(N,)``, values in ``[0, C)``.
    :param num_bins: number of equal-width confidence bins, ``>= 1``.
    :param ax: axes to draw into; a new 5×4.5 inch figure when ``None``.
    :returns: the figure holding the diagram (``ax.figure`` when ``ax`` is given).
    """
    sums = _bin_sums(probs, y, num_bins)
    bins = _bins_from_sums(sums)
    ece = _ece(sums).item()
    edges = bins.edges.cpu().numpy()
    counts = bins.counts.cpu().numpy()
    accuracy = bins.accuracy.cpu().numpy()
    confidence = bins.confidence.cpu().numpy()
    centres = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / num_bins
    filled = counts > 0

    ax = _axes(ax, (5.0, 4.5))
    ax.bar(
        centres[filled],
        accuracy[filled],
        width=width,
        color="tab:blue",
        edgecolor="black",
        linewidth=0.6,
        label="accuracy",
    )
    ax.bar(
        centres[filled],
        confidence[filled] - accuracy[filled],
        bottom=accuracy[filled],
        width=width,
        # Unfilled: an under-confident gap lies inside the accuracy bar and must not hide it.
        facecolor="none",
        edgecolor="tab:red",
        hatch="//",
        linewidth=0.6,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.3", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE = {ece:.4f}  ({num_bins} bins, N = {int(counts.sum())})")

    # Counts live on their own axis: they span orders of magnitude more than [0, 1].
    count_ax = ax.twinx()
    count_ax.plot(
        centres[filled],
        counts[filled],
        linestyle="none",
        marker="o",
        markersize=4,
        color="0.35",
        label="samples per bin",
    )
    count_ax.set_ylim(0, max(1, int(counts.max())) * 1.05)
    count_ax.set_ylabel("samples per bin")

    handles, labels = ax.get_legend_handles_labels()
    count_handles, count_labels = count_ax.get_legend_handles_labels()
    count_ax.legend(handles + count_handles, labels + count_labels, loc="best", fontsize="small")
    return ax.figure


def entropy_histogram(
    entropies_by_name: Mapping[str, TensorLike],
    num_bins: int = 30,
    ax: Axes | None = None,
    num_classes: int | None = None,
) -> Figure:
    """Overlaid histograms of per-sample entropies (or any non-negative uncertainty score),
    one per named set, e.g. ``{"in-distribution": h_test, "shifted": h_shifted}``.

    Histograms are normalised to unit area so sets of different sizes compare, and share
    one set of bin edges over ``[0, max]``.

    :param entropies_by_name: set name → entropies in nats, each of shape ``(N_k,)``.
    :param num_bins: number of histogram bins, ``>= 1``.
    :param ax: axes to draw into; a new 5.5×3.5 inch figure when ``None``.
    :param num_classes: when given, the x-range is fixed to ``[0, log C]`` (the entropy of
        the uniform distribution, marked by a dotted line) so figures compare.
    :returns: the figure holding the histogram (``ax.figure`` when ``ax`` is given).
    """
    num_bins = check_num_bins(num_bins)
    if not entropies_by_name:
        raise ValueError("entropies_by_name must name at least one set of entropies")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
    ):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    values = {
        name: as_scores(entropies, f"entropies_by_name[{name!r}]")
        for name, entropies in entropies_by_name.items()
    }
    for name, entropies in values.items():
        if (entropies < 0).any():
            raise ValueError(
                f"entropies_by_name[{name!r}] must be non-negative, got minimum "
                f"{entropies.min():.4g}"
            )
    if num_classes is not None:
        upper = math.log(num_classes)
    else:
        # All-zero entropies (every prediction one-hot) still need a non-empty range.
        upper = max(float(v.max()) for v in values.values()) or 1.0
    edges = np.linspace(0.0, upper, num_bins + 1)

    ax = _axes(ax, (5.5, 3.5))
    for name, entropies in values.items():
        ax.hist(
            # Clip so rounding just past log C is counted in the last bin, not dropped.
            np.clip(entropies, 0.0, upper),
            bins=edges,
            density=True,
            histtype="step",
            linewidth=1.5,
            label=f"{name} (N = {entropies.shape[0]}, mean {entropies.mean():.3f})",
        )
    if num_classes is not None:
        ax.axvline(upper, linestyle=":", color="0.3", label=f"log {num_classes} (uniform)")
    # A little room on the right so the log C line is not hidden under the frame.
    ax.set_xlim(0, 1.02 * upper)
    ax.set_xlabel("predictive entropy (nats)")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    return ax.figure


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically (:mod:`pyro_bqn.atomic_files`: an
    interrupted save leaves the previous file intact), creating missing parent directories.

    The file is PNG whatever ``path``'s suffix; the figure is left open for further use.

    :param fig: the figure, e.g. from :func:`reliability_diagram`.
    :param path: destination file.
    :param dpi: resolution in dots per inch.
    :returns: the path written, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda handle: fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight"))
    return path
