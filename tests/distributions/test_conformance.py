"""Conformance checks every distribution fixture (``conftest.FIXTURES``) must pass (the checks
Pyro runs on its own distributions): shapes, support, normalisation, moments, expand. The
generic checks on distributions built from constructor arguments, moment likelihoods
included, are in ``test_pyro_generic.py``."""

import pyro
import pytest
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import kl_divergence

from pyro_bqn.distributions import RelaxedLevelValue
from pyro_bqn.distributions.relaxed_value import soft_onehot_of

NUM_SAMPLES = 20_000
Z = 5.0  # tolerance in standard errors


def test_batch_and_event_shapes(case):
    d = case.make()
    assert d.batch_shape == case.batch_shape
    assert d.event_shape == ()
    x = d.sample((5,))
    assert x.shape == (5,) + case.batch_shape
    assert d.log_prob(x).shape == (5,) + case.batch_shape
    if d.has_rsample:
        assert d.rsample((2, 5)).shape == (2, 5) + case.batch_shape


def test_samples_lie_in_support(case):
    d = case.make()
    samples = [d.sample((200,))] + ([d.rsample((200,))] if d.has_rsample else [])
    for x in samples:
        assert d.support.check(x).all()
        assert torch.isfinite(d.log_prob(x)).all()
    if case.enumerable:
        assert (samples[0].unsqueeze(-1) == d.levels).any(-1).all()


def test_value_outside_support_is_rejected_under_validation(case):
    d = case.make(validate_args=True)
    with pytest.raises(ValueError, match="support"):
        d.log_prob(torch.full(case.batch_shape, case.bad_value))


@pytest.mark.cases("enumerable")
@pytest.mark.parametrize("expand", [False, True])
def test_log_prob_sums_to_one_over_enumerate_support(case, expand):
    d = case.make()
    values = d.enumerate_support(expand=expand)
    k = d.levels.shape[0]
    expected_shape = (k,) + (case.batch_shape if expand else (1,) * len(case.batch_shape))
    assert values.shape == expected_shape
    log_total = d.log_prob(values).logsumexp(0)
    assert log_total.shape == case.batch_shape
    assert torch.allclose(log_total, torch.zeros(()), atol=1e-5)


@pytest.mark.cases("moments")
def test_sample_mean_and_variance_match(case):
    d = case.make()
    with torch.no_grad():
        x = d.sample((NUM_SAMPLES,))
        mean, var, m4 = d.mean, d.variance, case.fourth_central_moment(d)
    assert mean.shape == var.shape == case.batch_shape
    assert (var >= 0).all()
    # Standard errors of the sample mean and of the sample variance.
    mean_tol = Z * (var / NUM_SAMPLES).sqrt() + 1e-6
    var_tol = Z * ((m4 - var.square()) / NUM_SAMPLES).sqrt() + 1e-6
    assert ((x.mean(0) - mean).abs() <= mean_tol).all()
    assert ((x.var(0) - var).abs() <= var_tol).all()


def test_expand_keeps_type_and_behaviour(case):
    d = case.make()
    new_shape = (2,) + case.batch_shape
    e = d.expand(new_shape)
    assert type(e) is type(d)
    assert e.batch_shape == new_shape
    assert e.levels is d.levels
    assert e.sample((3,)).shape == (3,) + new_shape
    x = d.sample((3,))
    expected = d.log_prob(x).unsqueeze(1).expand((3,) + new_shape)
    soft = soft_onehot_of(x)
    # Torch operations drop the carried one-hot, so a relaxed value is re-wrapped.
    x1 = x.unsqueeze(1) if soft is None else RelaxedLevelValue.wrap(x.unsqueeze(1),
                                                                     soft.unsqueeze(1))
    assert torch.allclose(e.log_prob(x1), expected)
    if case.moments:
        assert torch.allclose(e.mean, d.mean.expand(new_shape))
        assert torch.allclose(e.variance, d.variance.expand(new_shape))
    if case.enumerable:
        assert e.enumerate_support().shape == (d.levels.shape[0],) + new_shape


def test_samples_of_pyros_generic_expand_have_a_log_prob(case):
    d = case.make(validate_args=True)
    new_shape = (2,) + case.batch_shape
    # Pyro's ExpandedDistribution reshapes the samples: a relaxed one loses its one-hot.
    x = TorchDistribution.expand(d, new_shape).sample((3,))
    assert d.support.check(x).all()
    log_p = d.log_prob(x)
    assert log_p.shape == (3,) + new_shape
    assert torch.isfinite(log_p).all()


def test_plate_keeps_type(case):
    d = case.make()
    with pyro.plate("outer", 2, dim=-len(case.batch_shape) - 1):
        trace = pyro.poutine.trace(lambda: pyro.sample("w", d)).get_trace()
    assert type(trace.nodes["w"]["fn"]) is type(d)
    assert trace.nodes["w"]["value"].shape == (2,) + case.batch_shape


@pytest.mark.cases("has_kl")
@pytest.mark.parametrize("event_dims", [0, 1])
# A categorical against a spike-and-slab prior warns that the slab is inert (tested in
# test_kl.py); here only the KL's shapes are checked.
@pytest.mark.filterwarnings("ignore::pyro_bqn.distributions.InertPriorWarning")
def test_expand_and_to_event_keep_kl(case, event_dims):
    q, p = case.make(), case.prior()
    kl = kl_divergence(q, p)
    assert kl.shape == case.batch_shape
    new_shape = (2,) + case.batch_shape
    expanded = kl_divergence(
        q.expand(new_shape).to_event(event_dims), p.expand(new_shape).to_event(event_dims)
    )
    expected = kl.expand(new_shape)
    if event_dims:
        expected = expected.sum(-1)
    assert torch.allclose(expanded, expected)
