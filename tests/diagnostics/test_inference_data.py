"""to_inference_data: groups, shapes, dims and coordinates; ArviZ's diagnostics and
information criteria run on the result; chunk-invariant seeding; the size limit; and a
PSIS-LOO comparison of binary, ternary and 2-bit networks on breast-cancer data."""

import math

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI
from pyro.nn import PyroModule, PyroSample

from pyro_bqn import levels
from pyro_bqn.data import load_breast_cancer
from pyro_bqn.diagnostics.inference_data import METHOD, _site_dims, to_inference_data
from pyro_bqn.distributions.moment_likelihoods import MomentCategorical
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO
from pyro_bqn.nn.quantized_conv import QuantizedConv2d
from pyro_bqn.nn.quantized_layer import add_bias
from pyro_bqn.nn.quantized_linear import QuantizedLinear

pytestmark = [
    # Variational draws on few data give large Pareto k: ArviZ says so, the tests know.
    pytest.mark.filterwarnings("ignore:Estimated shape parameter of Pareto:UserWarning"),
    pytest.mark.filterwarnings("ignore:For one or more samples the posterior variance"),
    # r_hat and mcse of weights that are constant across draws divide by zero.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:arviz.*"),
    # ArviZ 0.23 calls a pandas method deprecated in pandas 3.1.
    pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.sort_values"),
]

N, D, C = 40, 5, 3


class Classifier(PyroModule):
    """One quantized layer plus a latent per-class ``offset`` that belongs to no layer."""

    def __init__(self, level_set=None) -> None:
        super().__init__()
        self.fc = QuantizedLinear(D, C, levels=level_set or levels.ternary())
        self.offset = PyroSample(dist.Normal(torch.zeros(C), 1.0).to_event(1))

    def forward(self, x, y=None):
        logits = add_bias(self.fc(x), self.offset, (C,))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


def _fit(model, x, y, steps: int) -> AutoQuantizedGuide:
    guide = AutoQuantizedGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), DeterministicELBO())
    for _ in range(steps):
        svi.step(x, y)
    return guide


@pytest.fixture(scope="module")
def fitted():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = torch.randn(N, D)
    y = (x[:, :C] + 0.5 * torch.randn(N, C)).argmax(-1)
    model = Classifier()
    guide = _fit(model, x, y, steps=30)
    return model, guide, x, y


def _idata(fitted, **kwargs):
    model, guide, x, y = fitted
    kwargs = {"num_samples": 30, "seed": 1, "progress": False, **kwargs}
    return to_inference_data(model, guide, x, y, **kwargs)


def test_groups_shapes_dims_and_coords(fitted):
    _, guide, _, y = fitted
    idata = _idata(fitted, num_samples=20, num_chains=2)
    assert {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "observed_data",
        "constant_data",
    } <= set(idata.groups())

    weight = idata.posterior["fc.weight"]
    assert weight.dims == ("chain", "draw", "fc.out_features", "fc.in_features")
    assert weight.shape == (2, 20, C, D)
    assert set(np.unique(weight.values)) <= {-1.0, 0.0, 1.0}
    assert idata.posterior["fc.bias"].dims == ("chain", "draw", "fc.out_features")
    assert idata.posterior["offset"].dims == ("chain", "draw", "offset_dim_0")

    probs = idata.constant_data["fc.weight.probs"]
    assert probs.dims == ("fc.out_features", "fc.in_features", "fc.weight.level")
    np.testing.assert_array_equal(probs["fc.weight.level"].values, [-1.0, 0.0, 1.0])
    expected = guide.exact_posterior("fc.weight").probs.detach().numpy()
    np.testing.assert_allclose(probs.values, expected)

    log_lik = idata.log_likelihood["obs"]
    assert log_lik.dims == ("chain", "draw", "data") and log_lik.shape == (2, 20, N)
    assert log_lik.dtype == np.float64 and np.all(log_lik.values <= 0)
    predictive = idata.posterior_predictive["obs"]
    assert predictive.dims == ("chain", "draw", "data") and predictive.shape == (2, 20, N)
    assert set(np.unique(predictive.values)) <= set(range(C))
    np.testing.assert_array_equal(idata.observed_data["obs"].values, y.numpy())

    attrs = idata.posterior.attrs
    assert attrs["inference_library"] == "pyro_bqn"
    assert attrs["method"] == METHOD and "variational" in METHOD
    assert attrs["seed"] == 1 and attrs["omitted_sites"] == ""


