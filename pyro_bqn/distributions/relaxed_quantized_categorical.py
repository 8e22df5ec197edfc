"""Gumbel-softmax (Concrete) relaxations of :class:`QuantizedCategorical`, for sampling
baselines that train a quantized network with :class:`~pyro.infer.Trace_ELBO`.

Both distributions draw ``y = softmax((logits + g) / temperature)`` with ``g_k`` iid
standard Gumbel, and return a :class:`~pyro_bqn.distributions.RelaxedLevelValue` that
carries ``y`` next to the level value. Their ``log_prob`` and that of a
:class:`QuantizedCategorical` (or :class:`MultipleSpikeAndSlab`) prior read the carried
``y``: at a guide site, Trace_ELBO's ``log p(w) - log q(w)`` becomes
``sum_k y_k (log p_k - log q_k)``, a relaxed single-sample estimate of ``-KL(q || p)``
that is exact at one-hot ``y`` (the straight-through variant always; the relaxed one as
the temperature drops). Since ``argmax_k y_k = argmax_k (logits_k + g_k)`` is distributed
as ``Categorical(logits)`` at any temperature (the Gumbel-max trick), the level picked
out by the one-hot is an exact posterior sample.

References: Maddison, Mnih, Teh, *The Concrete Distribution* (2017); Jang, Gu, Poole,
*Categorical Reparameterization with Gumbel-Softmax* (2017).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.util import broadcast_shape
from torch.distributions.utils import clamp_probs

from pyro_bqn.distributions.quantized_categorical import (
    HoldsLevelSet,
    QuantizedCategorical,
    resolve_levels,
)
from pyro_bqn.distributions.relaxed_value import RelaxedLevelValue, soft_onehot_of
from pyro_bqn.levels import LevelSet

__all__ = ["RelaxedQuantizedCategorical", "RelaxedQuantizedCategoricalStraightThrough"]


_NO_CLOSED_FORM = (
    "RelaxedQuantizedCategorical has no closed-form {} (that of a Concrete one-hot is an "
    "integral without one); the exact categorical it relaxes is its .quantized"
)


def _check_temperature(temperature: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)
    if not bool((t > 0).all()):
        shown = t.detach().flatten()[:5].tolist()
        raise ValueError(f"temperature must be positive (and not NaN), got {shown}")
    return t


def _batch_params(
    levels: torch.Tensor,
    temperature: float | torch.Tensor,
    logits: torch.Tensor | None,
    probs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Broadcast ``temperature`` and the categorical parameters to a common batch shape."""
    params = logits if logits is not None else probs
    if params is None or (logits is not None and probs is not None):
        raise ValueError("a relaxed quantized categorical needs exactly one of logits or probs")
    temperature = _check_temperature(temperature, params)
    num_levels = levels.shape[0]
    if params.dim() < 1 or params.shape[-1] != num_levels:
        raise ValueError(
            f"{'logits' if logits is not None else 'probs'} must have last dimension "
            f"K={num_levels} (one entry per level), got shape {tuple(params.shape)}"
        )
    batch_shape = torch.Size(broadcast_shape(temperature.shape, params.shape[:-1]))
    params = params.expand(batch_shape + (num_levels,))
    temperature = temperature.expand(batch_shape)
    return (temperature, params, None) if logits is not None else (temperature, None, params)


