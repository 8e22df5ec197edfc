import inspect
import math
import warnings

import pyro
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import SVI
from torch.distributions import kl_divergence

from pyro_bqn import levels
from pyro_bqn.distributions import (
    MultipleSpikeAndSlab,
    QuantizedCategorical,
    RelaxedQuantizedCategoricalStraightThrough,
)
from pyro_bqn.infer import DeterministicELBO

NUM_SAMPLES = 20_000
Z = 5.0  # tolerance in standard errors


def _logits(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _point_mass_prior(level_set, batch_shape=(), seed=0, slab_prob=0.2):
    logits = _logits(*batch_shape, level_set.num_levels, seed=seed)
    spike_probs = (1 - slab_prob) * logits.softmax(-1)
    return MultipleSpikeAndSlab(level_set, spike_probs, slab_prob, 1.5)


PAIRS = {
    "qc-qc": lambda: (
        QuantizedCategorical(levels.ternary(), logits=_logits(4, 3, seed=1)),
        QuantizedCategorical(levels.ternary(), logits=_logits(4, 3, seed=2)),
    ),
    "qc-qc-broadcast": lambda: (
        QuantizedCategorical(levels.uniform(2), logits=_logits(2, 3, 4, seed=3)),
        QuantizedCategorical(levels.uniform(2), logits=_logits(3, 4, seed=4)),
    ),
    "qc-mss": lambda: (
        QuantizedCategorical(levels.ternary(), logits=_logits(4, 3, seed=5)),
        _point_mass_prior(levels.ternary(), (4,), seed=6),
    ),
    "qc-mss-broadcast": lambda: (
        QuantizedCategorical(levels.from_values([-0.7, 0.1, 1.3]), logits=_logits(5, 3, seed=7)),
        _point_mass_prior(levels.from_values([-0.7, 0.1, 1.3]), seed=8),
    ),
    "straight-through-qc": lambda: (
        RelaxedQuantizedCategoricalStraightThrough(
            levels.binary(), 0.5, logits=_logits(4, 2, seed=9)
        ),
        QuantizedCategorical(levels.binary(), logits=_logits(2, seed=10)),
    ),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    pyro.set_rng_seed(0)


@pytest.mark.parametrize("pair", list(PAIRS), ids=str)
@pytest.mark.filterwarnings("ignore::pyro_bqn.distributions.InertPriorWarning")  # tested below
def test_kl_matches_monte_carlo(pair):
    q, p = PAIRS[pair]()
    kl = kl_divergence(q, p)
    batch_shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    assert kl.shape == batch_shape
    with torch.no_grad():
        w = q.sample((NUM_SAMPLES,))
        log_ratio = q.log_prob(w) - p.log_prob(w)
        # Exact variance of the log ratio under q, for the standard error of its mean.
        support = q.enumerate_support(expand=False)
        ratios = q.log_prob(support) - p.log_prob(support)
        var = (q.log_prob(support).exp() * (ratios - kl).square()).sum(0)
    tol = Z * (var / NUM_SAMPLES).sqrt() + 1e-5
    assert ((log_ratio.mean(0) - kl).abs() <= tol).all()


def test_kl_against_uniform_prior_is_log_k_minus_entropy():
    q = QuantizedCategorical(levels.uniform(2), logits=_logits(6, 4, seed=11))
    p = QuantizedCategorical(levels.uniform(2), logits=torch.zeros(4))
    assert torch.allclose(kl_divergence(q, p), math.log(4) - q.entropy())


def test_kl_of_identical_distributions_is_zero():
    q = QuantizedCategorical(levels.ternary(), logits=_logits(3, 3, seed=12))
    assert torch.allclose(kl_divergence(q, q), torch.zeros(3), atol=1e-6)


def test_kl_handles_zero_probabilities():
    ternary = levels.ternary()
    q = QuantizedCategorical(ternary, probs=torch.tensor([0.5, 0.5, 0.0]))
    p = QuantizedCategorical(ternary, probs=torch.tensor([0.25, 0.25, 0.5]))
    assert torch.allclose(kl_divergence(q, p), torch.tensor(math.log(2.0)))
    assert kl_divergence(p, q) == math.inf
    spikes = MultipleSpikeAndSlab(ternary, torch.tensor([0.0, 0.4, 0.4]), 0.2, 1.0)
    assert kl_divergence(q, spikes) == math.inf


def test_kl_to_spike_and_slab_uses_spike_weights():
    ternary = levels.ternary()
    q = QuantizedCategorical(ternary, logits=_logits(4, 3, seed=13))
    prior = MultipleSpikeAndSlab.with_uniform_spikes(ternary, slab_prob=0.4, slab_scale=1.0)
    expected = (q.probs * (q.probs.log() - math.log(0.2))).sum(-1)
    assert torch.allclose(kl_divergence(q, prior), expected)


def test_kl_to_gaussian_spikes_is_the_zero_width_limit():
    q = QuantizedCategorical(levels.ternary(), logits=_logits(4, 3, seed=14))
    spike_probs = torch.tensor([0.3, 0.2, 0.4])
    point = MultipleSpikeAndSlab(levels.ternary(), spike_probs, 0.1, 1.0)
    gaussian = MultipleSpikeAndSlab(levels.ternary(), spike_probs, 0.1, 1.0, spike_scale=0.01)
    assert torch.equal(kl_divergence(q, gaussian), kl_divergence(q, point))


@pytest.mark.parametrize("prior_kind", ["qc", "mss"])
def test_kl_under_plate_and_to_event(prior_kind):
    ternary = levels.ternary()
    logits = _logits(3, seed=15).requires_grad_()
    guide = QuantizedCategorical(ternary, logits=logits)
    prior = (
        QuantizedCategorical(ternary, logits=torch.zeros(3))
        if prior_kind == "qc"
        else MultipleSpikeAndSlab.with_uniform_spikes(ternary, 0.1, 1.0)
    )
    kl = kl_divergence(guide.expand((4, 5)).to_event(2), prior.expand((4, 5)).to_event(2))
    assert kl.shape == ()
    assert torch.allclose(kl, 20 * kl_divergence(guide, prior))
    kl.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_kl_with_mismatched_levels_raises():
    q = QuantizedCategorical(levels.ternary(), logits=torch.zeros(3))
    shifted = QuantizedCategorical(levels.from_values([-1.0, 0.1, 1.0]), logits=torch.zeros(3))
    binary = QuantizedCategorical(levels.binary(), logits=torch.zeros(2))
    prior = MultipleSpikeAndSlab.with_uniform_spikes(levels.uniform(2), 0.1, 1.0)
    for p in (shifted, binary, prior):
        with pytest.raises(ValueError, match="same levels"):
            kl_divergence(q, p)


@settings(max_examples=20, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20), min_size=3, max_size=3),
    prior_logits=st.lists(st.floats(-20, 20), min_size=3, max_size=3),
)
def test_kl_is_non_negative_and_finite(logits, prior_logits):
    q = QuantizedCategorical(levels.ternary(), logits=torch.tensor(logits))
    p = QuantizedCategorical(levels.ternary(), logits=torch.tensor(prior_logits))
    kl = kl_divergence(q, p)
    assert torch.isfinite(kl) and kl >= -1e-6


