"""Weight priors of quantized layers, built from the layer's *current* levels at every call.

A quantized layer (:class:`~pyro_bqn.QuantizedLinear`, :class:`~pyro_bqn.QuantizedConv2d`)
holds a *prior factory*: a callable that takes the layer's
:class:`~pyro_bqn.levels.LevelSet` and returns a distribution over its levels. The layer calls
it at every call, so a prior follows learnable levels as they move (a prior that kept a copy
of the levels would go stale after the first optimiser step). The factories here are small,
frozen and printable, and :func:`parse_prior` reads them from text (a command-line option):

* :class:`CategoricalPrior` — a categorical over the levels: uniform, or with a given mass on
  the level nearest zero (a sparsity prior for ternary weights);
* :class:`SpikeAndSlabPrior` — the multiple spike-and-slab prior of Bayesian asymmetric
  M-ary quantization (Chien & Chang, "Bayesian asymmetric quantized neural networks",
  *Pattern Recognition* 139, 2023): a spike at each level plus a broad zero-centred slab;
* :class:`DistributionPrior` — the weights of a given distribution, re-built on the current
  levels (what a layer does with ``prior=<a distribution>``);
* :class:`PerWeightCategoricalPrior` — a categorical of its own for every weight, held as
  buffers (so it follows ``model.to(...)`` and is saved by checkpoints): yesterday's posterior
  as today's prior in continual learning (:func:`pyro_bqn.infer.posterior_as_prior`), with
  :class:`NormalSitePrior`, its counterpart for a real-valued site such as a bias.

Any other callable ``levels -> distribution`` works too, and a subclass of the layer can
override :meth:`~pyro_bqn.nn.quantized_layer.QuantizedLayer.weight_prior` instead.

Usage::

    >>> from pyro_bqn import QuantizedLinear, levels, priors
    >>> prior = priors.parse_prior("spike-and-slab:slab_prob=0.05,spike_scale=0.02")
    >>> layer = QuantizedLinear(4, 3, levels=levels.learnable([-1, -0.2, 0.4, 1.2]), prior=prior)
    >>> prior.to_spec()
    'spike-and-slab:slab_prob=0.05,slab_scale=1.0,spike_scale=0.02'
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeAlias

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin

from pyro_bqn.distributions.multiple_spike_and_slab import MultipleSpikeAndSlab
from pyro_bqn.distributions.quantized_categorical import QuantizedCategorical
from pyro_bqn.distributions.wrappers import base_distribution
from pyro_bqn.levels import LevelSet

__all__ = [
    "CategoricalPrior",
    "DistributionPrior",
    "NormalSitePrior",
    "PerWeightCategoricalPrior",
    "PriorFactory",
    "SpikeAndSlabPrior",
    "as_prior_factory",
    "check_floor",
    "check_strength",
    "base_distribution",
    "parse_prior",
]

#: A weight prior as a function of the layer's level set: returns a distribution over
#: ``levels`` whose batch shape broadcasts to the weight's shape (usually ``()``).
PriorFactory: TypeAlias = Callable[[LevelSet], TorchDistributionMixin]


def _probability(name: str, value: float, upper_open: bool = True) -> float:
    value = float(value)
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {bound}, got {value}")
    return value


def _spec(name: str, prior: Any) -> str:
    values = ",".join(
        f"{field.name}={getattr(prior, field.name)}"
        for field in fields(prior)
        if getattr(prior, field.name) is not None
    )
    return f"{name}:{values}" if values else name


@dataclass(frozen=True)
class CategoricalPrior:
    """A categorical prior over the levels: uniform, or ``zero_mass`` on the level nearest
    zero and the rest shared equally by the others.

    :param zero_mass: the prior probability of the level nearest zero (of the current
        levels, so it may change with learnable levels), in ``[0, 1)``; ``None`` for the
        uniform prior.
    """

    zero_mass: float | None = None

    def __post_init__(self) -> None:
        if self.zero_mass is not None:
            object.__setattr__(self, "zero_mass", _probability("zero_mass", self.zero_mass))

    def __call__(self, levels: LevelSet) -> QuantizedCategorical:
        """The prior on ``levels``: a scalar-batch
        :class:`~pyro_bqn.distributions.QuantizedCategorical`."""
        values = levels.values.detach()
        if self.zero_mass is None:
            # Zero logits are valid by construction; validating would cost more than this.
            return QuantizedCategorical(levels, logits=values.new_zeros(values.shape),
                                        validate_args=False)
        others = (1.0 - self.zero_mass) / (values.shape[0] - 1)
        probs = values.new_full(values.shape, others)
        probs[values.abs().argmin()] = self.zero_mass
        return QuantizedCategorical(levels, probs=probs, validate_args=False)

    def to_spec(self) -> str:
        """The text :func:`parse_prior` reads back into this prior."""
        return _spec("categorical", self)


@dataclass(frozen=True)
class SpikeAndSlabPrior:
    """The multiple spike-and-slab prior with equal spike weights:
    ``p(w) = sum_k (1 - slab_prob) / K * spike_k(w) + slab_prob * N(w; 0, slab_scale^2)``
    (see :class:`~pyro_bqn.distributions.MultipleSpikeAndSlab`).

    With a categorical posterior only the spikes' weights enter the KL (a warning says so);
    the slab and the spike width change the objective with the spike-and-slab posterior of
    :class:`~pyro_bqn.AutoQuantizedGuide` (``posterior="spike-and-slab"``).

    :param slab_prob: the slab's weight ``pi_0``, in ``[0, 1)``.
    :param slab_scale: the slab's standard deviation, positive.
    :param spike_scale: the spikes' standard deviation: ``0`` for point masses, or positive.
    """

    slab_prob: float = 0.05
    slab_scale: float = 1.0
    spike_scale: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "slab_prob", _probability("slab_prob", self.slab_prob))
        for name in ("slab_scale", "spike_scale"):
            value = float(getattr(self, name))
            minimum_ok = value > 0 if name == "slab_scale" else value >= 0
            if not (math.isfinite(value) and minimum_ok):
                sign = "positive" if name == "slab_scale" else "non-negative"
                raise ValueError(f"{name} must be finite and {sign}, got {value}")
            object.__setattr__(self, name, value)

    def __call__(self, levels: LevelSet) -> MultipleSpikeAndSlab:
        """The prior on ``levels``: a scalar-batch
        :class:`~pyro_bqn.distributions.MultipleSpikeAndSlab`."""
        # The fields were checked at construction; re-checking every call costs syncs.
        return MultipleSpikeAndSlab.with_uniform_spikes(
            levels, self.slab_prob, self.slab_scale, self.spike_scale, validate_args=False
        )

    def to_spec(self) -> str:
        """The text :func:`parse_prior` reads back into this prior."""
        return _spec("spike-and-slab", self)


class DistributionPrior:
    """The weights of a given distribution over levels, re-built on the layer's current
    levels at every call (with the levels' dtype and device).

    :param distribution: a :class:`~pyro_bqn.distributions.QuantizedCategorical` or
        :class:`~pyro_bqn.distributions.MultipleSpikeAndSlab` with a scalar batch shape (a
        ``.expand`` or ``.to_event`` of one is unwrapped). Its weights are copied, without
        gradient: for a prior with learned weights, override
        :meth:`~pyro_bqn.nn.quantized_layer.QuantizedLayer.weight_prior`.
    :raises ValueError: for anything else.
    """

    def __init__(self, distribution: TorchDistributionMixin) -> None:
        base = base_distribution(distribution)
        if not hasattr(base, "batch_shape") or base.batch_shape.numel() != 1:
            raise ValueError("prior must be a distribution with a scalar batch shape")
        if not isinstance(base, QuantizedCategorical | MultipleSpikeAndSlab):
            raise ValueError(
                f"prior must be a distribution over levels (QuantizedCategorical or "
                f"MultipleSpikeAndSlab), got {type(base).__name__}"
            )
        #: The level set (or values) the distribution was declared on.
        self.levels: LevelSet | torch.Tensor = (
            base.level_set if base.level_set is not None else base.levels.detach().clone()
        )
        num_levels = base.levels.shape[0]
        if isinstance(base, QuantizedCategorical):
            self._kind = QuantizedCategorical
            self._weights = {"probs": base.probs.detach().reshape(num_levels)}
        else:
            self._kind = MultipleSpikeAndSlab
            self._weights = {
                "spike_probs": base.spike_probs.detach().reshape(num_levels),
                "slab_prob": base.slab_prob.detach().reshape(()),
                "slab_scale": base.slab_scale.detach().reshape(()),
                "spike_scale": base.spike_scale.detach().reshape(()),
                "slab_loc": base.slab_loc.detach().reshape(()),
            }

    def __call__(self, levels: LevelSet) -> QuantizedCategorical | MultipleSpikeAndSlab:
        """The distribution's weights on ``levels`` (which must have as many values)."""
        like = levels.values.detach()
        weights = {key: value.to(like) for key, value in self._weights.items()}
        # The weights were checked when the distribution was built.
        return self._kind(levels, **weights, validate_args=False)

    def __repr__(self) -> str:
        weights = {key: value.tolist() for key, value in self._weights.items()}
        return f"DistributionPrior({self._kind.__name__}, {weights})"


def check_strength(strength: float) -> None:
    """:raises ValueError: unless ``strength`` (a prior's tempering) is a finite number > 0."""
    number = isinstance(strength, int | float) and not isinstance(strength, bool)
    if not (number and math.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a finite number > 0, got {strength!r}")


def check_floor(floor: float) -> None:
    """:raises ValueError: unless ``floor`` (a prior's uniform share) lies in ``(0, 1)``."""
    number = isinstance(floor, int | float) and not isinstance(floor, bool)
    if not (number and 0 < floor < 1):
        raise ValueError(f"floor must be a number in (0, 1), got {floor!r}")


class PerWeightCategoricalPrior(torch.nn.Module):
    r"""A categorical prior of its own for every weight: ``p(w = v_k) = softmax(logits)_k``
    per weight, on the layer's current levels.

    The log-probabilities are a buffer, ``logits`` of shape ``(K,) + weight_shape``
    (level-major, as :class:`~pyro_bqn.AutoQuantizedGuide` stores its posterior logits), so
    the prior moves with ``model.to(...)`` and is saved and restored by
    :func:`~pyro_bqn.save_checkpoint` / :func:`~pyro_bqn.load_checkpoint` with the model's
    other buffers. Set it as a layer's prior factory (``layer.prior = ...``); it is what
    :func:`~pyro_bqn.infer.posterior_as_prior` does. Its KL to the guide's categorical
    posterior is the analytic ``sum_k q_k log(q_k / p_k)``, term by term per weight.

    Usage::

        >>> import torch
        >>> from pyro_bqn import QuantizedLinear, levels
        >>> layer = QuantizedLinear(4, 3, levels=levels.binary())
        >>> posterior = torch.log_softmax(torch.randn(2, 3, 4), 0)  # (K,) + weight shape
        >>> layer.prior = PerWeightCategoricalPrior.from_posterior(posterior, floor=1e-3)
        >>> layer.weight_prior(layer.levels).batch_shape
        torch.Size([3, 4])

    :param logits: log-probabilities (or unnormalised logits) of the levels, shape
        ``(K,) + weight_shape``; copied.
    """

    logits: torch.Tensor

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[0] < 2:
            raise ValueError(
                "logits must be a tensor of shape (K,) + weight_shape with K >= 2 levels, got "
                + (str(tuple(logits.shape)) if isinstance(logits, torch.Tensor) else
                   type(logits).__name__)
            )
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits must be finite (a floor keeps every level possible)")
        self.register_buffer("logits", logits.detach().clone())

    @classmethod
    def from_posterior(
        cls, log_probs: torch.Tensor, strength: float = 1.0, floor: float = 1e-3
    ) -> PerWeightCategoricalPrior:
        r"""The prior ``p = (1 - floor) q_s + floor / K`` from a posterior ``q`` with
        log-probabilities ``log_probs`` (shape ``(K,) + weight_shape``), where
        ``q_s ∝ q^strength`` is the posterior tempered by ``strength``.

        * ``strength`` multiplies the posterior's natural parameters (its log-probabilities):
          ``1`` keeps it, ``< 1`` flattens it towards the uniform prior (a weaker memory of
          the past task), ``> 1`` sharpens it (as BayesBiNN's prior ``lambda_0`` scaled).
        * ``floor`` mixes in that share of the uniform prior, so every level keeps prior
          probability ``>= floor / K``. Without it a level the posterior has ruled out (a
          probability that is 0, or underflows to 0 in float32 for logits ~100 apart) would
          make ``KL(q' || p)`` infinite for any next posterior ``q'`` that gives it mass: the
          next task could never move that weight, and the loss would be ``inf``. With it the
          KL of one weight is at most ``log(K / floor)`` (7.6 nats for binary weights at the
          default ``1e-3``), a finite price for evidence to overturn.

        :raises ValueError: for ``strength <= 0``, ``floor`` outside ``(0, 1)`` or
            non-finite ``log_probs`` where they are not ``-inf``.
        """
        check_strength(strength)
        check_floor(floor)
        if torch.isnan(log_probs).any() or (log_probs == math.inf).any():
            raise ValueError("log_probs must not hold NaN or +inf")
        tempered = torch.log_softmax(strength * log_probs.detach(), dim=0)
        num_levels = log_probs.shape[0]
        floored = torch.logaddexp(
            tempered + math.log1p(-floor),
            torch.full_like(tempered, math.log(floor / num_levels)),
        )
        return cls(floored)

    def forward(self, levels: LevelSet) -> QuantizedCategorical:
        """The prior on ``levels``: a :class:`~pyro_bqn.distributions.QuantizedCategorical`
        with batch shape ``weight_shape``."""
        if levels.num_levels != self.logits.shape[0]:
            raise ValueError(
                f"PerWeightCategoricalPrior holds {self.logits.shape[0]} levels, the layer has "
                f"{levels.num_levels}"
            )
        # The logits were checked finite when the prior was built.
        return QuantizedCategorical(levels, logits=self.logits.movedim(0, -1), validate_args=False)

    def extra_repr(self) -> str:
        return f"levels={self.logits.shape[0]}, weight_shape={tuple(self.logits.shape[1:])}"


class NormalSitePrior(torch.nn.Module):
    """``Normal(loc, scale).to_event(event_dim)``, a prior of a real-valued site (e.g. a
    bias) whose ``loc`` and ``scale`` are buffers, so it moves with the model and is saved
    by checkpoints.

    Called with the module that owns the site (the convention of
    :class:`pyro.nn.PyroSample` for a prior that is a function): register it on that module
    and declare ``module.<site> = PyroSample(prior)`` (what
    :func:`~pyro_bqn.infer.posterior_as_prior` does).

    :param loc: the means, the site's shape.
    :param scale: the standard deviations, positive, the site's shape.
    :param event_dim: how many trailing dimensions are one event.
    """

    loc: torch.Tensor
    scale: torch.Tensor

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, event_dim: int) -> None:
        super().__init__()
        if loc.shape != scale.shape or not bool((scale > 0).all()):
            raise ValueError(
                f"loc and scale must have one shape and scale must be positive, got shapes "
                f"{tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        if not 0 <= event_dim <= loc.dim():
            raise ValueError(f"event_dim must be in [0, {loc.dim()}], got {event_dim}")
        self.event_dim = event_dim
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale", scale.detach().clone())

    @classmethod
    def from_posterior(
        cls, loc: torch.Tensor, scale: torch.Tensor, event_dim: int, strength: float = 1.0
    ) -> NormalSitePrior:
        """The posterior ``Normal(loc, scale)`` tempered by ``strength``: its natural
        parameters (precision and precision times mean) multiplied by ``strength``, i.e.
        ``Normal(loc, scale / sqrt(strength))``."""
        check_strength(strength)
        return cls(loc, scale / math.sqrt(strength), event_dim)

    def forward(self, module: torch.nn.Module | None = None) -> TorchDistributionMixin:
        """The prior (``module``, the site's owner, is not needed)."""
        return dist.Normal(self.loc, self.scale, validate_args=False).to_event(self.event_dim)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.loc.shape)}, event_dim={self.event_dim}"


