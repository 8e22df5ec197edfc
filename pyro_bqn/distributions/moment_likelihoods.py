r"""Likelihoods for observed sites whose parameters may be Gaussian moments.

Each class is a genuine Pyro distribution: given a plain tensor it is the ordinary
likelihood; given :class:`~pyro_bqn.Moments` ``(mu, sigma^2)`` of the network output ``z``
(independent Gaussian entries) it offers

* :meth:`expected_log_prob` — ``E_z[log p(y | z)]`` or a lower bound of it, which
  :class:`~pyro_bqn.infer.DeterministicELBO` uses so that the objective stays an ELBO;
* :meth:`log_prob` and :meth:`sample` — the (approximate) predictive ``p(y) = E_z[p(y|z)]``,
  so the same model runs under :class:`pyro.infer.Predictive`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions import (
    Categorical,
    ExpandedDistribution,
    MaskedDistribution,
    Normal,
    TorchDistribution,
    constraints,
)
from torch.distributions.utils import lazy_property

from pyro_bqn.moments import Moments, split_moments

__all__ = ["MomentCategorical", "MomentBernoulli", "MomentNormal", "expected_log_prob"]


def _probit_scaled(mean: torch.Tensor, var: torch.Tensor | None) -> torch.Tensor:
    """``mu / sqrt(1 + pi sigma^2 / 8)``: ``E[sigmoid(z)] ~= sigmoid`` of this (MacKay 1992)."""
    return mean if var is None else mean * torch.rsqrt(1 + (math.pi / 8) * var)


def _mean_field_softmax(mean: torch.Tensor, var: torch.Tensor | None) -> torch.Tensor:
    r"""``E[softmax(z)]`` for independent Gaussian logits, by the pairwise mean-field rule
    (Lu, Ie & Sha 2020), renormalised to sum to one:

    .. math::
        p_k \propto \Big(\sum_j \exp\big(-(\mu_k - \mu_j) /
              \sqrt{1 + \tfrac{\pi}{8}(\sigma_k^2 + \sigma_j^2)}\big)\Big)^{-1}

    For two classes it is the probit approximation of the sigmoid. Shapes ``(..., C)``.
    """
    if var is None:
        return mean.softmax(-1)
    gaps = mean.unsqueeze(-1) - mean.unsqueeze(-2)
    spread = var.unsqueeze(-1) + var.unsqueeze(-2)
    log_p = -torch.logsumexp(-gaps * torch.rsqrt(1 + (math.pi / 8) * spread), dim=-1)
    return log_p.softmax(-1)


def _categorical_expected_log_prob(
    mean: torch.Tensor, var: torch.Tensor | None, value: torch.Tensor
) -> torch.Tensor:
    """``mu_y - log sum_k exp(mu_k + sigma_k^2 / 2)`` (Jensen), exact when ``var`` is None."""
    normaliser = (mean if var is None else mean + 0.5 * var).logsumexp(-1)
    mean, index = torch.broadcast_tensors(mean, value.long().unsqueeze(-1))
    return mean.gather(-1, index[..., :1]).squeeze(-1) - normaliser


class MomentCategorical(TorchDistribution):
    r"""Categorical likelihood on logits ``z`` that are a tensor or Gaussian moments.

    * ``expected_log_prob(y) = mu_y - log sum_k exp(mu_k + sigma_k^2/2)``, a lower bound of
      ``E[log softmax(z)_y]`` (Jensen), exact for tensor logits;
    * predictive ``probs ~= E[softmax(z)]`` by the pairwise mean-field rule (Lu et al. 2020),
      which reduces to the probit approximation for two classes.

    :param logits: tensor or :class:`~pyro_bqn.Moments` of shape ``batch_shape + (C,)``.

    ``batch_shape = logits.shape[:-1]``, ``event_shape = ()``, values in ``{0, ..., C-1}``;
    :meth:`entropy` is that of the predictive.

    Example::

        >>> import torch
        >>> from pyro_bqn import Moments
        >>> from pyro_bqn.distributions import MomentCategorical
        >>> logits = Moments(torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 0.5, 0.5]]))
        >>> likelihood = MomentCategorical(logits)
        >>> bound = likelihood.expected_log_prob(torch.tensor([0]))  # <= E[log softmax(z)_0]
        >>> exact = MomentCategorical(logits.mean).log_prob(torch.tensor([0]))  # variance 0
        >>> bool(bound < exact), likelihood.probs.shape
        (True, torch.Size([1, 3]))

    **References**

    [1] *Sampling-free learning of Bayesian quantized neural networks*, J. Su, M. Cvitkovic,
        F. Huang (ICLR 2020)
    [2] *Uncertainty estimation with infinitesimal jackknife, its distribution and mean-field
        approximation*, Z. Lu, E. Ie, F. Sha (2020): the mean-field softmax predictive
    """

    # Dependent: a tensor or Moments, checked in __init__; infer_shapes reads the event dim.
    arg_constraints = {"logits": constraints.dependent(is_discrete=False, event_dim=1)}
    has_enumerate_support = True

    def __init__(self, logits: torch.Tensor | Moments, validate_args: bool | None = None) -> None:
        self.logit_mean, self.logit_var = split_moments(logits)
        if self.logit_mean.dim() < 1:
            raise ValueError("logits must have at least one dimension (the classes)")
        super().__init__(self.logit_mean.shape[:-1], validate_args=validate_args)
        # A host synchronisation per step: under validation only, as Pyro checks arguments.
        if self._validate_args and not torch.isfinite(self.logit_mean).all():
            raise ValueError("logits must be finite (found NaN or inf in their mean)")

    @lazy_property
    def _predictive(self) -> Categorical:
        # Built on demand: training reads only expected_log_prob.
        return Categorical(probs=_mean_field_softmax(self.logit_mean, self.logit_var))

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self):
        return constraints.integer_interval(0, self.logit_mean.shape[-1] - 1)

    @property
    def probs(self) -> torch.Tensor:
        """Predictive class probabilities, shape ``batch_shape + (C,)``."""
        return self._predictive.probs

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MomentCategorical, _instance)
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.logit_mean.shape[-1:]
        new.logit_mean = self.logit_mean.expand(shape)
        new.logit_var = None if self.logit_var is None else self.logit_var.expand(shape)
        super(MomentCategorical, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def expected_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _categorical_expected_log_prob(self.logit_mean, self.logit_var, value)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self._predictive.log_prob(value)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self._predictive.sample(sample_shape)

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        return self._predictive.enumerate_support(expand)

    def entropy(self) -> torch.Tensor:
        """``-sum_k p_k log p_k`` of the predictive ``p``, shape ``batch_shape``."""
        return self._predictive.entropy()


class MomentBernoulli(TorchDistribution):
    r"""Bernoulli likelihood on a logit ``z`` that is a tensor or Gaussian moments: the
    two-class :class:`MomentCategorical` with logits ``(0, z)``.

    * ``expected_log_prob(y) = y mu - softplus(mu + sigma^2/2)`` for ``y in {0, 1}``
      (Jensen lower bound, exact for tensor logits);
    * predictive ``probs = sigmoid(mu / sqrt(1 + pi sigma^2 / 8))``.

    :param logits: tensor or :class:`~pyro_bqn.Moments` of shape ``batch_shape``.

    :attr:`mean`, :attr:`variance` and :meth:`entropy` are those of the predictive.
    """

    # Dependent: a tensor or Moments, checked in __init__; infer_shapes reads the event dim.
    arg_constraints = {"logits": constraints.dependent(is_discrete=False, event_dim=0)}
    support = constraints.boolean
    has_enumerate_support = True

    def __init__(self, logits: torch.Tensor | Moments, validate_args: bool | None = None) -> None:
        self.logit_mean, self.logit_var = split_moments(logits)
        if not torch.isfinite(self.logit_mean).all():
            raise ValueError("logits must be finite (found NaN or inf in their mean)")
        super().__init__(self.logit_mean.shape, validate_args=validate_args)

    @property
    def probs(self) -> torch.Tensor:
        """Predictive ``P(y = 1)``, shape ``batch_shape``."""
        return torch.sigmoid(_probit_scaled(self.logit_mean, self.logit_var))

    @property
    def mean(self) -> torch.Tensor:
        """``P(y = 1)``, shape ``batch_shape``."""
        return self.probs

    @property
    def variance(self) -> torch.Tensor:
        """``p (1 - p)`` with ``p = P(y = 1)``, shape ``batch_shape``."""
        probs = self.probs
        return probs * (1 - probs)

    def entropy(self) -> torch.Tensor:
        """``-p log p - (1 - p) log(1 - p)`` with ``p = P(y = 1)``, shape ``batch_shape``."""
        logits = _probit_scaled(self.logit_mean, self.logit_var)
        return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(logits), reduction="none")

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MomentBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logit_mean = self.logit_mean.expand(batch_shape)
        new.logit_var = None if self.logit_var is None else self.logit_var.expand(batch_shape)
        super(MomentBernoulli, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _two_class(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.stack([torch.zeros_like(x), x], dim=-1)

    def expected_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _categorical_expected_log_prob(
            self._two_class(self.logit_mean), self._two_class(self.logit_var), value
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = _probit_scaled(self.logit_mean, self.logit_var)
        logits, value = torch.broadcast_tensors(logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value.to(logits.dtype), reduction="none")

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            return torch.bernoulli(self.probs.expand(shape))

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        values = self.logit_mean.new_tensor([0.0, 1.0]).reshape((2,) + (1,) * len(self.batch_shape))
        return values.expand((2,) + self.batch_shape) if expand else values


class MomentNormal(TorchDistribution):
    r"""Gaussian likelihood ``y ~ N(z, tau^2)`` on a mean ``z`` that is a tensor or moments.

    * ``expected_log_prob(y) = -((y - mu)^2 + sigma^2) / (2 tau^2) - log(2 pi tau^2) / 2``,
      exact;
    * predictive ``N(mu, sigma^2 + tau^2)`` (exact for Gaussian ``z``).

    :param loc: tensor or :class:`~pyro_bqn.Moments` of shape ``batch_shape``.
    :param scale: the noise scale ``tau > 0``, a float or a tensor broadcastable to ``loc``
        (a learnable ``pyro.param`` or a fixed value; a random scale has no exact rule).

    :attr:`mean`, :attr:`variance`, :meth:`entropy`, :meth:`cdf` and :meth:`icdf` are those of
    the predictive.
    """

    # loc is dependent: a tensor or Moments, checked in __init__; infer_shapes reads the event dim.
    arg_constraints = {
        "loc": constraints.dependent(is_discrete=False, event_dim=0),
        "scale": constraints.positive,
    }
    support = constraints.real
    has_rsample = True

    def __init__(
        self,
        loc: torch.Tensor | Moments,
        scale: torch.Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        self.loc_mean, self.loc_var = split_moments(loc)
        self.scale = torch.as_tensor(scale, dtype=self.loc_mean.dtype, device=self.loc_mean.device)
        batch_shape = torch.broadcast_shapes(self.loc_mean.shape, self.scale.shape)
        self.loc_mean = self.loc_mean.expand(batch_shape)
        self.loc_var = None if self.loc_var is None else self.loc_var.expand(batch_shape)
        self.scale = self.scale.expand(batch_shape)
        super().__init__(batch_shape, validate_args=validate_args)

    @property
    def predictive(self) -> Normal:
        """The predictive ``N(mu, sigma^2 + tau^2)``, batch shape ``batch_shape``."""
        var = self.scale.square() if self.loc_var is None else self.scale.square() + self.loc_var
        return Normal(self.loc_mean, var.sqrt())

    @property
    def mean(self) -> torch.Tensor:
        return self.loc_mean

    @property
    def variance(self) -> torch.Tensor:
        return self.predictive.variance

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MomentNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc_mean = self.loc_mean.expand(batch_shape)
        new.loc_var = None if self.loc_var is None else self.loc_var.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(MomentNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def expected_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        var = self.scale.square()
        spread = (value - self.loc_mean).square()
        if self.loc_var is not None:
            spread = spread + self.loc_var
        return -0.5 * spread / var - 0.5 * torch.log(2 * math.pi * var)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.predictive.log_prob(value)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.predictive.rsample(sample_shape)

    def entropy(self) -> torch.Tensor:
        """``log(s sqrt(2 pi e))`` with ``s^2 = sigma^2 + tau^2``, shape ``batch_shape``."""
        return self.predictive.entropy()

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        """The predictive ``Phi((value - mu) / s)``, ``s^2 = sigma^2 + tau^2``; shape
        ``broadcast(value.shape, batch_shape)``."""
        return self.predictive.cdf(value)

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        """The predictive quantile ``mu + s Phi^-1(value)`` of probabilities ``value``."""
        return self.predictive.icdf(value)


def expected_log_prob(fn: TorchDistribution, value: torch.Tensor) -> torch.Tensor:
    """``fn.expected_log_prob(value)`` where ``fn`` is moment-aware, else ``fn.log_prob(value)``;
    shape ``fn.batch_shape`` broadcast with ``value.shape[:value.dim() - fn.event_dim]``.

    Pyro's wrappers of a moment-aware likelihood are seen through, as their ``log_prob``
    treats ``base_dist.log_prob``: ``Independent`` (``.to_event``) sums the reinterpreted
    dimensions, ``MaskedDistribution`` (``.mask``) zeroes the masked entries and
    ``ExpandedDistribution`` expands. Their own ``log_prob`` would reach the *predictive*
    ``log_prob`` of the likelihood, a different objective that is not a bound of the ELBO.

    :raises NotImplementedError: for any other wrapper (a ``base_dist`` chain) around a
        moment-aware likelihood, rather than silently using its predictive ``log_prob``.
    """
    if hasattr(fn, "expected_log_prob"):
        return fn.expected_log_prob(value)
    if isinstance(fn, torch.distributions.Independent):  # Pyro's Independent is one too
        inner = expected_log_prob(fn.base_dist, value)
        dims = fn.reinterpreted_batch_ndims
        return inner.sum(tuple(range(-dims, 0))) if dims else inner
    if isinstance(fn, MaskedDistribution):
        inner = expected_log_prob(fn.base_dist, value)
        mask = fn._mask  # Pyro keeps it private; a bool or a tensor broadcastable to inner
        if isinstance(mask, bool):
            return inner if mask else torch.zeros_like(inner)
        return torch.where(mask, inner, inner.new_zeros(()))
    if isinstance(fn, ExpandedDistribution):
        inner = expected_log_prob(fn.base_dist, value)
        return inner.expand(
            torch.broadcast_shapes(fn.batch_shape, value.shape[: value.dim() - fn.event_dim])
        )
    base = getattr(fn, "base_dist", None)
    while base is not None:
        if hasattr(base, "expected_log_prob"):
            raise NotImplementedError(
                f"no expected log-likelihood for a {type(fn).__name__} around a "
                f"{type(base).__name__}: only .to_event(), .mask() and .expand() wrappers of a "
                "moment likelihood have one"
            )
        base = getattr(base, "base_dist", None)
    return fn.log_prob(value)
