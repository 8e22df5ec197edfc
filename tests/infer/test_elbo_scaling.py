"""DeterministicELBO scales and masks the likelihood and the KL each exactly: under
``poutine.scale``, for latents inside a subsampled plate, and under ``poutine.mask``.

Every expected value is computed by hand from the guide's parameters (closed forms of the
Gaussian expected log-likelihood and KL), and each term is checked on its own, so an ELBO
that scaled only one of them, or scaled one twice, fails."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints

from pyro_bqn.distributions.moment_likelihoods import MomentNormal
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO, ScaleLatentsMessenger
from tests.infer.models import Classifier, linear_classes

N, TAU = 12, 0.7
SUBSAMPLE = torch.tensor([1, 4, 5, 9])
LOC, SCALE = torch.linspace(-1.0, 1.0, N), torch.linspace(0.2, 1.5, N)
Y = torch.linspace(-2.0, 2.0, N).sin()


def model(scale=1.0, mask=True, obs_mask=True):
    with pyro.plate("data", N, subsample=SUBSAMPLE) as idx:
        with poutine.scale(scale=scale), poutine.mask(mask=mask):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
        with poutine.mask(mask=obs_mask):
            pyro.sample("obs", MomentNormal(u, TAU), obs=Y[idx])


def guide(scale=1.0, mask=True, obs_mask=True):
    loc = pyro.param("loc", LOC)
    sd = pyro.param("sd", SCALE, constraint=constraints.positive)
    with pyro.plate("data", N, subsample=SUBSAMPLE) as idx:
        with poutine.scale(scale=scale), poutine.mask(mask=mask):
            pyro.sample("u", dist.Normal(loc[idx], sd[idx]))


def _by_hand():
    """Per subsampled point: E_q log N(y | u, tau^2) and KL(N(m, s^2) || N(0, 1))."""
    m, s, y = LOC[SUBSAMPLE], SCALE[SUBSAMPLE], Y[SUBSAMPLE]
    ell = -((y - m) ** 2 + s**2) / (2 * TAU**2) - 0.5 * math.log(2 * math.pi * TAU**2)
    kl = (m**2 + s**2 - 1) / 2 - s.log()
    return ell, kl


def _terms(model_fn, guide_fn, *args, kl_weight=1.0):
    terms = DeterministicELBO(kl_weight=kl_weight).terms(model_fn, guide_fn, *args)
    return {key: value.item() for key, value in terms.items()}


def _close(got, expected):
    return math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-6)


def test_a_latent_in_a_subsampled_plate_scales_its_kl_and_the_likelihood_by_n_over_b():
    ell, kl = _by_hand()
    terms = _terms(model, guide)
    factor = N / len(SUBSAMPLE)
    assert _close(terms["expected_log_likelihood"], factor * ell.sum().item())
    assert _close(terms["kl"], factor * kl.sum().item())


@pytest.mark.parametrize("scale", [0.25, 3.0])
def test_poutine_scale_on_a_latent_scales_its_kl_only(scale):
    ell, kl = _by_hand()
    terms = _terms(model, guide, scale)
    factor = N / len(SUBSAMPLE)
    assert _close(terms["expected_log_likelihood"], factor * ell.sum().item())
    assert _close(terms["kl"], scale * factor * kl.sum().item())


def test_poutine_scale_around_model_and_guide_scales_both_terms():
    ell, kl = _by_hand()
    terms = _terms(poutine.scale(model, scale=2.5), poutine.scale(guide, scale=2.5))
    factor = 2.5 * N / len(SUBSAMPLE)
    assert _close(terms["expected_log_likelihood"], factor * ell.sum().item())
    assert _close(terms["kl"], factor * kl.sum().item())
    assert _close(terms["elbo"], factor * (ell - kl).sum().item())


def test_masks_zero_the_masked_kl_and_likelihood_terms_separately():
    ell, kl = _by_hand()
    latent_mask = torch.tensor([True, False, True, True])
    obs_mask = torch.tensor([False, True, True, False])
    terms = _terms(model, guide, 1.0, latent_mask, obs_mask)
    factor = N / len(SUBSAMPLE)
    assert _close(terms["expected_log_likelihood"], factor * ell[obs_mask].sum().item())
    assert _close(terms["kl"], factor * kl[latent_mask].sum().item())


def test_a_scaled_and_masked_latent_with_kl_weight():
    ell, kl = _by_hand()
    latent_mask = torch.tensor([False, True, True, True])
    terms = _terms(model, guide, 0.5, latent_mask, kl_weight=0.3)
    factor = N / len(SUBSAMPLE)
    expected_kl = 0.5 * factor * kl[latent_mask].sum().item()
    assert _close(terms["kl"], expected_kl)
    assert _close(terms["elbo"], factor * ell.sum().item() - 0.3 * expected_kl)


# --- quantized weights: global latents --------------------------------------------------


def _quantized_kl_by_hand(guide):
    """KL of the uniform-prior ternary weights, sum q log(3 q), and of the Normal(0, 1) bias."""
    with torch.no_grad():
        q = guide.site_logits("body.0.weight").softmax(-1)
        m = pyro.param("AutoQuantizedGuide.locs.body.0.bias")
        s = pyro.param("AutoQuantizedGuide.scales.body.0.bias")
        return (q * (3 * q).log()).sum().item() + ((m**2 + s**2 - 1) / 2 - s.log()).sum().item()


def _classifier():
    x, y = linear_classes(10, 4, 3, seed=0)
    classifier = Classifier((4, 3))  # one layer, no batch norm
    auto = AutoQuantizedGuide(classifier)
    auto(x, y)
    return classifier, auto, x, y


@pytest.mark.parametrize("scale", [0.2, 4.0])
def test_poutine_scale_scales_the_quantized_kl_and_the_likelihood(scale):
    classifier, auto, x, y = _classifier()
    plain = _terms(classifier, auto, x, y)
    assert _close(plain["kl"], _quantized_kl_by_hand(auto))
    scaled = _terms(poutine.scale(classifier, scale=scale), poutine.scale(auto, scale=scale), x, y)
    assert _close(scaled["kl"], scale * plain["kl"])
    assert _close(scaled["expected_log_likelihood"], scale * plain["expected_log_likelihood"])


def test_scale_latents_messenger_scales_the_quantized_kl_only():
    classifier, auto, x, y = _classifier()
    plain = _terms(classifier, auto, x, y)
    tempered = _terms(
        ScaleLatentsMessenger(0.3)(classifier), ScaleLatentsMessenger(0.3)(auto), x, y
    )
    assert _close(tempered["kl"], 0.3 * plain["kl"])
    assert _close(tempered["expected_log_likelihood"], plain["expected_log_likelihood"])
    # ... which is kl_weight expressed through the sites.
    weighted = _terms(classifier, auto, x, y, kl_weight=0.3)
    assert _close(tempered["elbo"], weighted["elbo"])
