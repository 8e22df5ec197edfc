"""posterior_summary against hand arithmetic on a guide with set logits; the recorder over
two epochs; the figures."""

import math

import numpy as np
import pyro
import pytest
import torch
from matplotlib.figure import Figure
from pyro.infer import SVI
from pyro.nn import PyroModule

from pyro_bqn import levels
from pyro_bqn.diagnostics.plots import save_figure
from pyro_bqn.diagnostics.posterior_summary import (
    PosteriorSummaryRecorder,
    plot_posterior_summary,
    plot_summary_history,
    posterior_summary,
)
from pyro_bqn.distributions.moment_likelihoods import MomentCategorical
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO
from pyro_bqn.nn.quantized_linear import QuantizedLinear


class TwoLayer(PyroModule):
    """fc1: binary weights of shape (2, 2); fc2: ternary weights of shape (2, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = QuantizedLinear(2, 2, levels=levels.binary(), bias=False)
        self.fc2 = QuantizedLinear(2, 2, levels=levels.ternary(), bias=False)

    def forward(self, x, y=None):
        logits = self.fc2(self.fc1(x))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


# Posterior probabilities set by hand, one row per weight.
FC1_PROBS = [[0.5, 0.5], [0.995, 0.005], [0.2, 0.8], [0.001, 0.999]]  # levels (-1, 1)
FC2_PROBS = [  # levels (-1, 0, 1)
    [0.1, 0.8, 0.1],
    [0.0025, 0.995, 0.0025],
    [0.6, 0.3, 0.1],
    [0.2, 0.2, 0.6],
]


def _entropy(rows) -> float:
    return float(np.mean([-sum(p * math.log(p) for p in row) for row in rows]))


@pytest.fixture
def data():
    pyro.set_rng_seed(0)
    x = torch.randn(16, 2)
    return x, (x[:, 0] > 0).long()


@pytest.fixture
def set_guide(data):
    pyro.clear_param_store()
    model = TwoLayer()
    guide = AutoQuantizedGuide(model)
    guide(*data)  # builds the parameters
    # The guide stores logits level-major: (K,) + weight shape.
    guide.logits.fc1.weight = torch.tensor(FC1_PROBS).log().reshape(2, 2, 2).movedim(-1, 0)
    guide.logits.fc2.weight = torch.tensor(FC2_PROBS).log().reshape(2, 2, 3).movedim(-1, 0)
    return model, guide


def test_summary_matches_hand_computation(set_guide):
    _, guide = set_guide
    summary = posterior_summary(guide, threshold=0.99)

    assert summary["occupancy"].dims == ("site", "level")
    assert list(summary["site"].values) == ["fc1.weight", "fc2.weight"]
    np.testing.assert_array_equal(summary["level"].values, [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(summary["num_weights"].values, [4, 4])
    np.testing.assert_allclose(summary["max_entropy"].values, [math.log(2), math.log(3)])
    assert summary.attrs["threshold"] == 0.99

    np.testing.assert_allclose(
        summary["entropy"].values, [_entropy(FC1_PROBS), _entropy(FC2_PROBS)], rtol=1e-5
    )
    fc1_mean = np.mean(FC1_PROBS, axis=0)
    fc2_mean = np.mean(FC2_PROBS, axis=0)
    np.testing.assert_allclose(
        summary["occupancy"].values,
        [[fc1_mean[0], np.nan, fc1_mean[1]], fc2_mean],
        rtol=1e-5,
    )
    # Binary weights cannot be zero: not applicable. Ternary: rows 0 and 1 have mode 0.
    assert math.isnan(summary["sparsity"].sel(site="fc1.weight"))
    assert summary["sparsity"].sel(site="fc2.weight") == pytest.approx(2 / 4)
    # Max prob > 0.99: fc1 rows 1 (0.995) and 3 (0.999); fc2 row 1 (0.995).
    np.testing.assert_allclose(summary["certain_share"].values, [2 / 4, 1 / 4])
    # A stricter threshold keeps only fc1's 0.999.
    strict = posterior_summary(guide, threshold=0.998)
    np.testing.assert_allclose(strict["certain_share"].values, [1 / 4, 0.0])


def test_summary_of_selected_sites_and_errors(set_guide, data):
    _, guide = set_guide
    only = posterior_summary(guide, sites=["fc2.weight"])
    assert list(only["site"].values) == ["fc2.weight"]
    np.testing.assert_array_equal(only["level"].values, [-1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="not quantized sites"):
        posterior_summary(guide, sites=["fc1.bias"])
    with pytest.raises(ValueError, match="threshold"):
        posterior_summary(guide, threshold=1.0)
    with pytest.raises(ValueError, match="run it once"):
        posterior_summary(AutoQuantizedGuide(TwoLayer()))


def test_recorder_over_two_epochs(set_guide, data, tmp_path):
    model, guide = set_guide
    recorder = PosteriorSummaryRecorder(guide)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), DeterministicELBO())
    first = recorder(epoch=1)
    for _ in range(5):
        svi.step(*data)
    recorder(epoch=2)
    assert len(recorder) == 2
    with pytest.raises(ValueError, match="already been recorded"):
        recorder(epoch=2)

    history = recorder.to_dataset()
    assert history["occupancy"].dims == ("epoch", "site", "level")
    assert history["entropy"].dims == ("epoch", "site")
    np.testing.assert_array_equal(history["epoch"].values, [1, 2])
    assert history["num_weights"].dims == ("site",)
    assert history.sel(epoch=1).drop_vars("epoch").identical(first)
    # Training moved the posterior.
    assert not np.allclose(history["entropy"].sel(epoch=1), history["entropy"].sel(epoch=2))

    figure = recorder.plot()
    assert isinstance(figure, Figure) and len(figure.axes) == 3
    path = save_figure(figure, tmp_path / "history.png")
    assert path.stat().st_size > 0


def test_recorder_default_epochs_and_empty_history(set_guide):
    _, guide = set_guide
    recorder = PosteriorSummaryRecorder(guide, sites=["fc1.weight"])
    with pytest.raises(ValueError, match="nothing recorded"):
        recorder.to_dataset()
    recorder()
    recorder()
    history = recorder.to_dataset()
    np.testing.assert_array_equal(history["epoch"].values, [0, 1])
    # fc1 is binary: the sparsity panel has nothing to draw and says so.
    figure = plot_summary_history(history)
    assert not figure.axes[2].has_data()


def test_summary_figure(set_guide, tmp_path):
    _, guide = set_guide
    figure = plot_posterior_summary(posterior_summary(guide))
    assert isinstance(figure, Figure)
    occupancy_ax = figure.axes[0]
    # One stacked bar per site and level in the union (a binary site's 0 is height 0).
    assert len(occupancy_ax.patches) == 2 * 3
    heights = [patch.get_height() for patch in occupancy_ax.patches]
    assert sum(heights) == pytest.approx(2.0, rel=1e-5)
    path = save_figure(figure, tmp_path / "summary.png")
    assert path.stat().st_size > 0


def test_recorder_is_a_fit_callback(set_guide, data):
    from pyro_bqn.diagnostics import PosteriorSummaryRecorder
    from pyro_bqn.infer import fit

    model, guide = set_guide

    def model_with_num_data(x, y=None, num_data=None):
        return model(x, y)

    recorder = PosteriorSummaryRecorder(guide)
    fit(
        model_with_num_data, guide, *data, epochs=2, batch_size=4, progress=False, callback=recorder
    )
    assert list(recorder.to_dataset()["epoch"].values) == [1, 2]


def test_recorder_state_round_trips_through_a_weights_only_file(set_guide, data, tmp_path):
    _, guide = set_guide
    recorder = PosteriorSummaryRecorder(guide)
    recorder(1)
    recorder(2)
    torch.save(recorder.state_dict(), tmp_path / "state.pt")
    restored = PosteriorSummaryRecorder(guide)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.to_dataset().identical(recorder.to_dataset())


def test_many_levels_draw_one_line_per_site_not_one_bar_per_level(data):
    # 8-bit weights: 256 levels. A bar and a legend entry per level took minutes at 16 bits.
    pyro.clear_param_store()

    class Wide(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = QuantizedLinear(2, 2, levels=levels.uniform(8), bias=False)

        def forward(self, x, y=None):
            logits = self.fc(x)
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)

    guide = AutoQuantizedGuide(Wide())
    guide(*data)
    summary = posterior_summary(guide)
    assert summary["level"].size == 256
    occupancy_ax = plot_posterior_summary(summary).axes[0]
    assert len(occupancy_ax.patches) == 0
    [line] = occupancy_ax.lines
    np.testing.assert_allclose(line.get_ydata(), summary["occupancy"].values[0])