@pytest.mark.parametrize(
    "prior_logits", [[0.0, 0.0, 0.0], [0.3, -1.0, 0.8]], ids=["uniform", "skewed"]
)
def test_kl_to_a_prior_shared_by_every_weight_matches_the_termwise_sum(prior_logits):
    # An expanded prior takes the fused path (negative entropy minus one cross term).
    ternary = levels.ternary()
    logits = _logits(3, 4, 5, seed=16).requires_grad_()
    q = QuantizedCategorical(ternary, logits=logits.movedim(0, -1))
    p = QuantizedCategorical(ternary, logits=torch.tensor(prior_logits)).expand((4, 5))
    kl = kl_divergence(q, p)
    log_q, log_p = torch.log_softmax(logits, 0), torch.log_softmax(torch.tensor(prior_logits), 0)
    expected = (log_q.exp() * (log_q - log_p.reshape(3, 1, 1))).sum(0)
    torch.testing.assert_close(kl, expected)
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(grad, expected_grad)


def test_kl_gradient_reaches_a_learnable_uniform_prior():
    # A prior whose logits start equal is uniform by value but not constant: the shortcut
    # for a fixed uniform prior must not cut its gradient.
    ternary = levels.ternary()
    q = QuantizedCategorical(ternary, logits=_logits(4, 5, 3, seed=17))
    prior_logits = torch.zeros(3, requires_grad=True)
    prior = QuantizedCategorical(ternary, logits=prior_logits).expand((4, 5))
    (grad,) = torch.autograd.grad(kl_divergence(q, prior).sum(), prior_logits)
    # d/d(prior logits) of -sum_w sum_k q_wk log softmax(prior)_k = 20 p - sum_w q_w.
    expected = 20 * torch.softmax(prior_logits, 0).detach() - q.probs.detach().sum((0, 1))
    torch.testing.assert_close(grad, expected)


