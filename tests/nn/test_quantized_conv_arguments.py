"""QuantizedConv2d passes each of its arguments on: a sampled network is torch's conv2d."""

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from pyro_bqn.distributions import QuantizedCategorical
from pyro_bqn.levels import binary
from pyro_bqn.nn.quantized_conv import QuantizedConv2d


def _sampled(layer, x):
    trace = poutine.trace(layer).get_trace(x)
    return trace.nodes["_RETURN"]["value"], trace.nodes


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"stride": 2}, {"padding": 1}, {"dilation": 2}, {"groups": 2}, {"stride": (1, 2)}],
)
def test_a_sampled_network_is_torchs_conv2d_with_the_same_arguments(kwargs):
    pyro.set_rng_seed(0)
    layer = QuantizedConv2d(4, 6, (3, 2), levels=binary(), **kwargs)
    x = torch.randn(2, 4, 7, 8)
    out, nodes = _sampled(layer, x)
    weight, bias = nodes["weight"]["value"], nodes["bias"]["value"]
    assert weight.shape == (6, 4 // kwargs.get("groups", 1), 3, 2)
    assert set(weight.unique().tolist()) <= {-1.0, 1.0}  # the levels given
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, **kwargs))
    assert layer.kernel_size == (3, 2) and layer.out_channels == 6


def test_the_defaults_are_torchs_and_a_unit_bias_prior():
    layer = QuantizedConv2d(2, 3, 3)
    out, nodes = _sampled(layer, torch.randn(1, 2, 5, 5))
    assert out.shape == (1, 3, 3, 3)  # no padding, stride 1
    prior = nodes["bias"]["fn"].base_dist
    torch.testing.assert_close(prior.scale, torch.ones(3))


def test_a_given_prior_and_bias_prior_scale_reach_the_sites():
    prior = QuantizedCategorical(binary().values, probs=torch.tensor([0.1, 0.9]))
    layer = QuantizedConv2d(2, 3, 3, levels=binary(), prior=prior, bias_prior_scale=2.5)
    _, nodes = _sampled(layer, torch.randn(1, 2, 5, 5))
    torch.testing.assert_close(nodes["bias"]["fn"].base_dist.scale, torch.full((3,), 2.5))
    weight_prior = nodes["weight"]["fn"]
    torch.testing.assert_close(
        weight_prior.log_prob(torch.ones(3, 2, 3, 3)), 54 * torch.tensor(0.9).log()
    )
