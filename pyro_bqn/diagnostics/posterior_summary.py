"""Sampling-free summaries of a quantized posterior, per quantized site (layer).

Everything is computed from the guide's exact probabilities ``q`` of each weight's
components (shape ``(*weight_shape, K)`` per site: its levels; a spike-and-slab posterior
has a slab as a ``K + 1``-th component), never from draws:

* ``entropy`` — mean over weights of ``H(q) = -sum_k q_k log q_k``, in nats; ``0`` when
  every weight is certain, ``max_entropy = log K`` when every weight is uniform.
* ``occupancy`` — expected share of weights on each level, ``mean over weights of q_k``;
  sums to one over a site's levels (to one less the slab's share for a spike-and-slab
  posterior).
* ``sparsity`` — share of weights whose posterior mode is ``0``. A level set without
  ``0`` (binary, ``uniform(bits)``) cannot be sparse: its sparsity is ``NaN`` ("not
  applicable"), not ``0``, so that averaging layers with ``nanmean`` skips it.
* ``certain_share`` — share of weights whose largest probability exceeds ``threshold``.

Sites may have different level sets, so the ``level`` coordinate is the sorted union of
all their level values and ``occupancy`` is ``NaN`` at the levels a site does not have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pyro_bqn.distributions.multiple_spike_and_slab import MultipleSpikeAndSlab
from pyro_bqn.infer.auto_quantized_guide import AutoQuantizedGuide

__all__ = [
    "PosteriorSummaryRecorder",
    "plot_posterior_summary",
    "plot_summary_history",
    "posterior_summary",
]

# Upper limit of axes showing shares in [0, 1]: headroom for the legend above 1.
_SHARE_TOP = 1.3
#: Above this many levels, occupancy is drawn as a line over the level values, not as
#: stacked bars with one legend entry per level.
MAX_STACKED_LEVELS = 32


def _quantized_sites(guide: AutoQuantizedGuide, sites: Sequence[str] | None) -> list[str]:
    if guide.prototype_trace is None:
        raise ValueError(
            "the guide has no parameters yet: run it once (e.g. one SVI step) before summarising"
        )
    available = guide.quantized_sites
    if sites is None:
        return available
    unknown = [name for name in sites if name not in available]
    if unknown:
        raise ValueError(f"sites {unknown} are not quantized sites of the guide: {available}")
    return list(sites)


def _component_probs(posterior) -> torch.Tensor:
    """Each weight's probabilities of its mixture components, ``(num_weights, K)`` for a
    categorical over the levels, ``(num_weights, K + 1)`` for a spike-and-slab posterior
    (the slab last), in float64."""
    if isinstance(posterior, MultipleSpikeAndSlab):
        weights = posterior.log_weights.exp()
        return weights.reshape(-1, posterior.num_levels + 1).double()
    return posterior.probs.reshape(-1, posterior.num_levels).double()


@torch.no_grad()
def posterior_summary(
    guide: AutoQuantizedGuide, threshold: float = 0.99, sites: Sequence[str] | None = None
) -> xr.Dataset:
    """Entropy, level occupancy, sparsity and share of nearly certain weights per site.

    See the module docstring for the definitions.

    :param guide: an :class:`~pyro_bqn.infer.AutoQuantizedGuide` that has been run once.
    :param threshold: a weight is nearly certain when its largest level probability is
        greater than this, in ``(0, 1)``.
    :param sites: quantized sites to summarise, default all, in model order.
    :returns: an :class:`xarray.Dataset` with dims ``site`` (``S`` sites) and ``level``
        (``L`` = the union of the sites' levels): ``entropy``, ``sparsity`` and
        ``certain_share`` of shape ``(S,)``, ``occupancy`` of shape ``(S, L)``; coordinates
        ``num_weights`` and ``max_entropy`` (``log K``) along ``site``; ``attrs["threshold"]``.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    names = _quantized_sites(guide, sites)
    posteriors = [guide.exact_posterior(name) for name in names]
    levels = [p.levels.detach().cpu().double().numpy() for p in posteriors]
    all_levels = np.unique(np.concatenate(levels)) if levels else np.empty(0)

    occupancy = np.full((len(names), all_levels.size), np.nan)
    entropy, sparsity, certain, num_weights = [], [], [], []
    for row, (posterior, site_levels) in enumerate(zip(posteriors, levels, strict=True)):
        components = _component_probs(posterior)
        probs = components[:, : posterior.num_levels]
        occupancy[row, np.searchsorted(all_levels, site_levels)] = probs.mean(0).cpu().numpy()
        entropy.append(torch.special.entr(components).sum(-1).mean().item())
        certain.append((components.max(-1).values > threshold).double().mean().item())
        has_zero = bool((site_levels == 0).any())
        sparsity.append((posterior.mode == 0).double().mean().item() if has_zero else math.nan)
        num_weights.append(probs.shape[0])

    site_coords = {
        "site": names,
        "num_weights": ("site", np.asarray(num_weights, dtype=np.int64)),
        "max_entropy": ("site", np.log([lv.size for lv in levels], dtype=np.float64)),
    }
    return xr.Dataset(
        {
            "entropy": ("site", np.asarray(entropy, dtype=np.float64), {"units": "nats"}),
            "occupancy": (("site", "level"), occupancy),
            "sparsity": ("site", np.asarray(sparsity, dtype=np.float64)),
            "certain_share": ("site", np.asarray(certain, dtype=np.float64)),
        },
        coords={**site_coords, "level": all_levels},
        attrs={"threshold": threshold},
    )


def _level_colors(levels: np.ndarray) -> list[tuple[float, float, float, float]]:
    """A diverging colour per level value: negative blue, zero grey, positive red."""
    from matplotlib import colormaps

    scale = max(float(np.abs(levels).max()), 1e-12) if levels.size else 1.0
    cmap = colormaps["coolwarm"]
    return [cmap(0.5 + 0.5 * value / scale) for value in levels]


def plot_posterior_summary(summary: xr.Dataset) -> Figure:
    """Three panels per quantized site: stacked level occupancy, mean entropy against its
    maximum ``log K``, and the shares of nearly certain and of zero weights.

    :param summary: the output of :func:`posterior_summary`.
    :returns: a new :class:`~matplotlib.figure.Figure` (not registered with pyplot).
    """
    names = [str(name) for name in summary["site"].values]
    x = np.arange(len(names))
    fig = Figure(figsize=(4.0 + 1.6 * len(names), 4.0), layout="constrained")
    occupancy_ax, entropy_ax, share_ax = fig.subplots(1, 3)

    _plot_occupancy(occupancy_ax, summary, x, names)

    entropy_ax.bar(x, summary["entropy"].values, color="tab:purple", label="mean entropy")
    entropy_ax.scatter(
        x, summary["max_entropy"].values, marker="_", s=400, color="black", label="log K (max)"
    )
    # Headroom above the largest log K for the legend.
    entropy_ax.set_ylim(0, 1.35 * float(summary["max_entropy"].max()))
    entropy_ax.set_ylabel("nats per weight")
    entropy_ax.set_title("posterior entropy")
    entropy_ax.legend(fontsize="small")

    width = 0.4
    threshold = summary.attrs.get("threshold")
    share_ax.bar(
        x - width / 2,
        summary["certain_share"].values,
        width,
        color="tab:green",
        label=f"max prob > {threshold:g}" if threshold is not None else "nearly certain",
    )
    sparsity = summary["sparsity"].values
    share_ax.bar(x + width / 2, np.nan_to_num(sparsity), width, color="0.6", label="mode = 0")
    for position in x[np.isnan(sparsity)]:
        share_ax.text(position + width / 2, 0.01, "n/a", ha="center", va="bottom", fontsize=7)
    share_ax.set_ylim(0, _SHARE_TOP)
    share_ax.set_yticks(np.linspace(0, 1, 6))
    share_ax.set_ylabel("share of weights")
    share_ax.set_title("certainty and sparsity")
    share_ax.legend(fontsize="small")

    for ax in (entropy_ax, share_ax):
        ax.set_xticks(x, names, rotation=30, ha="right")
    return fig


def _plot_occupancy(ax: Axes, summary: xr.Dataset, x: np.ndarray, names: list[str]) -> None:
    """Level occupancy per site: a stacked bar per site for up to
    :data:`MAX_STACKED_LEVELS` levels; beyond that (one bar and one legend entry per level
    would take minutes to draw for 16-bit weights) a line per site over the level values."""
    levels = summary["level"].values
    ax.set_ylabel("expected share of weights")
    ax.set_title("level occupancy")
    if levels.size > MAX_STACKED_LEVELS:
        for index, name in enumerate(names):
            occupancy = summary["occupancy"].isel(site=index).values
            present = ~np.isnan(occupancy)
            ax.plot(levels[present], occupancy[present], color=f"C{index}", label=name)
        ax.set_xlabel("level value")
        ax.set_ylim(bottom=0)
        ax.legend(title="site", fontsize="small")
        return
    bottom = np.zeros(len(names))
    for level, color in zip(levels, _level_colors(levels), strict=True):
        # NaN (level absent from a site's set) stacks as zero height.
        height = np.nan_to_num(summary["occupancy"].sel(level=level).values)
        ax.bar(
            x,
            height,
            bottom=bottom,
            color=color,
            edgecolor="black",
            linewidth=0.5,
            label=f"{level:g}",
        )
        bottom += height
    ax.set_ylim(0, 1)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.legend(title="level", fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))