def as_prior_factory(prior: TorchDistributionMixin | PriorFactory | None) -> PriorFactory:
    """The factory a layer calls for ``prior``: ``None`` is the uniform
    :class:`CategoricalPrior`, a distribution a :class:`DistributionPrior`, and any other
    callable is used as it is.

    :raises ValueError: if ``prior`` is neither.
    """
    if prior is None:
        return CategoricalPrior()
    if isinstance(prior, torch.distributions.Distribution):
        return DistributionPrior(prior)
    if callable(prior):
        return prior
    raise ValueError(
        "prior must be a distribution over levels or a callable levels -> distribution, "
        f"got {type(prior).__name__}"
    )


_PRIORS: dict[str, type] = {"categorical": CategoricalPrior, "spike-and-slab": SpikeAndSlabPrior}


def parse_prior(text: str) -> CategoricalPrior | SpikeAndSlabPrior:
    """A prior factory from text, e.g. a command-line option: the inverse of ``to_spec``.

    ``categorical`` (uniform), ``categorical:zero_mass=0.5``, ``spike-and-slab`` (the
    defaults of :class:`SpikeAndSlabPrior`) or
    ``spike-and-slab:slab_prob=0.05,slab_scale=1.0,spike_scale=0.02`` (any subset of the
    fields, comma-separated).

    :raises ValueError: naming the accepted forms, fields or the bad value.
    """
    name, _, arguments = text.strip().lower().partition(":")
    kind = _PRIORS.get(name.strip())
    if kind is None:
        raise ValueError(
            f"prior must be one of {sorted(_PRIORS)}, optionally followed by ':field=value,...', "
            f"got {text!r}"
        )
    allowed = [field.name for field in fields(kind)]
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in arguments.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or key not in allowed:
            raise ValueError(f"prior {name}: fields are {allowed} as field=value, got {item!r}")
        try:
            values[key] = float(value)
        except ValueError:
            raise ValueError(f"prior {name}: {key} must be a number, got {value!r}") from None
    return kind(**values)
