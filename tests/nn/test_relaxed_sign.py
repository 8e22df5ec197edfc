"""The relaxed sign sample's temperature scales the logistic noise exactly as documented."""

import math

import torch

from pyro_bqn.nn.local_reparameterization import RelaxedSign, relaxed_sign_sample, sign_logit


def test_undoing_the_relaxation_leaves_standard_logistic_noise():
    # a = tanh((l + L) / (2 tau)), so 2 tau atanh(a) - l = L ~ Logistic(0, 1): mean 0,
    # variance pi^2 / 3; checked within five standard errors of S samples.
    num_samples, tau = 100_000, 0.7
    torch.manual_seed(0)
    mean = torch.full((num_samples,), 0.3, dtype=torch.float64)
    var = torch.full((num_samples,), 0.5, dtype=torch.float64)
    a = relaxed_sign_sample(mean, var, tau)
    noise = 2 * tau * torch.atanh(a) - sign_logit(mean, var)
    se_mean = math.sqrt(math.pi**2 / 3 / num_samples)
    se_var = math.sqrt((7 * math.pi**4 / 15 - (math.pi**2 / 3) ** 2) / num_samples)  # m4 - s^4
    assert abs(noise.mean().item()) <= 5 * se_mean
    assert abs(noise.var().item() - math.pi**2 / 3) <= 5 * se_var


def test_the_default_temperature_is_one():
    assert RelaxedSign().temperature == 1.0
