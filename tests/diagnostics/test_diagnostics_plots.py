"""The plots return Figures, draw into given axes, and save as PNG files."""

import pytest
import torch
from matplotlib.figure import Figure

from pyro_bqn.diagnostics import (
    entropy_histogram,
    predictive_entropy,
    reliability_diagram,
    save_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _predictions(n=500, num_classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    probs = (2 * torch.randn(n, num_classes, generator=generator)).softmax(-1)
    y = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return probs, y


def test_reliability_diagram_returns_a_figure_and_saves_png(tmp_path):
    probs, y = _predictions()
    fig = reliability_diagram(probs, y, num_bins=10)
    assert isinstance(fig, Figure)
    assert "ECE" in fig.axes[0].get_title()
    path = save_figure(fig, tmp_path / "nested" / "reliability.png")
    assert path == tmp_path / "nested" / "reliability.png"
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_reliability_diagram_draws_into_given_axes(tmp_path):
    probs, y = _predictions()
    fig = Figure()
    left, right = fig.subplots(1, 2)
    assert reliability_diagram(probs, y, ax=right) is fig
    assert right.get_title().startswith("ECE")
    assert not left.has_data()
    assert save_figure(fig, tmp_path / "grid.png").read_bytes().startswith(PNG_MAGIC)


def test_reliability_diagram_with_empty_bins(tmp_path):
    # All confidences are 1: fourteen of fifteen bins are empty and must be left blank.
    probs = torch.eye(3).repeat(2, 1)
    fig = reliability_diagram(probs, torch.tensor([0, 1, 2, 0, 1, 1]))
    bars, counts = fig.axes
    # One accuracy bar and one gap bar, both in the last bin (centre 1 - 1/30), nothing else.
    assert len(bars.patches) == 2
    for patch in bars.patches:
        assert patch.get_x() + patch.get_width() / 2 == pytest.approx(29 / 30)
    accuracy, gap = bars.patches
    assert accuracy.get_height() == pytest.approx(5 / 6)  # only the last row is mislabelled
    assert gap.get_height() == pytest.approx(1 / 6)
    (dots,) = counts.lines
    assert list(dots.get_xdata()) == [pytest.approx(29 / 30)] and list(dots.get_ydata()) == [6]
    assert save_figure(fig, tmp_path / "one_bin.png").read_bytes().startswith(PNG_MAGIC)


def test_entropy_histogram_returns_a_figure_and_saves_png(tmp_path):
    probs, _ = _predictions(seed=1)
    shifted, _ = _predictions(n=300, seed=2)
    shifted = (shifted + 1).softmax(-1)  # flatter, so higher entropy
    entropies = {
        "in-distribution": predictive_entropy(probs),
        "shifted": predictive_entropy(shifted).numpy(),
    }
    fig = entropy_histogram(entropies, num_classes=5)
    assert isinstance(fig, Figure)
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert any(label.startswith("in-distribution") for label in legend)
    assert any(label.startswith("shifted") for label in legend)
    assert save_figure(fig, tmp_path / "entropy.png").read_bytes().startswith(PNG_MAGIC)


def test_entropy_histogram_of_all_zero_entropies(tmp_path):
    # All mass sits in the first of the bins over the fallback range [0, 1]; the others are
    # empty, so the step outline is at zero there.
    fig = entropy_histogram({"one-hot": torch.zeros(4)}, num_bins=4)
    (ax,) = fig.axes
    assert ax.get_xlim() == (0.0, 1.02)
    (outline,) = ax.patches
    heights = outline.get_xy()[:, 1]
    assert heights.max() == pytest.approx(4.0)  # unit area in a bin of width 1/4
    xy = outline.get_xy()
    assert (xy[xy[:, 0] > 0.25 + 1e-9][:, 1] == 0).all()
    assert save_figure(fig, tmp_path / "zeros.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"entropies_by_name": {}}, "entropies_by_name"),
        ({"entropies_by_name": {"a": torch.tensor([-0.1, 0.2])}}, "entropies_by_name"),
        ({"entropies_by_name": {"a": torch.ones(3)}, "num_bins": 0}, "num_bins"),
        ({"entropies_by_name": {"a": torch.ones(3)}, "num_classes": 1}, "num_classes"),
    ],
)
def test_entropy_histogram_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        entropy_histogram(**kwargs)