def test_log_likelihood_matches_the_network_drawn(fitted):
    """Each draw's log-likelihood is that of the network stored for the same draw."""
    _, _, x, y = fitted
    idata = _idata(fitted, num_samples=3)
    for draw in range(3):
        network = {
            name: torch.as_tensor(idata.posterior[name].values[0, draw])
            for name in ("fc.weight", "fc.bias", "offset")
        }
        logits = x @ network["fc.weight"].T + network["fc.bias"] + network["offset"]
        expected = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)
        np.testing.assert_allclose(
            idata.log_likelihood["obs"].values[0, draw], expected.numpy(), atol=1e-5
        )


def test_model_mode_and_global_rng_are_restored(fitted):
    model, _, _, _ = fitted
    model.train()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _idata(fitted, num_samples=4)
    assert model.training
    assert torch.equal(torch.rand(3), expected)


def test_arviz_diagnostics_and_information_criteria_run(fitted):
    idata = _idata(fitted, num_samples=40, num_chains=2)
    summary = az.summary(idata, var_names=["fc.bias", "offset"])
    assert len(summary) == 2 * C and np.isfinite(summary["mean"]).all()
    ess = az.ess(idata, var_names=["fc.bias"])
    assert np.isfinite(ess["fc.bias"].values).all()

    loo = az.loo(idata, pointwise=True)
    assert math.isfinite(loo.elpd_loo) and math.isfinite(loo.se)
    assert loo.pareto_k.shape == (N,)
    waic = az.waic(idata)
    assert math.isfinite(waic.elpd_waic)

    other = _idata(fitted, num_samples=40, num_chains=2, seed=2)
    table = az.compare({"seed 1": idata, "seed 2": other}, ic="loo")
    assert list(table.columns[:2]) == ["rank", "elpd_loo"]
    assert np.isfinite(table["elpd_loo"].astype(float)).all()


def test_chunking_does_not_change_the_draws(fitted):
    one = _idata(fitted, num_samples=12, chunk_size=12)
    for chunk_size in (1, 5):
        other = _idata(fitted, num_samples=12, chunk_size=chunk_size)
        for group in ("posterior", "log_likelihood", "posterior_predictive"):
            assert getattr(one, group).equals(getattr(other, group)), (group, chunk_size)
    different = _idata(fitted, num_samples=12, seed=2)
    assert not np.array_equal(one.posterior["fc.weight"], different.posterior["fc.weight"])


def test_progress_bar_on_request(fitted, capsys):
    _idata(fitted, num_samples=4, chunk_size=2, progress=True)
    assert "drawing networks" in capsys.readouterr().err
    _idata(fitted, num_samples=4, progress=False)
    assert capsys.readouterr().err == ""


def test_seed_none_follows_the_global_seed(fitted):
    pyro.set_rng_seed(7)
    first = _idata(fitted, num_samples=5, seed=None)
    pyro.set_rng_seed(7)
    second = _idata(fitted, num_samples=5, seed=None)
    assert first.posterior.equals(second.posterior)
    assert first.posterior.attrs["seed"] == second.posterior.attrs["seed"]