def test_kl_to_an_empty_expanded_prior_is_empty():
    ternary = levels.ternary()
    q = QuantizedCategorical(ternary, logits=torch.zeros(0, 5, 3), validate_args=False)
    prior = QuantizedCategorical(ternary, logits=torch.zeros(3)).expand((0, 5))
    assert kl_divergence(q, prior).shape == (0, 5)


@pytest.mark.parametrize(
    "prior_logits", [[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]], ids=["skewed", "uniform"]
)
def test_kl_broadcast_to_the_prior_is_a_fresh_tensor_in_the_promoted_dtype(prior_logits):
    ternary = levels.ternary()
    q = QuantizedCategorical(ternary, logits=_logits(5, 3, seed=18))
    prior = QuantizedCategorical(ternary, logits=torch.tensor(prior_logits, dtype=torch.float64))
    kl = kl_divergence(q, prior.expand((2, 5)))
    assert kl.shape == (2, 5) and kl.dtype == torch.float64
    log_q, log_p = q.logits.double(), prior.logits.expand(2, 5, 3)
    expected = (log_q.exp() * (log_q - log_p)).sum(-1)
    torch.testing.assert_close(kl, expected, atol=1e-6, rtol=1e-5)  # q's float32 rounding
    kl.mul_(2.0)  # writable: not a broadcast view


def test_kl_to_a_prior_with_a_unit_batch_dim_equals_the_kl_to_the_unbatched_prior():
    # A size-1 batch dimension (any stride) shares one row with every weight, as an
    # unbatched prior does: both take the fused path, so the values agree to the bit.
    ternary = levels.ternary()
    q = QuantizedCategorical(ternary, logits=_logits(7, 3, seed=19))
    prior_logits = _logits(3, seed=23)
    unbatched = QuantizedCategorical(ternary, logits=prior_logits)
    unit_batch = QuantizedCategorical(ternary, logits=prior_logits.unsqueeze(0))
    assert unit_batch.logits.stride(0) != 0
    assert torch.equal(kl_divergence(q, unit_batch), kl_divergence(q, unbatched))


# --- spike-and-slab posterior against the spike-and-slab prior -----------------------------

ASYMMETRIC = levels.from_values([-1.0, -0.2, 0.4, 1.2])


def _spike_and_slab_posterior(spike_scale=0.0, batch_shape=(6,), seed=20):
    gen = torch.Generator().manual_seed(seed)
    logits = 1.5 * torch.randn(*batch_shape, 5, generator=gen)
    slab_loc = torch.randn(batch_shape, generator=gen)
    slab_scale = 0.2 + 0.3 * torch.rand(batch_shape, generator=gen)
    return MultipleSpikeAndSlab.from_logits(ASYMMETRIC, logits, slab_loc, slab_scale, spike_scale)


def _component_log_densities(d: MultipleSpikeAndSlab, w: torch.Tensor) -> torch.Tensor:
    """``log pi_c + log N(w; loc_c, scale_c^2)`` per component (Gaussian spikes), ``w.shape +
    (K + 1,)``."""
    normal = torch.distributions.Normal
    spikes = normal(d.levels, d.spike_scale.unsqueeze(-1)).log_prob(w.unsqueeze(-1))
    slab = normal(d.slab_loc, d.slab_scale).log_prob(w).unsqueeze(-1)
    return d.log_weights + torch.cat([spikes, slab], -1)


def _joint_and_true_log_ratios(q, p, w):
    """Per sample: ``j(w) = sum_c q(c|w) log(q_c f_c(w) / (pi_c g_c(w)))`` and
    ``log q(w) - log p(w)``; their difference is ``KL(q(c|w) || p(c|w))``."""
    log_q_c, log_p_c = _component_log_densities(q, w), _component_log_densities(p, w)
    responsibility = torch.softmax(log_q_c, -1)
    terms = torch.where(responsibility == 0, 0.0, responsibility * (log_q_c - log_p_c))
    return terms.sum(-1), q.log_prob(w) - p.log_prob(w)


