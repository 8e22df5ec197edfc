"""A categorical distribution over the values of a level set."""

from __future__ import annotations

import copy

import torch
from pyro.distributions import Categorical, TorchDistribution, constraints
from torch.distributions.utils import lazy_property

from pyro_bqn.distributions.level_statistics import (
    LevelStatistics,
    level_statistics,
    statistics_from_probs,
)
from pyro_bqn.distributions.relaxed_value import soft_onehot_of
from pyro_bqn.levels import LevelSet, check_levels
from pyro_bqn.moments import Moments

__all__ = [
    "QuantizedCategorical",
    "LevelSupport",
    "HoldsLevelSet",
    "match_levels",
    "resolve_levels",
]


def match_levels(value: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(index, is_level)``, each of the shape of ``value``: the index (``long``) of the
    level nearest to each entry, and whether the entry *is* that level.

    An entry is the level ``v_k`` when ``|value - v_k| <= K * eps * max_j |v_j|``, ``eps`` the
    machine epsilon of the coarser of the two dtypes: the rounding that computing the ``K``
    levels by a chain of additions (as :class:`~pyro_bqn.levels.LearnableLevels` does) may
    accumulate in that dtype. So a level and a value that went through another dtype (e.g.
    by Pyro's ``deep_to``) still match, which exact equality across dtypes would not (``0.1``
    in float32 is not ``0.1`` in float64). NaN and infinite entries are no level.
    """
    value, levels = value.detach(), levels.detach()
    epsilons = [torch.finfo(levels.dtype).eps]
    if value.is_floating_point():
        epsilons.append(torch.finfo(value.dtype).eps)
        levels = levels.to(torch.promote_types(value.dtype, levels.dtype))
    value = value.to(levels.dtype).contiguous()
    # Nearest level: bucketize on the midpoints between neighbours.
    index = torch.bucketize(value, 0.5 * (levels[1:] + levels[:-1]))
    tolerance = levels.shape[0] * max(epsilons) * levels.abs().max()
    return index, (value - levels[index]).abs() <= tolerance


class LevelSupport(constraints.Constraint):
    """The finite set of values ``{v_1, ..., v_K}`` (a discrete constraint); membership as in
    :func:`match_levels`, to the precision of the coarser dtype."""

    is_discrete = True
    event_dim = 0

    def __init__(self, levels: torch.Tensor) -> None:
        self.levels = levels
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        return match_levels(value, self.levels)[1]

    def __repr__(self) -> str:
        return f"LevelSupport({self.levels.tolist()})"


def resolve_levels(levels: LevelSet | torch.Tensor) -> tuple[torch.Tensor, LevelSet | None]:
    """Return ``(values, level_set)`` for a :class:`LevelSet` or a ``(K,)`` tensor."""
    if isinstance(levels, LevelSet):
        return levels.values, levels
    values = torch.as_tensor(levels)
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    return check_levels(values), None


class HoldsLevelSet:
    """Deep copies of a distribution on a :class:`~pyro_bqn.levels.LevelSet` (its
    ``level_set``, and ``levels`` read from it) hold their own copy of the level set.

    Pyro's :func:`~pyro.distributions.util.deep_to` calls ``Module.to`` *in place* on every
    module it meets; through a distribution that would convert the caller's level set (a
    layer's, shared with its priors). The copy is made first, with
    :meth:`~pyro_bqn.levels.LevelSet.copy`, so ``deep_to`` converts the copy; the copied
    distribution's ``levels`` are read from it, as at construction.
    """

    level_set: LevelSet | None
    levels: torch.Tensor

    def __deepcopy__(self, memo: dict) -> HoldsLevelSet:
        level_set = self.level_set
        # Both go into the memo, so every reference to them in the copy (a wrapped
        # distribution's too) sees the one copy.
        if level_set is not None and id(level_set) not in memo:
            own = copy.deepcopy(level_set.copy(), memo)
            memo[id(level_set)] = own
            memo[id(self.levels)] = own.values
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            new.__dict__[name] = copy.deepcopy(value, memo)
        return new


class QuantizedCategorical(HoldsLevelSet, TorchDistribution):
    r"""A categorical distribution whose outcomes are the values of a level set.

    ``P(w = v_k) = p_k`` with ``p = softmax(logits)`` (or ``probs``).

    :param levels: a :class:`~pyro_bqn.levels.LevelSet` or a strictly increasing tensor of
        shape ``(K,)``. A learnable level set is read once, at construction.
    :param logits: unnormalised log-probabilities, shape ``batch_shape + (K,)``.
    :param probs: probabilities summing to one, shape ``batch_shape + (K,)``.

    ``batch_shape = logits.shape[:-1]``, ``event_shape = ()``; samples are level values with
    the dtype of ``levels``.

    Example::

        >>> import torch
        >>> from pyro_bqn import levels
        >>> from pyro_bqn.distributions import QuantizedCategorical
        >>> q = QuantizedCategorical(levels.ternary(), probs=torch.tensor([0.2, 0.3, 0.5]))
        >>> q.mean, q.sample((1000,)).unique().tolist()  # E[w] = -0.2 + 0.5
        (tensor(0.3000), [-1.0, 0.0, 1.0])

    **References**

    [1] *Sampling-free learning of Bayesian quantized neural networks*, J. Su, M. Cvitkovic,
        F. Huang (ICLR 2020)
    """

    arg_constraints = {
        "levels": constraints.ordered_vector,
        "logits": constraints.real_vector,
        "probs": constraints.simplex,
    }
    has_enumerate_support = True

    def __init__(
        self,
        levels: LevelSet | torch.Tensor,
        logits: torch.Tensor | None = None,
        probs: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        self.levels, self.level_set = resolve_levels(levels)
        if (logits is None) == (probs is None):
            raise ValueError("QuantizedCategorical needs exactly one of logits or probs")
        params = logits if logits is not None else probs
        name = "logits" if logits is not None else "probs"
        if params.dim() < 1 or params.shape[-1] != self.levels.shape[0]:
            raise ValueError(
                f"{name} must have last dimension K={self.levels.shape[0]} (one entry per "
                f"level), got shape {tuple(params.shape)}"
            )
        validate = self._validate_args if validate_args is None else validate_args
        # Categorical normalises probs before validating them, which would hide the error.
        if probs is not None and validate and not constraints.simplex.check(probs).all():
            raise ValueError(
                "probs must be non-negative and sum to one over the last dimension (the K "
                f"levels); got sums {probs.detach().sum(-1).flatten()[:5].tolist()}"
            )
        self._logits_param, self._probs_param = logits, probs
        super().__init__(params.shape[:-1], validate_args=validate_args)

    @lazy_property
    def _categorical(self) -> Categorical:
        # Built on demand: normalising the parameters over a last dimension of size K ~ 3
        # takes several passes over every weight, and training needs only `statistics`.
        return Categorical(logits=self._logits_param, probs=self._probs_param, validate_args=False)

    @lazy_property
    def statistics(self) -> LevelStatistics:
        """Mean, variance, ``E[w^2]`` and ``sum_k p_k log p_k``, shape ``batch_shape`` each,
        computed together.

        From logits this is one fused pass (:func:`level_statistics`), fastest when the
        logits are stored levels first (``logits.movedim(-1, 0)`` contiguous, as
        :class:`~pyro_bqn.infer.AutoQuantizedGuide` stores them).
        """
        if self._logits_param is not None:
            return level_statistics(self._logits_param.movedim(-1, 0), self.levels)
        return statistics_from_probs(self.probs.movedim(-1, 0), self.levels)

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self) -> LevelSupport:
        return LevelSupport(self.levels)

    @property
    def logits(self) -> torch.Tensor:
        """Normalised log-probabilities, shape ``batch_shape + (K,)``."""
        return self._categorical.logits

    @property
    def probs(self) -> torch.Tensor:
        """Probabilities, shape ``batch_shape + (K,)``."""
        return self._categorical.probs

    @property
    def num_levels(self) -> int:
        return self.levels.shape[0]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(QuantizedCategorical, _instance)
        batch_shape = torch.Size(batch_shape)
        new.levels = self.levels
        new.level_set = self.level_set
        param_shape = batch_shape + (self.num_levels,)
        for name in ("_logits_param", "_probs_param"):
            param = getattr(self, name)
            setattr(new, name, None if param is None else param.expand(param_shape))
        categorical = self._categorical
        # Compute probs before expanding, so that the expanded Categorical keeps a view of
        # them: computed later on the expanded view, probs would be a softmax over every
        # weight instead of over one shared row (a layer's uniform prior is (K,)).
        _ = categorical.probs
        new._categorical = categorical.expand(batch_shape)
        super(QuantizedCategorical, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def index_of(self, value: torch.Tensor) -> torch.Tensor:
        """Level indices (``long``) of level values; same shape as ``value``. A value is a
        level to the precision of the coarser dtype (:func:`match_levels`).

        :raises ValueError: if an entry of ``value`` is not one of the levels.
        """
        index, is_level = match_levels(value, self.levels)
        if not is_level.all():
            bad = value[~is_level].flatten()[:5].tolist()
            raise ValueError(
                f"value holds entries that are not levels {self.levels.tolist()}: {bad}"
            )
        return index

    def value_of(self, index: torch.Tensor) -> torch.Tensor:
        """Level values of level indices; same shape as ``index``."""
        return self.levels[index]

    def sample(self, sample_shape: tuple[int, ...] | torch.Size = ()) -> torch.Tensor:
        return self.levels[self._categorical.sample(sample_shape)]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log p_k`` at ``value = v_k``; shape ``broadcast(value.shape, batch_shape)``.

        A relaxed value (see :class:`~pyro_bqn.distributions.RelaxedLevelValue`) with soft
        one-hot ``y`` gets ``sum_k y_k log p_k``.
        """
        soft = soft_onehot_of(value)
        if soft is not None:
            return (soft * self.logits).sum(-1)
        if self._validate_args:
            self._validate_sample(value)
        index = self.index_of(value)
        logits = self.logits
        index, logits = torch.broadcast_tensors(index.unsqueeze(-1), logits)
        return logits.gather(-1, index[..., :1]).squeeze(-1)

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        """The levels, shape ``(K,) + batch_shape`` (``(K,) + (1,) * len(batch_shape)``
        when ``expand=False``)."""
        values = self.levels.reshape((-1,) + (1,) * len(self.batch_shape))
        return values.expand((-1,) + self.batch_shape) if expand else values

    @property
    def mean(self) -> torch.Tensor:
        """``E[w] = sum_k p_k v_k``, shape ``batch_shape``."""
        return self.statistics.mean

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[w^2] = sum_k p_k v_k^2``, shape ``batch_shape``."""
        return self.statistics.second_moment

    @property
    def variance(self) -> torch.Tensor:
        """``Var[w] = sum_k p_k (v_k - E[w])^2`` in centred form (never negative)."""
        centred = self.levels - self.mean.unsqueeze(-1)
        return (self.probs * centred.square()).sum(-1)

    def moments(self) -> Moments:
        """``E[w]``, ``Var[w]`` and ``E[w^2]`` from :attr:`statistics`, shape ``batch_shape``
        each.

        The variance is ``max(E[w^2] - E[w]^2, 0)``: on large weight tensors this is one
        pass instead of the centred form's several, and the clamp only absorbs rounding
        (of order ``eps * max v_k^2``). Use :attr:`variance` when that rounding matters.
        """
        stats = self.statistics
        return Moments(stats.mean, stats.var, stats.second_moment)

    @property
    def mode(self) -> torch.Tensor:
        """The most probable level, shape ``batch_shape``."""
        return self.levels[self.probs.argmax(-1)]

    def entropy(self) -> torch.Tensor:
        return self._categorical.entropy()
