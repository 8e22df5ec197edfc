"""Distribution fixtures for the conformance suite, in the style of Pyro's own
``tests/distributions/conftest.py``.

A test takes the argument ``case`` to run once per :class:`Fixture`; the marker
``@pytest.mark.cases("flag")`` keeps only the fixtures whose ``flag`` attribute is true.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from pyro.distributions import TorchDistribution

from pyro_bqn import levels
from pyro_bqn.distributions import (
    MultipleSpikeAndSlab,
    QuantizedCategorical,
    RelaxedQuantizedCategorical,
    RelaxedQuantizedCategoricalStraightThrough,
)

ASYMMETRIC = [-0.7, 0.1, 0.4, 1.3]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _spike_probs(batch_shape: tuple[int, ...], k: int, slab_prob: float, seed: int):
    return (1 - slab_prob) * torch.softmax(_randn(*batch_shape, k, seed=seed), -1)


@dataclass(frozen=True)
class Fixture:
    """One distribution under test.

    :param name: test id.
    :param make: builds the distribution; takes ``validate_args``.
    :param batch_shape: the batch shape ``make`` must produce.
    :param bad_value: a value outside the support (rejected under validation).
    :param enumerable: the distribution is exactly discrete, with ``enumerate_support``.
    :param moments: it has ``mean`` and ``variance`` (and a fourth central moment).
    :param prior: builds a prior on the same levels, for KL checks (``None``: no
        registered KL).
    """

    name: str
    make: Callable[..., TorchDistribution]
    batch_shape: tuple[int, ...]
    bad_value: float
    enumerable: bool = False
    moments: bool = True
    prior: Callable[[], TorchDistribution] | None = None

    @staticmethod
    def fourth_central_moment(d: TorchDistribution) -> torch.Tensor:
        return fourth_central_moment(d)

    @property
    def has_kl(self) -> bool:
        return self.prior is not None

    @property
    def relaxed(self) -> bool:
        return self.make().has_rsample

    def __str__(self) -> str:
        return self.name


def _uniform_prior(level_set: levels.LevelSet | torch.Tensor) -> Callable[[], TorchDistribution]:
    values = level_set.values if isinstance(level_set, levels.LevelSet) else level_set
    return lambda: QuantizedCategorical(level_set, logits=torch.zeros(values.shape[0]))


def _spike_and_slab_prior(level_set: levels.LevelSet) -> Callable[[], TorchDistribution]:
    return lambda: MultipleSpikeAndSlab.with_uniform_spikes(level_set, 0.25, 2.0)


def _quantized(name, level_set, batch_shape, seed, use_probs=False, prior=None) -> Fixture:
    k = level_set.num_levels
    logits = _randn(*batch_shape, k, seed=seed)

    def make(validate_args=None):
        if use_probs:
            return QuantizedCategorical(level_set, probs=logits.softmax(-1),
                                        validate_args=validate_args)
        return QuantizedCategorical(level_set, logits=logits, validate_args=validate_args)

    return Fixture(name, make, batch_shape, bad_value=0.5 * (level_set.values[0].item()
                                                             + level_set.values[1].item()),
                   enumerable=True, prior=prior or _uniform_prior(level_set))


def _spike_and_slab(name, level_set, batch_shape, seed, spike_scale) -> Fixture:
    probs = _spike_probs(batch_shape, level_set.num_levels, 0.2, seed)
    slab_scale = 0.5 + _randn(*batch_shape, seed=seed + 1).abs()

    def make(validate_args=None):
        return MultipleSpikeAndSlab(level_set, probs, 0.2, slab_scale, spike_scale,
                                    validate_args=validate_args)

    return Fixture(name, make, batch_shape, bad_value=float("nan"))


_TERNARY = levels.ternary()
_LEARNABLE = levels.learnable([-1.2, -0.1, 0.3, 0.9])

FIXTURES = [
    _quantized("qc-binary", levels.binary(), (), seed=0),
    _quantized("qc-ternary", _TERNARY, (3,), seed=1,
               prior=_spike_and_slab_prior(_TERNARY)),
    _quantized("qc-uniform2-probs", levels.uniform(2), (2, 3), seed=2, use_probs=True),
    _quantized("qc-asymmetric", levels.from_values(ASYMMETRIC), (4,), seed=3),
    _quantized("qc-learnable", _LEARNABLE, (2,), seed=4),
    _spike_and_slab("mss-point-mass", _TERNARY, (3,), seed=5, spike_scale=0.0),
    _spike_and_slab("mss-gaussian-spikes", levels.uniform(2), (2,), seed=6, spike_scale=0.05),
    Fixture(
        "mss-uniform-spikes",
        lambda validate_args=None: MultipleSpikeAndSlab.with_uniform_spikes(
            levels.binary(), 0.3, 1.5, validate_args=validate_args),
        (),
        bad_value=float("nan"),
    ),
    Fixture(
        "straight-through-ternary",
        lambda validate_args=None: RelaxedQuantizedCategoricalStraightThrough(
            _TERNARY, 0.5, logits=_randn(3, 3, seed=7), validate_args=validate_args),
        (3,),
        bad_value=0.5,
        enumerable=True,
        prior=_uniform_prior(_TERNARY),
    ),
    Fixture(
        "relaxed-ternary",
        lambda validate_args=None: RelaxedQuantizedCategorical(
            _TERNARY, 0.5, logits=_randn(3, 3, seed=8), validate_args=validate_args),
        (3,),
        bad_value=1.5,
        moments=False,
    ),
    Fixture(
        # temperature (2, 1) broadcasts against logits (3, 4): batch (2, 3)
        "relaxed-asymmetric-broadcast",
        lambda validate_args=None: RelaxedQuantizedCategorical(
            torch.tensor(ASYMMETRIC), torch.tensor([[0.3], [1.0]]),
            logits=_randn(3, 4, seed=9), validate_args=validate_args),
        (2, 3),
        bad_value=-1.0,
        moments=False,
    ),
]


def fourth_central_moment(d: TorchDistribution) -> torch.Tensor:
    """``E[(w - E w)^4]``, shape ``batch_shape``, for the distributions of :data:`FIXTURES`."""
    centred = d.levels - d.mean.unsqueeze(-1)
    if isinstance(d, QuantizedCategorical):
        return (d.probs * centred.pow(4)).sum(-1)
    # E[(c + s e)^4] = c^4 + 6 c^2 s^2 + 3 s^4 for e ~ N(0, 1): once per spike (centred at
    # v_k - m) and for the slab (centred at -m).
    s2 = d.spike_scale.unsqueeze(-1).square()
    spikes = (d.spike_probs * (centred.pow(4) + 6 * centred.square() * s2 + 3 * s2.square()))
    m2, slab2 = d.mean.square(), d.slab_scale.square()
    slab = d.slab_prob * (m2.square() + 6 * m2 * slab2 + 3 * slab2.square())
    return spikes.sum(-1) + slab


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cases(flag): run only on the distribution fixtures whose flag is true"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    cases = FIXTURES
    for marker in metafunc.definition.iter_markers("cases"):
        cases = [case for case in cases if all(getattr(case, flag) for flag in marker.args)]
    metafunc.parametrize("case", cases, ids=str)