def _gumbel_softmax(
    logits: torch.Tensor, temperature: torch.Tensor, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(y, index)``: the relaxed one-hot, shape ``shape + (K,)``, and the index of
    its largest entry, shape ``shape``."""
    uniforms = clamp_probs(torch.rand(shape + logits.shape[-1:], dtype=logits.dtype,
                                      device=logits.device))
    scores = logits - (-uniforms.log()).log()
    # Argmax of the scores, not of y: softmax can round near-ties at low temperature.
    return torch.softmax(scores / temperature.unsqueeze(-1), dim=-1), scores.argmax(-1)


class RelaxedQuantizedCategorical(HoldsLevelSet, TorchDistribution):
    r"""A Gumbel-softmax relaxation of :class:`QuantizedCategorical`.

    :meth:`rsample` draws ``y = softmax((logits + g) / temperature)`` (``g_k`` iid standard
    Gumbel) and returns ``RelaxedLevelValue.wrap(y @ levels, y)``: the value ``sum_k y_k v_k``
    lies in ``[v_1, v_K]`` and is differentiable in ``logits`` (and in learnable levels).

    :meth:`log_prob` is *not* the Concrete density. For a value carrying its one-hot ``y`` it
    is ``sum_k y_k log q_k``; this pairs with the prior's ``log_prob`` (``sum_k y_k log p_k``),
    so that Trace_ELBO's ``log p - log q`` at this site is the relaxed single-sample KL
    estimate ``sum_k y_k log(p_k / q_k)``, exact at one-hot values. Do not use it where a
    normalised density is needed (importance weights, model comparison, goodness-of-fit).

    Any torch operation on a sample (``clone``, ``reshape``, ``detach``, ``x * 1``, Pyro's
    generic ``expand``) returns a plain tensor without the one-hot. A plain value ``x`` of the
    support ``[v_1, v_K]`` is read as the one-hot on its two neighbouring levels that gives
    it: for ``v_k <= x <= v_{k+1}``, ``y_k = (v_{k+1} - x) / (v_{k+1} - v_k)`` and
    ``y_{k+1} = 1 - y_k``. So ``log_prob`` is finite on all of the support and, between the
    carried one-hots, piecewise linear in ``x`` through ``(v_k, log q_k)``: ``log q_k`` at a
    level ``v_k``, as for the categorical. ``support.check(x)`` and ``log_prob(x)`` agree.

    :attr:`mean`, :attr:`variance` and :meth:`entropy` raise ``NotImplementedError``: the
    mean of a Concrete one-hot ``E[y_k]`` has no closed form (Maddison et al. 2017), nor has
    the entropy. The exact categorical the relaxation approaches as the temperature drops
    (and whose samples the carried one-hot's argmax is) is :attr:`quantized`.

    :param levels: a :class:`~pyro_bqn.levels.LevelSet` or a strictly increasing ``(K,)``
        tensor; a learnable level set is read once, at construction.
    :param temperature: positive float or tensor broadcastable to ``batch_shape``; the
        relaxation tightens as it drops.
    :param logits: unnormalised log-probabilities, shape ``batch_shape + (K,)``.
    :param probs: probabilities summing to one, shape ``batch_shape + (K,)``.

    ``batch_shape = broadcast(temperature.shape, logits.shape[:-1])``, ``event_shape = ()``;
    ``rsample(sample_shape)`` has shape ``sample_shape + batch_shape`` and carries a one-hot
    of shape ``sample_shape + batch_shape + (K,)``.
    """

    arg_constraints = {
        "levels": constraints.ordered_vector,
        "logits": constraints.real_vector,
        "probs": constraints.simplex,
        "temperature": constraints.positive,
    }
    has_rsample = True

    def __init__(
        self,
        levels: LevelSet | torch.Tensor,
        temperature: float | torch.Tensor,
        logits: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        values, _ = resolve_levels(levels)
        self.temperature, logits, probs = _batch_params(values, temperature, logits, probs)
        self._quantized = QuantizedCategorical(levels, logits, probs, validate_args)
        self.levels, self.level_set = self._quantized.levels, self._quantized.level_set
        super().__init__(self._quantized.batch_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self) -> constraints.Constraint:
        return constraints.interval(self.levels[0], self.levels[-1])

    @property
    def logits(self) -> torch.Tensor:
        """Normalised log-probabilities, shape ``batch_shape + (K,)``."""
        return self._quantized.logits

    @property
    def probs(self) -> torch.Tensor:
        """Probabilities, shape ``batch_shape + (K,)``."""
        return self._quantized.probs

    @property
    def num_levels(self) -> int:
        return self.levels.shape[0]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(RelaxedQuantizedCategorical, _instance)
        batch_shape = torch.Size(batch_shape)
        new.temperature = self.temperature.expand(batch_shape)
        new._quantized = self._quantized.expand(batch_shape)
        new.levels, new.level_set = self.levels, self.level_set
        super(RelaxedQuantizedCategorical, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: tuple[int, ...] | torch.Size = ()) -> RelaxedLevelValue:
        shape = self._extended_shape(sample_shape)
        y, _ = _gumbel_softmax(self.logits, self.temperature, shape)
        value = y @ self.levels
        # y sums to one only up to rounding, which can push the value a hair outside
        # [v_1, v_K]: clamp the forward value, keep the gradient of the unclamped one.
        clamped = value.detach().clamp(self.levels[0].detach(), self.levels[-1].detach())
        return RelaxedLevelValue.wrap(clamped + (value - value.detach()), y)

    @property
    def quantized(self) -> QuantizedCategorical:
        """The exact categorical ``QuantizedCategorical(levels, logits)`` this relaxes."""
        return self._quantized

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``sum_k y_k log q_k`` for a value carrying ``y``; for a plain value, with ``y`` its
        two-level one-hot (see the class docstring): ``log q_k`` at a level ``v_k``, linear
        in between. Shape ``broadcast(value.shape, batch_shape)``.

        :raises ValueError: under validation, if a plain value is outside ``[v_1, v_K]``
            (without validation, it is read as the nearer end).
        """
        if soft_onehot_of(value) is not None:
            return self._quantized.log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        soft = self._two_level_onehot(value)
        # Zero weights contribute nothing, also where log q_k = -inf.
        return torch.where(soft > 0, soft * self.logits, soft.new_zeros(())).sum(-1)

    def _two_level_onehot(self, value: torch.Tensor) -> torch.Tensor:
        """The one-hot on the two levels around each entry, shape ``value.shape + (K,)``;
        entries outside ``[v_1, v_K]`` are clamped to it."""
        levels = self.levels
        value = value.to(levels.dtype).clamp(levels[0], levels[-1])
        # lower: k with v_k <= x <= v_{k+1}, in 0..K-2.
        lower = torch.bucketize(value.detach().contiguous(), levels[1:-1].detach())
        below, above = levels[lower], levels[lower + 1]
        upper_weight = ((value - below) / (above - below)).unsqueeze(-1)
        k = self.num_levels
        return (1 - upper_weight) * F.one_hot(lower, k) + upper_weight * F.one_hot(lower + 1, k)

    @property
    def mean(self) -> torch.Tensor:
        """Not implemented: ``E[y]`` of a Concrete one-hot has no closed form."""
        raise NotImplementedError(_NO_CLOSED_FORM.format("mean"))

    @property
    def variance(self) -> torch.Tensor:
        """Not implemented: ``E[y]`` of a Concrete one-hot has no closed form."""
        raise NotImplementedError(_NO_CLOSED_FORM.format("variance"))

    def entropy(self) -> torch.Tensor:
        """Not implemented: the Concrete distribution's entropy has no closed form."""
        raise NotImplementedError(_NO_CLOSED_FORM.format("entropy"))


class RelaxedQuantizedCategoricalStraightThrough(QuantizedCategorical):
    r"""A :class:`QuantizedCategorical` whose :meth:`rsample` is a straight-through
    Gumbel-softmax estimator.

    The forward value is the exact level ``v_k`` with ``k = argmax_k y_k``, so samples are
    distributed exactly as ``QuantizedCategorical(levels, logits)`` (the Gumbel-max trick),
    and ``mean``, ``variance``, ``enumerate_support`` and the KL registrations are those of
    the categorical. The gradient is that of the relaxed sample: the value is
    ``v_k + (s - s.detach())`` with ``s = y @ levels.detach()``, and the carried one-hot is
    ``e_k + (y - y.detach())``. A prior's ``log_prob`` of the sample is therefore finite and
    exactly ``log p_k``; :meth:`log_prob` here gives ``log q_k`` (``sum_k y_k log q_k`` with
    the carried one-hot, equal in value).

    :param levels: a :class:`~pyro_bqn.levels.LevelSet` or a strictly increasing ``(K,)``
        tensor; a learnable level set is read once, at construction.
    :param temperature: positive float or tensor broadcastable to ``batch_shape``; it only
        shapes the gradient.
    :param logits: unnormalised log-probabilities, shape ``batch_shape + (K,)``.
    :param probs: probabilities summing to one, shape ``batch_shape + (K,)``.

    ``batch_shape = broadcast(temperature.shape, logits.shape[:-1])``, ``event_shape = ()``;
    ``rsample(sample_shape)`` has shape ``sample_shape + batch_shape`` and carries a one-hot
    of shape ``sample_shape + batch_shape + (K,)``.
    """

    arg_constraints = {**QuantizedCategorical.arg_constraints, "temperature": constraints.positive}
    has_rsample = True

    def __init__(
        self,
        levels: LevelSet | torch.Tensor,
        temperature: float | torch.Tensor,
        logits: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        values, _ = resolve_levels(levels)
        self.temperature, logits, probs = _batch_params(values, temperature, logits, probs)
        super().__init__(levels, logits, probs, validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(RelaxedQuantizedCategoricalStraightThrough, _instance)
        new = super().expand(batch_shape, _instance=new)
        new.temperature = self.temperature.expand(batch_shape)
        return new

    def rsample(self, sample_shape: tuple[int, ...] | torch.Size = ()) -> RelaxedLevelValue:
        shape = self._extended_shape(sample_shape)
        y, index = _gumbel_softmax(self.logits, self.temperature, shape)
        # Written as hard + (soft - soft.detach()): the bracket is exactly zero, so the
        # forward value is exactly the hard one, which hard + soft - soft would not be.
        onehot = F.one_hot(index, self.num_levels).to(y.dtype) + (y - y.detach())
        # Levels detached in the soft part: their gradient comes from the hard value alone.
        soft = y @ self.levels.detach()
        value = self.levels[index] + (soft - soft.detach())
        return RelaxedLevelValue.wrap(value, onehot)
