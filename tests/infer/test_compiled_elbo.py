"""The sampling-free objective under ``torch.compile``: with Pyro's validation off, the
moment rules, their operators and the moment likelihood trace into one graph; the
per-step checks that need a host synchronisation follow Pyro's validation flag."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro_bqn.distributions import MomentCategorical
from pyro_bqn.distributions.level_statistics import level_statistics
from pyro_bqn.moments import Moments
from pyro_bqn.nn.batch_norm import batch_norm_moments
from pyro_bqn.nn.quantized_activation import quantized_activation_moments
from pyro_bqn.nn.quantized_layer import propagate


def _negative_elbo(logits, levels, x, y):
    """The sampling-free objective of a two-layer ternary sign network, written from the
    library's moment rules (what DeterministicELBO computes through Pyro's traces)."""
    h, kl = x, x.new_zeros(())
    for index, theta in enumerate(logits):
        stats = level_statistics(theta, levels)
        kl = kl + stats.neg_entropy.sum() + math.log(3) * stats.neg_entropy.numel()
        h = propagate(F.linear, h, Moments(stats.mean, stats.var, stats.second_moment), 1)
        if index == 0:
            h = Moments(*batch_norm_moments(h.mean, h.var, None, None, 1e-5))
            sign = quantized_activation_moments(
                h.mean, h.var, torch.tensor([-1.0, 1.0]), torch.tensor([0.0])
            )
            h = Moments(*sign, second_moment=torch.ones(()))
    return kl - MomentCategorical(logits=h).expected_log_prob(y).sum()


def _arguments():
    gen = torch.Generator().manual_seed(0)
    logits = [
        torch.randn(3, 16, 12, generator=gen, requires_grad=True),
        torch.randn(3, 4, 16, generator=gen, requires_grad=True),
    ]
    x = torch.randn(8, 12, generator=gen)
    y = torch.randint(0, 4, (8,), generator=gen)
    return logits, torch.tensor([-1.0, 0.0, 1.0]), x, y


def test_objective_compiles_without_graph_breaks():
    # Without validation: the distributions' argument checks are Python Dynamo skips.
    torch._dynamo.reset()
    with pyro.validation_enabled(False):
        explanation = torch._dynamo.explain(_negative_elbo)(*_arguments())
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_objective_and_gradients_match_eager():
    torch._dynamo.reset()
    logits, levels, x, y = _arguments()
    expected = _negative_elbo(logits, levels, x, y)
    expected_grads = torch.autograd.grad(expected, logits)
    compiled = torch.compile(_negative_elbo, backend="aot_eager", fullgraph=True)
    # Validation checks distribution arguments in Python that Dynamo does not trace.
    with pyro.validation_enabled(False):
        got = compiled(logits, levels, x, y)
    got_grads = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, expected)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_finite_logit_check_follows_pyro_validation():
    # The check reads every logit back to the host: Pyro's validation flag turns it off.
    logits = torch.tensor([[math.nan, 0.0]])
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="must be finite"):
        MomentCategorical(logits=logits)
    with pyro.validation_enabled(False):
        MomentCategorical(logits=logits)