def test_requested_sites_over_the_limit_raise_with_the_size(fitted):
    # fc.weight: 100 draws x 15 weights x 4 bytes + 15 x 3 probabilities x 4 bytes = 6180 B.
    with pytest.raises(ValueError, match=r"would take 0\.00618 MB") as info:
        _idata(fitted, num_samples=100, sites=["fc.weight"], max_bytes=6000)
    message = str(info.value)
    assert "fc.weight" in message and "sites=" in message and "max_bytes" in message
    idata = _idata(fitted, num_samples=100, sites=["fc.weight"], max_bytes=6180)
    assert list(idata.posterior.data_vars) == ["fc.weight"]
    assert idata.posterior.attrs["omitted_sites"] == "fc.bias, offset"


def test_default_sites_leave_out_what_does_not_fit_with_a_warning(fitted):
    # fc.bias and offset take 10 x 3 x 4 = 120 B each; fc.weight 10 x 15 x 4 + 180 = 780 B.
    with pytest.warns(UserWarning, match=r"left sites \['fc.weight'\] out"):
        idata = _idata(fitted, num_samples=10, max_bytes=500)
    assert list(idata.posterior.data_vars) == ["fc.bias", "offset"]
    assert idata.posterior.attrs["omitted_sites"] == "fc.weight"
    assert "constant_data" not in idata.groups()
    assert math.isfinite(az.loo(idata).elpd_loo)


def test_a_relaxed_guide_still_gives_exact_levels(fitted):
    _, guide, _, _ = fitted
    guide.temperature = 0.5
    try:
        idata = _idata(fitted, num_samples=5, sites=["fc.weight"])
    finally:
        guide.temperature = None
    assert set(np.unique(idata.posterior["fc.weight"].values)) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sites": ["fc.nope"]}, "not latent sites"),
        ({"obs_site": "y"}, "obs_site 'y' is not a sample site"),
        ({"num_samples": 0}, "num_samples must be a positive integer"),
        ({"chunk_size": 2.5}, "chunk_size must be a positive integer"),
    ],
)
def test_invalid_requests_raise(fitted, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _idata(fitted, **kwargs)


def test_convolution_dims_are_named_after_their_axes():
    layer = PyroModule()
    layer.conv = QuantizedConv2d(4, 6, 3, groups=2)
    assert _site_dims(layer, "conv.weight", torch.Size([6, 2, 3, 3])) == [
        "conv.out_channels",
        "conv.in_channels_per_group",
        "conv.kernel_height",
        "conv.kernel_width",
    ]
    assert _site_dims(layer, "conv.bias", torch.Size([6])) == ["conv.out_channels"]
    assert _site_dims(layer, "other.weight", torch.Size([2])) == ["other.weight_dim_0"]


class LinearClassifier(PyroModule):
    def __init__(self, in_features: int, num_classes: int, level_set) -> None:
        super().__init__()
        self.fc = QuantizedLinear(in_features, num_classes, levels=level_set)

    def forward(self, x, y=None):
        logits = self.fc(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


def test_psis_loo_compares_binary_ternary_and_two_bit_networks():
    data = load_breast_cancer()
    x, y = data.x_train, data.y_train
    idatas = {}
    for name, level_set in (
        ("binary", levels.binary()),
        ("ternary", levels.ternary()),
        ("2-bit", levels.uniform(2)),
    ):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = LinearClassifier(data.num_features, data.num_classes, level_set)
        guide = _fit(model, x, y, steps=40)
        idatas[name] = to_inference_data(
            model, guide, x, y, num_samples=100, seed=0, progress=False
        )

    table = az.compare(idatas, ic="loo")
    assert set(table.index) == set(idatas)
    assert np.isfinite(table["elpd_loo"].astype(float)).all()
    assert np.isfinite(table["se"].astype(float)).all()
    for idata in idatas.values():
        loo = az.loo(idata, pointwise=True)
        assert math.isfinite(loo.elpd_loo)
        # Pareto k is reported for every observation; whether it is good is not asserted.
        k = loo.pareto_k.values
        assert k.shape == (len(y),) and not np.isnan(k).any()
        assert isinstance(loo.warning, bool | np.bool_)