def test_spike_and_slab_kl_is_exact_for_point_masses():
    q = _spike_and_slab_posterior()
    p = MultipleSpikeAndSlab(ASYMMETRIC, torch.tensor([0.1, 0.3, 0.3, 0.2]), 0.1, 1.3, slab_loc=0.2)
    kl = kl_divergence(q, p)
    assert kl.shape == (6,)
    with torch.no_grad():
        w = q.sample((NUM_SAMPLES,))
        # Densities against counting measure on the levels plus Lebesgue measure.
        log_ratio = q.log_prob(w) - p.log_prob(w)
    tol = Z * log_ratio.std(0) / NUM_SAMPLES**0.5 + 1e-5
    assert ((log_ratio.mean(0) - kl).abs() <= tol).all()


@pytest.mark.parametrize("spike_scales", [(0.02, 0.02), (0.05, 0.02)], ids=["same", "wider"])
def test_spike_and_slab_kl_of_gaussian_spikes_is_the_joint_bound(spike_scales):
    """The analytic value is E_q[j(w)] with j the joint (component, weight) log ratio, and
    exceeds the true KL E_q[log q(w) - log p(w)] by E_q[KL(q(c|w) || p(c|w))] >= 0."""
    q = _spike_and_slab_posterior(spike_scales[0])
    p = MultipleSpikeAndSlab.with_uniform_spikes(ASYMMETRIC, 0.1, 1.0, spike_scales[1])
    bound = kl_divergence(q, p)
    with torch.no_grad():
        joint, true = _joint_and_true_log_ratios(q, p, q.sample((NUM_SAMPLES,)))
        gap = joint - true
    for samples, expected in ((joint, bound), (true, bound - gap.mean(0))):
        tol = Z * samples.std(0) / NUM_SAMPLES**0.5 + 1e-4
        assert ((samples.mean(0) - expected).abs() <= tol).all()
    assert (gap >= -1e-4).all()  # the gap is a KL at every w


def test_spike_and_slab_kl_gap_shrinks_with_the_spike_width():
    gaps = []
    for width in (0.02, 0.002):
        q = _spike_and_slab_posterior(width)
        p = MultipleSpikeAndSlab.with_uniform_spikes(ASYMMETRIC, 0.1, 1.0, width)
        with torch.no_grad():
            joint, true = _joint_and_true_log_ratios(q, p, q.sample((NUM_SAMPLES,)))
        gaps.append((joint - true).mean(0).max().item())
    assert gaps[1] < gaps[0] / 4, gaps


def test_spike_and_slab_kl_responds_to_every_prior_parameter():
    q = _spike_and_slab_posterior(0.03)
    base = {"slab_prob": 0.1, "slab_scale": 1.0, "spike_scale": 0.02}
    reference = kl_divergence(q, MultipleSpikeAndSlab.with_uniform_spikes(ASYMMETRIC, **base))
    for name, value in (("slab_prob", 0.3), ("slab_scale", 3.0), ("spike_scale", 0.05)):
        prior = MultipleSpikeAndSlab.with_uniform_spikes(ASYMMETRIC, **{**base, name: value})
        assert (kl_divergence(q, prior) - reference).abs().min() > 1e-3, name


def test_spike_and_slab_kl_zero_weights_and_gradients():
    logits = torch.tensor([[-math.inf, 0.0, 1.0, 0.0, -1.0]], requires_grad=True)
    q = MultipleSpikeAndSlab.from_logits(ASYMMETRIC, logits, 0.3, 0.5)
    p = MultipleSpikeAndSlab(ASYMMETRIC, torch.tensor([0.0, 0.3, 0.3, 0.3]), 0.1, 1.0)
    kl = kl_divergence(q, p)
    assert torch.isfinite(kl).all()  # q puts no mass where p has none: 0 log 0 = 0
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all()
    p_no_slab = MultipleSpikeAndSlab(ASYMMETRIC, torch.full((4,), 0.25), 0.0, 1.0)
    assert kl_divergence(q, p_no_slab).item() == math.inf


