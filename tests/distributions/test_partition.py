import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_bqn.distributions.partition import partition_log_probs

NUM_SAMPLES = 20_000
Z = 5.0  # tolerance in standard errors


@pytest.fixture(autouse=True)
def _seed() -> None:
    pyro.set_rng_seed(0)


def _reference(loc, scale, thresholds):
    """``Phi(b) - Phi(a)`` per interval in float64, levels first."""
    normal = torch.distributions.Normal(loc.double(), scale.double())
    edges = torch.cat([torch.tensor([-torch.inf]), thresholds.double(), torch.tensor([torch.inf])])
    return torch.stack([normal.cdf(edges[k + 1]) - normal.cdf(edges[k])
                        for k in range(edges.numel() - 1)])


@settings(max_examples=40, deadline=None)
@given(
    loc=st.floats(-6, 6),
    scale=st.floats(0.05, 5.0),
    gaps=st.lists(st.floats(0.05, 2.0), min_size=1, max_size=6),
    first=st.floats(-3, 3),
)
def test_interval_probabilities_match_normal_cdf_differences(loc, scale, gaps, first):
    thresholds = first + torch.tensor([0.0] + gaps[:-1], dtype=torch.float64).cumsum(0)
    loc_t, scale_t = torch.tensor([loc], dtype=torch.float64), torch.tensor([scale],
                                                                            dtype=torch.float64)
    log_probs = partition_log_probs(loc_t, scale_t, thresholds)
    assert log_probs.shape == (thresholds.numel() + 1, 1)
    torch.testing.assert_close(log_probs.exp(), _reference(loc_t, scale_t, thresholds),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(log_probs.logsumexp(0), torch.zeros(1, dtype=torch.float64))


def test_interval_probabilities_match_quantized_gaussian_samples():
    loc = torch.tensor([-0.4, 0.3, 1.1])
    scale = torch.tensor([0.3, 0.8, 0.5])
    thresholds = torch.tensor([-0.6, 0.1, 0.8])
    probs = partition_log_probs(loc, scale, thresholds).exp()
    u = loc + scale * torch.randn(NUM_SAMPLES, 3)
    index = torch.bucketize(u, thresholds, right=True)  # t_{k-1} <= u < t_k
    freq = torch.stack([(index == k).float().mean(0) for k in range(4)])
    assert ((freq - probs).abs() <= Z * (probs * (1 - probs) / NUM_SAMPLES).sqrt() + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_far_tails_keep_finite_logarithms_and_gradients(dtype):
    loc = torch.tensor([60.0, -60.0, 0.0, 0.3], dtype=dtype, requires_grad=True)
    scale = torch.tensor([1.0, 1.0, 1e-9, 1e6], dtype=dtype, requires_grad=True)
    thresholds = torch.tensor([-0.5, 0.5], dtype=dtype, requires_grad=True)
    log_probs = partition_log_probs(loc, scale, thresholds)
    assert torch.isfinite(log_probs).all()
    # Far in a tail the log-probability is log phi(z) / |z| to leading order, not -inf.
    assert log_probs[0, 0].item() == pytest.approx(-0.5 * 60.5**2, rel=0.01)
    torch.testing.assert_close(log_probs.logsumexp(0), torch.zeros(4, dtype=dtype))
    (log_probs * torch.arange(12, dtype=dtype).reshape(3, 4)).sum().backward()
    for tensor in (loc, scale, thresholds):
        assert torch.isfinite(tensor.grad).all()


def test_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(1)
    loc = torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_()
    scale = (0.2 + torch.rand(5, dtype=torch.float64, generator=gen)).requires_grad_()
    thresholds = torch.tensor([-0.7, 0.0, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(partition_log_probs, (loc, scale, thresholds))