def plot_summary_history(history: xr.Dataset) -> Figure:
    """Mean entropy, share of nearly certain weights and sparsity per site against epoch.

    :param history: summaries concatenated along ``epoch``, e.g. from
        :meth:`PosteriorSummaryRecorder.to_dataset`.
    :returns: a new :class:`~matplotlib.figure.Figure` with three panels.
    """
    fig = Figure(figsize=(12.0, 3.8), layout="constrained")
    panels = (
        ("entropy", "mean entropy (nats)"),
        ("certain_share", "share nearly certain"),
        ("sparsity", "share with mode 0"),
    )
    epochs = history["epoch"].values
    for ax, (variable, label) in zip(fig.subplots(1, 3), panels, strict=True):
        for index, name in enumerate(history["site"].values):
            values = history[variable].sel(site=name).values
            if not np.isnan(values).all():
                # Colour by site index, so a site keeps its colour when another is skipped.
                ax.plot(epochs, values, marker="o", markersize=3, color=f"C{index}", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if variable != "entropy":
            ax.set_ylim(0, _SHARE_TOP)
            ax.set_yticks(np.linspace(0, 1, 6))
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no level set contains 0", ha="center", transform=ax.transAxes)
    return fig


class PosteriorSummaryRecorder:
    """Records :func:`posterior_summary` of a guide during training.

    Call it once per epoch (or any other step)::

        recorder = PosteriorSummaryRecorder(guide)
        for epoch in range(num_epochs):
            ...  # SVI steps
            recorder(epoch)
        history = recorder.to_dataset()   # dims (epoch, site, level)
        fig = recorder.plot()

    :param guide: the :class:`~pyro_bqn.infer.AutoQuantizedGuide` being trained.
    :param threshold: as for :func:`posterior_summary`.
    :param sites: as for :func:`posterior_summary`.
    """

    def __init__(
        self,
        guide: AutoQuantizedGuide,
        threshold: float = 0.99,
        sites: Sequence[str] | None = None,
    ) -> None:
        self.guide = guide
        self.threshold = threshold
        self.sites = None if sites is None else list(sites)
        self._records: list[xr.Dataset] = []

    def __call__(self, epoch: int | None = None, metrics: dict | None = None) -> xr.Dataset:
        """Summarise the guide now and keep the result under ``epoch``.

        The signature matches :func:`pyro_bqn.fit`'s ``callback(epoch, metrics)``, so a
        recorder can be passed as ``fit(..., callback=recorder)``.

        :param epoch: label of this record; default the number of records so far.
        :param metrics: the training loop's metrics for the epoch; not used.
        :returns: the summary just recorded (dims ``(site, level)``).
        """
        if epoch is None:
            epoch = len(self._records)
        if any(record["epoch"].item() == epoch for record in self._records):
            raise ValueError(f"epoch {epoch} has already been recorded")
        summary = posterior_summary(self.guide, self.threshold, self.sites)
        self._records.append(summary.assign_coords(epoch=epoch))
        return summary

    def __len__(self) -> int:
        return len(self._records)

    def state_dict(self) -> dict:
        """The records as plain lists and dictionaries (what :func:`torch.load` with
        ``weights_only=True`` reads back), so :func:`pyro_bqn.fit` can checkpoint them."""
        return {"records": [record.to_dict(data="list") for record in self._records]}

    def load_state_dict(self, state: dict) -> None:
        """Replace the records with those of :meth:`state_dict`."""
        self._records = [xr.Dataset.from_dict(record) for record in state["records"]]

    def to_dataset(self) -> xr.Dataset:
        """All records concatenated along a new leading ``epoch`` dim.

        :returns: a dataset with dims ``(epoch, site, level)``; ``level`` is the union over
            records (it only grows when levels are learned), ``NaN`` where a record lacks it.
        """
        if not self._records:
            raise ValueError("nothing recorded yet: call the recorder at least once")
        # Explicit options: xarray is changing concat's defaults; the per-site coordinates
        # are the same in every record.
        return xr.concat(
            self._records,
            dim="epoch",
            data_vars="all",
            coords="minimal",
            compat="override",
            join="outer",
        )

    def plot(self) -> Figure:
        """:func:`plot_summary_history` of :meth:`to_dataset`."""
        return plot_summary_history(self.to_dataset())
