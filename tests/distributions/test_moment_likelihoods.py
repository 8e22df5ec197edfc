import math

import pyro.distributions as dist
import pytest
import torch

from pyro_bqn.distributions.moment_likelihoods import (
    MomentBernoulli,
    MomentCategorical,
    MomentNormal,
    expected_log_prob,
)
from pyro_bqn.moments import MomentRuleError, Moments

NUM_SAMPLES = 200_000


def _gaussian_logits(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    mean = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    var = 2 * torch.rand(shape, generator=gen, dtype=torch.float64)
    z = mean + var.sqrt() * torch.randn((NUM_SAMPLES,) + shape, generator=gen, dtype=torch.float64)
    return Moments(mean, var), z


def _mc_bound(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean and 5 standard errors."""
    return samples.mean(0), 5 * samples.std(0) / math.sqrt(samples.shape[0])


@pytest.mark.parametrize("seed", range(3))
def test_categorical_expected_log_prob_is_a_lower_bound(seed):
    logits, z = _gaussian_logits((4, 5), seed)
    y = torch.arange(4)
    bound = MomentCategorical(logits=logits).expected_log_prob(y)
    mc, tol = _mc_bound(z.log_softmax(-1).gather(-1, y.expand(NUM_SAMPLES, 4)[..., None])[..., 0])
    assert (bound <= mc + tol).all()
    # Two-sided: E[log sum_k exp z_k] >= log sum_k exp mu_k (Jensen, lse is convex), so the
    # bound lies below E[log softmax(z)_y] by at most lse(mu + sigma^2/2) - lse(mu).
    mean, var = logits.mean, logits.var
    max_gap = (mean + var / 2).logsumexp(-1) - mean.logsumexp(-1)
    assert (bound >= mc - max_gap - tol).all()


# Hand-computed: for logits N(mu_k, s2_k), E[exp z_k] = exp(mu_k + s2_k / 2), and the bound is
# mu_y - log sum_k E[exp z_k], evaluated here with scalar Python arithmetic.
HAND_MEAN = (0.5, -1.0, 2.0)
HAND_VAR = (0.3, 1.2, 0.1)


def _hand_bound(y: int) -> float:
    terms = (math.exp(m + v / 2) for m, v in zip(HAND_MEAN, HAND_VAR, strict=True))
    normaliser = math.log(sum(terms))
    return HAND_MEAN[y] - normaliser


def test_categorical_expected_log_prob_is_its_closed_form_on_hand_computed_moments():
    logits = Moments(torch.tensor([HAND_MEAN] * 3), torch.tensor([HAND_VAR] * 3))
    got = MomentCategorical(logits=logits).expected_log_prob(torch.tensor([0, 1, 2]))
    torch.testing.assert_close(got, torch.tensor([_hand_bound(y) for y in range(3)]))


@pytest.mark.parametrize("seed", range(2))
def test_categorical_bound_normaliser_is_the_log_of_the_expected_partition_function(seed):
    # mu_y - bound = log E[sum_k exp z_k]: checked against the Monte Carlo mean of the partition
    # function, with the delta-method standard error of its log, se = sd(S) / (mean(S) sqrt(n)).
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    var = 0.8 * torch.rand(3, 4, generator=gen, dtype=torch.float64)
    z = mean + var.sqrt() * torch.randn((NUM_SAMPLES, 3, 4), generator=gen, dtype=torch.float64)
    partition = z.exp().sum(-1)
    mc = partition.mean(0).log()
    tol = 5 * partition.std(0) / (partition.mean(0) * math.sqrt(NUM_SAMPLES))
    y = torch.tensor([0, 3, 1])
    bound = MomentCategorical(logits=Moments(mean, var)).expected_log_prob(y)
    normaliser = mean.gather(-1, y[:, None])[:, 0] - bound
    assert ((normaliser - mc).abs() <= tol).all(), (normaliser - mc, tol)


def test_categorical_with_tensor_logits_is_exact():
    logits = torch.randn(3, 4)
    y = torch.tensor([0, 3, 1])
    d = MomentCategorical(logits=logits)
    expected = dist.Categorical(logits=logits).log_prob(y)
    torch.testing.assert_close(d.expected_log_prob(y), expected)
    torch.testing.assert_close(d.log_prob(y), expected)


# The pairwise mean-field rule is an approximation with no published error bound; over
# seeds 0-2 here its error against a 200,000-sample Monte Carlo mean is below 0.08. The
# tolerance is that budget plus five Monte Carlo standard errors of each probability.
MEAN_FIELD_BUDGET = 0.08


@pytest.mark.parametrize("seed", range(3))
def test_categorical_predictive_is_close_to_monte_carlo(seed):
    logits, z = _gaussian_logits((6, 4), seed)
    mc, tol = _mc_bound(z.softmax(-1))
    probs = MomentCategorical(logits=logits).probs
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, dtype=torch.float64))
    assert ((probs - mc).abs() <= MEAN_FIELD_BUDGET + tol).all()


def test_bernoulli_is_the_two_class_categorical():
    logits = Moments(torch.randn(5), torch.rand(5))
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    two_class = Moments(
        torch.stack([torch.zeros(5), logits.mean], -1),
        torch.stack([torch.zeros(5), logits.var], -1),
    )
    expected = MomentCategorical(logits=two_class).expected_log_prob(y.long())
    torch.testing.assert_close(MomentBernoulli(logits=logits).expected_log_prob(y), expected)
    torch.testing.assert_close(
        MomentBernoulli(logits=logits).probs, MomentCategorical(logits=two_class).probs[:, 1]
    )


def test_bernoulli_expected_log_prob_is_its_closed_form_on_hand_computed_moments():
    # Logits (0, z): y = 1 gives mu - log(1 + exp(mu + s2/2)), y = 0 gives -log(1 + ...).
    mu, s2 = 0.7, 1.3
    softplus = math.log1p(math.exp(mu + s2 / 2))
    d = MomentBernoulli(logits=Moments(torch.tensor([mu, mu]), torch.tensor([s2, s2])))
    got = d.expected_log_prob(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(got, torch.tensor([mu - softplus, -softplus]))


def test_bernoulli_with_tensor_logits_is_exact():
    logits, y = torch.randn(6), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    expected = dist.Bernoulli(logits=logits).log_prob(y)
    torch.testing.assert_close(MomentBernoulli(logits=logits).log_prob(y), expected)
    torch.testing.assert_close(MomentBernoulli(logits=logits).expected_log_prob(y), expected)


def test_normal_expected_log_prob_is_exact():
    loc, z = _gaussian_logits((5,), 0)
    y = torch.randn(5, dtype=torch.float64)
    d = MomentNormal(loc, 0.7)
    mc, tol = _mc_bound(dist.Normal(z, 0.7).log_prob(y))
    assert ((d.expected_log_prob(y) - mc).abs() <= tol).all()
    torch.testing.assert_close(d.variance, loc.var + 0.49)
    torch.testing.assert_close(
        d.log_prob(y), dist.Normal(loc.mean, (loc.var + 0.49).sqrt()).log_prob(y)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: MomentCategorical(logits=Moments(torch.randn(3, 4), torch.rand(3, 4))),
        lambda: MomentBernoulli(logits=Moments(torch.randn(3), torch.rand(3))),
        lambda: MomentNormal(Moments(torch.randn(3), torch.rand(3)), 1.0),
    ],
)
def test_expand_keeps_the_class_and_sampling_works(make):
    d = make()
    expanded = d.expand((2, 3))
    assert type(expanded) is type(d)
    assert expanded.batch_shape == (2, 3)
    value = expanded.sample()
    assert value.shape == (2, 3)
    assert expected_log_prob(expanded, value).shape == (2, 3)
    assert expected_log_prob(expanded.to_event(1), value).shape == (2,)


def test_plain_categorical_receiving_moments_points_to_the_right_class():
    with pytest.raises(MomentRuleError, match="MomentCategorical"):
        dist.Categorical(logits=Moments(torch.randn(3, 4), torch.rand(3, 4)))


def test_categorical_on_one_vector_of_logits_has_an_empty_batch_shape():
    logits = torch.tensor([0.5, -1.0, 2.0])
    d = MomentCategorical(logits=logits)
    assert d.batch_shape == () and d.probs.shape == (3,)
    torch.testing.assert_close(d.expected_log_prob(torch.tensor(2)), logits.log_softmax(-1)[2])


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="at least one dimension"):
        MomentCategorical(logits=torch.tensor(0.5))
    with pytest.raises(ValueError, match="logits must be finite"):
        MomentCategorical(logits=torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="scale"):
        MomentNormal(torch.zeros(2), -1.0, validate_args=True)
    d = MomentCategorical(logits=torch.zeros(2, 3), validate_args=True)
    with pytest.raises(ValueError, match="support"):
        d.expected_log_prob(torch.tensor([0, 5]))


def test_expected_log_prob_sees_through_mask_and_expand():
    # With variance in the logits, the predictive log_prob (what the wrappers' own log_prob
    # reaches) differs from the Jensen bound: the wrappers must not fall back to it.
    gen = torch.Generator().manual_seed(0)
    logits = Moments(torch.randn(4, 3, generator=gen), 0.5 + torch.rand(4, 3, generator=gen))
    d = MomentCategorical(logits=logits)
    y = torch.tensor([0, 2, 1, 1])
    bound = d.expected_log_prob(y)
    assert ((d.log_prob(y) - bound).abs() > 1e-3).all()
    mask = torch.tensor([True, False, True, False])
    torch.testing.assert_close(expected_log_prob(d.mask(mask), y), torch.where(mask, bound, 0.0))
    torch.testing.assert_close(expected_log_prob(d.mask(True), y), bound)
    torch.testing.assert_close(expected_log_prob(d.mask(False), y), torch.zeros(4))
    expanded = dist.ExpandedDistribution(d, (2, 4))
    torch.testing.assert_close(expected_log_prob(expanded, y), bound.expand(2, 4))
    torch.testing.assert_close(expected_log_prob(d.mask(mask).to_event(1), y), bound[mask].sum())


def test_expected_log_prob_refuses_an_unknown_wrapper_of_a_moment_likelihood():
    base = MomentNormal(Moments(torch.zeros(3), torch.ones(3)), 1.0)
    wrapped = dist.TransformedDistribution(base, [dist.transforms.AffineTransform(0.0, 2.0)])
    with pytest.raises(NotImplementedError, match="TransformedDistribution.*MomentNormal"):
        expected_log_prob(wrapped, torch.zeros(3))


def test_enumerate_support_lists_every_value_over_the_batch():
    bernoulli = MomentBernoulli(logits=Moments(torch.randn(2, 3), torch.rand(2, 3)))
    assert bernoulli.enumerate_support().shape == (2, 2, 3)
    torch.testing.assert_close(bernoulli.enumerate_support()[:, 1, 2], torch.tensor([0.0, 1.0]))
    compact = bernoulli.enumerate_support(expand=False)
    assert compact.shape == (2, 1, 1)
    torch.testing.assert_close(compact.flatten(), torch.tensor([0.0, 1.0]))
    categorical = MomentCategorical(logits=Moments(torch.randn(2, 4), torch.rand(2, 4)))
    assert categorical.enumerate_support().shape == (4, 2)
    assert categorical.enumerate_support(expand=False).shape == (4, 1)


def test_bernoulli_predictive_log_prob_is_the_log_of_its_probs():
    # Under variance the predictive uses the probit-scaled logit, not the mean logit.
    logits = Moments(torch.randn(5, dtype=torch.float64), 1 + torch.rand(5, dtype=torch.float64))
    d = MomentBernoulli(logits=logits)
    ones, zeros = torch.ones(5, dtype=torch.float32), torch.zeros(5, dtype=torch.float32)
    torch.testing.assert_close(d.log_prob(ones), d.probs.log())  # float32 labels accepted
    torch.testing.assert_close(d.log_prob(zeros), (1 - d.probs).log())


VALIDATED = {  # a likelihood of batch shape (3,) and a value outside its support
    "bernoulli": (
        lambda check: MomentBernoulli(Moments(torch.randn(3), torch.rand(3)), check),
        torch.tensor([0.5, 0.5, 0.5]),  # not a boolean
    ),
    "categorical": (
        lambda check: MomentCategorical(Moments(torch.randn(3, 2), torch.rand(3, 2)), check),
        torch.tensor([0.5, 0.5, 0.5]),  # not a class index
    ),
    "normal": (
        lambda check: MomentNormal(Moments(torch.randn(3), torch.rand(3)), 1.0, check),
        torch.tensor([0.0, math.nan, 1.0]),  # not a real number
    ),
}


@pytest.mark.parametrize("kind", list(VALIDATED))
def test_validate_args_is_kept_through_expand(kind):
    make, bad = VALIDATED[kind]
    assert make(False).expected_log_prob(bad).shape == (3,)
    with pytest.raises(ValueError, match="support"):
        make(True).expected_log_prob(bad)
    checked = make(True).expand((4, 3))
    assert checked.batch_shape == (4, 3)
    with pytest.raises(ValueError, match="support"):
        checked.expected_log_prob(bad)


def test_bernoulli_batch_shape():
    d = MomentBernoulli(logits=Moments(torch.randn(3), torch.rand(3)))
    assert d.batch_shape == (3,)


@pytest.mark.parametrize(
    ("cls", "args"),
    [
        (MomentBernoulli, lambda: (Moments(torch.randn(3), torch.rand(3)),)),
        (MomentCategorical, lambda: (Moments(torch.randn(3, 4), torch.rand(3, 4)),)),
        (MomentNormal, lambda: (Moments(torch.randn(3), torch.rand(3)), 1.0)),
    ],
    ids=["bernoulli", "categorical", "normal"],
)
def test_expand_into_a_subclass_instance(cls, args):
    # torch's protocol: a subclass with its own __init__ hands its instance to expand.
    class Sub(cls):
        def __init__(self, *args):
            super().__init__(*args)

        def expand(self, batch_shape, _instance=None):
            new = self._get_checked_instance(Sub, _instance)
            return super().expand(batch_shape, _instance=new)

    expanded = Sub(*args()).expand((2, 3))
    assert type(expanded) is Sub and expanded.batch_shape == (2, 3)


def test_normal_scale_takes_the_locs_dtype_and_broadcasts_the_batch_shape():
    loc = Moments(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    d = MomentNormal(loc, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    assert d.batch_shape == (3,)
    assert MomentNormal(loc, 0.7).scale.dtype == torch.float64  # a Python float scale


def test_normal_validate_args_false_is_kept_through_expand():
    loc = Moments(torch.zeros(3), torch.ones(3))
    unchecked = MomentNormal(loc, -1.0, validate_args=False)
    assert unchecked.expand((2, 3)).batch_shape == (2, 3)


@pytest.mark.parametrize("var", [None, 0.5])
def test_predictive_probs_of_3d_logits_are_those_of_each_batch_entry(var):
    mean = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    logits = mean if var is None else Moments(mean, torch.full_like(mean, var))
    probs = MomentCategorical(logits=logits).probs
    # Each batch entry on its own (2-D logits) gives the same probabilities.
    for i in range(2):
        torch.testing.assert_close(probs[i], MomentCategorical(logits=logits[i]).probs)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))


def test_expected_log_prob_of_plain_and_wrapped_distributions():
    y = torch.tensor([0.3, -1.0, 2.0])
    plain = dist.Normal(torch.zeros(3), 2.0)
    torch.testing.assert_close(expected_log_prob(plain, y), plain.log_prob(y))
    d = MomentNormal(Moments(torch.zeros(3), torch.ones(3)), 0.5)
    # .to_event(0) sums nothing; an explicit ExpandedDistribution broadcasts the value's
    # leading dimensions.
    torch.testing.assert_close(expected_log_prob(dist.Independent(d, 0), y), d.expected_log_prob(y))
    wide = torch.stack([y, 2 * y])
    expanded = expected_log_prob(dist.ExpandedDistribution(d, (3,)), wide)
    torch.testing.assert_close(expanded, d.expected_log_prob(wide))
    # Around an event dimension, the value's event dims are not batch dims.
    events = expected_log_prob(dist.ExpandedDistribution(d.to_event(1), (2,)), wide)
    torch.testing.assert_close(events, d.expected_log_prob(wide).sum(-1))
    # A wrapper chain with no moment likelihood in it is the plain log_prob: log-normal.
    positive = y.exp()
    log_normal = -((y - 0.2) ** 2) / (2 * 0.7**2) - math.log(0.7 * math.sqrt(2 * math.pi)) - y
    torch.testing.assert_close(expected_log_prob(dist.LogNormal(0.2, 0.7), positive), log_normal)
    # Two wrappers deep, the moment likelihood is still found and the wrapper refused.
    transform = dist.transforms.AffineTransform(0.0, 2.0)
    nested = dist.TransformedDistribution(d.to_event(1), [transform])
    with pytest.raises(NotImplementedError, match="TransformedDistribution.*MomentNormal"):
        expected_log_prob(nested, y)