def test_spike_and_slab_kl_needs_spikes_of_one_kind():
    p = MultipleSpikeAndSlab.with_uniform_spikes(ASYMMETRIC, 0.1, 1.0, 0.02)
    with pytest.raises(ValueError, match="point masses or both Gaussian"):
        kl_divergence(_spike_and_slab_posterior(0.0), p)
    p_point = MultipleSpikeAndSlab.with_uniform_spikes(ASYMMETRIC, 0.1, 1.0)
    with pytest.raises(ValueError, match="point masses or both Gaussian"):
        kl_divergence(_spike_and_slab_posterior(0.02), p_point)
    with pytest.raises(ValueError, match="same levels"):
        kl_divergence(_spike_and_slab_posterior(),
                      MultipleSpikeAndSlab.with_uniform_spikes(levels.uniform(2), 0.1, 1.0))


@pytest.mark.parametrize("spike_scale", [0.0, 0.02])
def test_spike_and_slab_kl_under_expand_and_to_event(spike_scale):
    q = _spike_and_slab_posterior(spike_scale, batch_shape=(3,))
    p = MultipleSpikeAndSlab.with_uniform_spikes(ASYMMETRIC, 0.1, 1.0, spike_scale)
    kl = kl_divergence(q, p.expand((3,)))
    both = kl_divergence(q.expand((2, 3)).to_event(2), p.expand((2, 3)).to_event(2))
    assert both.shape == ()
    torch.testing.assert_close(both, 2 * kl.sum())


# --- the inert-slab warning ---------------------------------------------------------------


def test_categorical_posterior_against_a_slab_warns_once(monkeypatch):
    from pyro_bqn.distributions import InertPriorWarning
    from pyro_bqn.distributions import kl as kl_module

    monkeypatch.setattr(kl_module, "_WARNED", set())
    q = QuantizedCategorical(levels.ternary(), logits=_logits(4, 3, seed=21))
    categorical = MultipleSpikeAndSlab.with_uniform_spikes(levels.ternary(), 0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kl_divergence(q, categorical)  # no slab, point masses: nothing is inert
    slab = MultipleSpikeAndSlab.with_uniform_spikes(levels.ternary(), 0.1, 1.0)
    wide = MultipleSpikeAndSlab.with_uniform_spikes(levels.ternary(), 0.1, 5.0, 0.05)
    with pytest.warns(InertPriorWarning, match="slab_scale and spike_scale .* do not change"):
        first = kl_divergence(q, slab)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = kl_divergence(q, wide)  # warned once already
    torch.testing.assert_close(first, second)  # indeed inert


def _zero_width_spike_model():
    prior = MultipleSpikeAndSlab.with_uniform_spikes(levels.ternary(), 0.1, 1.0, spike_scale=0.0)
    pyro.sample("w", prior.expand((4,)).to_event(1))


def _categorical_guide():
    logits = pyro.param("w_logits", torch.zeros(4, 3))
    pyro.sample("w", QuantizedCategorical(levels.ternary(), logits=logits).to_event(1))


def _kl_of_the_guide_and_prior():
    q = QuantizedCategorical(levels.ternary(), logits=_logits(4, 3, seed=22))
    kl_divergence(q, MultipleSpikeAndSlab.with_uniform_spikes(levels.ternary(), 0.1, 1.0))


def _elbo_loss():
    DeterministicELBO().loss(_zero_width_spike_model, _categorical_guide)


def _svi_step():
    optimizer = pyro.optim.Adam({"lr": 0.01})
    SVI(_zero_width_spike_model, _categorical_guide, optimizer, DeterministicELBO()).step()


# User-level calls that meet the inert prior; each enters the library on its last line.
USER_CALLS = {
    "kl_divergence": _kl_of_the_guide_and_prior,
    "elbo-loss": _elbo_loss,
    "svi-step": _svi_step,
}


@pytest.mark.parametrize("call", list(USER_CALLS), ids=str)
def test_inert_prior_warning_points_at_the_users_code(monkeypatch, call):
    # The warning names the first frame outside pyro_bqn, Pyro and torch.
    from pyro_bqn.distributions import InertPriorWarning
    from pyro_bqn.distributions import kl as kl_module

    monkeypatch.setattr(kl_module, "_WARNED", set())
    pyro.clear_param_store()
    with pytest.warns(InertPriorWarning) as record:
        USER_CALLS[call]()
    source, first = inspect.getsourcelines(USER_CALLS[call])
    assert [(w.filename, w.lineno) for w in record] == [(__file__, first + len(source) - 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        USER_CALLS[call]()  # once per process
