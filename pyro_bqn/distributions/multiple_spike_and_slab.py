"""The multiple spike-and-slab distribution of Bayesian asymmetric M-ary quantization: the
prior (a spike at each level and a zero-centred slab) and, with a slab of its own location,
the spike-and-slab posterior of :class:`~pyro_bqn.AutoQuantizedGuide`."""

from __future__ import annotations

import math

import torch
from pyro.distributions import Categorical, TorchDistribution, constraints
from pyro.distributions.util import broadcast_shape

from pyro_bqn.distributions.quantized_categorical import (
    HoldsLevelSet,
    match_levels,
    resolve_levels,
)
from pyro_bqn.distributions.relaxed_value import soft_onehot_of
from pyro_bqn.levels import LevelSet
from pyro_bqn.moments import Moments

__all__ = ["MultipleSpikeAndSlab"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# Slab draws that round onto a level are redrawn up to this many times (each time with the
# slab's O(eps) probability of landing there again).
_MAX_REDRAWS = 32


def _normal_log_prob(
    value: torch.Tensor, loc: float | torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    return -0.5 * ((value - loc) / scale).square() - scale.log() - _HALF_LOG_2PI


class MultipleSpikeAndSlab(HoldsLevelSet, TorchDistribution):
    r"""A mixture of spikes at the levels and a Gaussian slab:

        ``p(w) = sum_k pi_k spike_k(w) + pi_0 N(w; slab_loc, slab_scale^2)``,

    where ``spike_k`` is a point mass ``delta(w - v_k)`` when ``spike_scale = 0`` and a
    narrow Gaussian ``N(w; v_k, spike_scale^2)`` when ``spike_scale > 0``. The weights
    ``pi_1..pi_K`` (``spike_probs``) and ``pi_0`` (``slab_prob``) must sum to one.

    As a **prior** (``slab_loc = 0``) it is the multiple spike-and-slab prior of Bayesian
    asymmetric M-ary quantization (Chien & Chang, "Bayesian asymmetric quantized neural
    networks", *Pattern Recognition* 139, 2023): one spike per level plus a broad slab. As a
    **posterior** (one per weight, built by :meth:`from_logits`) a weight sits on a level
    or, with probability ``pi_0``, keeps a full-precision value ``~ N(slab_loc, slab_scale^2)``
    (an outlier). Its mean and variance are analytic (:meth:`moments`), so it runs in the
    sampling-free :class:`~pyro_bqn.DeterministicELBO`; the KL to a spike-and-slab prior is
    registered in :mod:`pyro_bqn.distributions.kl`.

    **Dominating measure.** With Gaussian spikes (``spike_scale > 0``) the distribution has
    an ordinary density, and :meth:`log_prob` is its log-density with respect to Lebesgue
    measure. With point-mass spikes it is mixed discrete/continuous, and :meth:`log_prob` is
    its log-density with respect to ``mu = sum_k delta_{v_k} + Lebesgue``, counting measure
    on the levels plus Lebesgue measure:

        ``log p(w) = log pi_k``                                     if ``w = v_k``,
        ``log p(w) = log pi_0 + log N(w; slab_loc, slab_scale^2)``  otherwise

    (the slab gives no mass to a single point, so a level's density is its spike's weight).
    A value is a level to within the rounding of the coarser of its dtype and the levels'
    (:func:`~pyro_bqn.distributions.quantized_categorical.match_levels`), so a level value
    that went through another dtype keeps its spike. :meth:`sample` draws from the same
    measure: a spike draw is exactly its level, and a slab draw is never read as one (a slab
    draw that rounds onto a level, which has probability ``O(eps)``, is redrawn), so
    ``log_prob`` reads every sample as the component that drew it. :meth:`entropy` is
    ``-E[log p(w)]`` with respect to the same measure,
    ``-sum_k pi_k log pi_k - pi_0 log pi_0 + pi_0 H(slab)``; with Gaussian spikes the
    entropy (of a Gaussian mixture) has no closed form.

    A value that carries a one-hot ``y`` over the levels (a sample of a relaxed or
    straight-through guide, see :class:`~pyro_bqn.distributions.RelaxedLevelValue`) is a
    weight on the levels and gets ``sum_k y_k log pi_k``, for either spike kind: the
    zero-width limit of the spikes, as used by the registered KL divergence.

    Usage::

        >>> import torch
        >>> from pyro_bqn import levels
        >>> from pyro_bqn.distributions import MultipleSpikeAndSlab
        >>> prior = MultipleSpikeAndSlab.with_uniform_spikes(levels.ternary(), 0.1, 1.0)
        >>> prior.log_prob(torch.tensor(0.0)).exp()  # (1 - 0.1) / 3
        tensor(0.3000)

    :param levels: a :class:`~pyro_bqn.levels.LevelSet` or a strictly increasing ``(K,)``
        tensor; a learnable level set is read once, at construction (layers build their
        priors anew at every call, see :mod:`pyro_bqn.priors`).
    :param spike_probs: spike weights ``pi_1..pi_K``, shape ``batch_shape + (K,)``.
    :param slab_prob: slab weight ``pi_0``, broadcastable to ``batch_shape``.
    :param slab_scale: standard deviation of the slab, positive, broadcastable to
        ``batch_shape``.
    :param spike_scale: standard deviation of the spikes, broadcastable to ``batch_shape``;
        zero everywhere (point masses, the default) or positive everywhere.
    :param slab_loc: (keyword) the slab's location, broadcastable to ``batch_shape``;
        default ``0``.

    ``batch_shape`` is the broadcast of ``spike_probs.shape[:-1]`` and the other parameters'
    shapes; ``event_shape = ()``. The weights are checked unless ``validate_args=False``.

    **References**

    [1] *Bayesian asymmetric quantized neural networks*, J.-T. Chien, S.-T. Chang (Pattern
        Recognition 139, 2023): the multiple spike-and-slab prior
    """

    arg_constraints = {
        "levels": constraints.ordered_vector,
        "spike_probs": constraints.independent(constraints.unit_interval, 1),
        "slab_prob": constraints.unit_interval,
        "slab_scale": constraints.positive,
        "spike_scale": constraints.nonnegative,
        "slab_loc": constraints.real,
    }
    support = constraints.real

    def __init__(
        self,
        levels: LevelSet | torch.Tensor,
        spike_probs: torch.Tensor,
        slab_prob: float | torch.Tensor,
        slab_scale: float | torch.Tensor,
        spike_scale: float | torch.Tensor = 0.0,
        validate_args: bool | None = None,
        *,
        slab_loc: float | torch.Tensor = 0.0,
        _log_weights: torch.Tensor | None = None,
    ) -> None:
        self.levels, self.level_set = resolve_levels(levels)
        num_levels = self.levels.shape[0]
        like = {"dtype": self.levels.dtype, "device": self.levels.device}
        spike_probs = torch.as_tensor(spike_probs, **like)
        slab_prob = torch.as_tensor(slab_prob, **like)
        slab_scale = torch.as_tensor(slab_scale, **like)
        spike_scale = torch.as_tensor(spike_scale, **like)
        slab_loc = torch.as_tensor(slab_loc, **like)
        if spike_probs.dim() < 1 or spike_probs.shape[-1] != num_levels:
            raise ValueError(
                f"spike_probs must have last dimension K={num_levels} (one weight per level), "
                f"got shape {tuple(spike_probs.shape)}"
            )
        if not bool((slab_scale > 0).all()):
            raise ValueError(f"slab_scale must be positive, got {slab_scale.tolist()}")
        if bool((spike_scale == 0).all()):
            self.point_mass = True
        elif bool((spike_scale > 0).all()):
            self.point_mass = False
        else:
            raise ValueError(
                "spike_scale must be zero everywhere (point-mass spikes) or positive "
                f"everywhere (Gaussian spikes), got {spike_scale.tolist()}"
            )
        if _log_weights is None and validate_args is not False:
            _check_weights(spike_probs, slab_prob)
        batch_shape = torch.Size(
            broadcast_shape(spike_probs.shape[:-1], slab_prob.shape, slab_scale.shape,
                            spike_scale.shape, slab_loc.shape)
        )
        self.spike_probs = spike_probs.expand(batch_shape + (num_levels,))
        self.slab_prob = slab_prob.expand(batch_shape)
        self.slab_scale = slab_scale.expand(batch_shape)
        self.spike_scale = spike_scale.expand(batch_shape)
        self.slab_loc = slab_loc.expand(batch_shape)
        self._log_weights = (
            None if _log_weights is None else _log_weights.expand(batch_shape + (num_levels + 1,))
        )
        super().__init__(batch_shape, validate_args=validate_args)

    @classmethod
    def from_logits(
        cls,
        levels: LevelSet | torch.Tensor,
        logits: torch.Tensor,
        slab_loc: float | torch.Tensor,
        slab_scale: float | torch.Tensor,
        spike_scale: float | torch.Tensor = 0.0,
        validate_args: bool | None = None,
    ) -> MultipleSpikeAndSlab:
        """The distribution with weights ``softmax(logits)``: ``logits`` of shape
        ``batch_shape + (K + 1,)``, the spikes' first and the slab's last (a posterior's
        parametrisation: any real logits are valid, and :meth:`log_weights` keeps the
        precision of ``log_softmax``)."""
        log_weights = torch.log_softmax(logits, dim=-1)
        weights = log_weights.exp()
        return cls(
            levels,
            weights[..., :-1],
            weights[..., -1],
            slab_scale,
            spike_scale,
            validate_args,
            slab_loc=slab_loc,
            _log_weights=log_weights,
        )

    @classmethod
    def with_uniform_spikes(
        cls,
        levels: LevelSet | torch.Tensor,
        slab_prob: float | torch.Tensor,
        slab_scale: float | torch.Tensor,
        spike_scale: float | torch.Tensor = 0.0,
        validate_args: bool | None = None,
    ) -> MultipleSpikeAndSlab:
        """The prior whose spikes share ``1 - slab_prob`` equally: ``pi_k = (1 - pi_0) / K``.

        ``slab_prob = 0`` with point-mass spikes is the uniform categorical over the levels.
        """
        values, _ = resolve_levels(levels)
        slab_prob = torch.as_tensor(slab_prob, dtype=values.dtype, device=values.device)
        num_levels = values.shape[0]
        spike_probs = ((1 - slab_prob) / num_levels).unsqueeze(-1).expand(
            slab_prob.shape + (num_levels,)
        )
        return cls(levels, spike_probs, slab_prob, slab_scale, spike_scale, validate_args)

    @property
    def num_levels(self) -> int:
        return self.levels.shape[0]

    @property
    def log_weights(self) -> torch.Tensor:
        """``log (pi_1, ..., pi_K, pi_0)``, shape ``batch_shape + (K + 1,)`` (``-inf`` where a
        weight is zero)."""
        if self._log_weights is not None:
            return self._log_weights
        return torch.cat([self.spike_probs, self.slab_prob.unsqueeze(-1)], dim=-1).log()

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(MultipleSpikeAndSlab, _instance)
        batch_shape = torch.Size(batch_shape)
        new.levels, new.level_set = self.levels, self.level_set
        new.point_mass = self.point_mass
        new.spike_probs = self.spike_probs.expand(batch_shape + (self.num_levels,))
        new.slab_prob = self.slab_prob.expand(batch_shape)
        new.slab_scale = self.slab_scale.expand(batch_shape)
        new.spike_scale = self.spike_scale.expand(batch_shape)
        new.slab_loc = self.slab_loc.expand(batch_shape)
        # Taken before expanding, so that an expanded prior keeps one (K + 1,) row of them.
        new._log_weights = self.log_weights.expand(batch_shape + (self.num_levels + 1,))
        super(MultipleSpikeAndSlab, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-density (see the class docstring for the measure); shape
        ``broadcast(value.shape, batch_shape)``."""
        soft = soft_onehot_of(value)
        if soft is not None:
            return torch.xlogy(soft, self.spike_probs).sum(-1)
        if self._validate_args:
            self._validate_sample(value)
        slab = self.slab_prob.log() + _normal_log_prob(value, self.slab_loc, self.slab_scale)
        if self.point_mass:
            index, is_level = match_levels(value, self.levels)
            index, log_spikes = torch.broadcast_tensors(index.unsqueeze(-1), self.spike_probs.log())
            log_spike = log_spikes.gather(-1, index[..., :1]).squeeze(-1)
            return torch.where(is_level, log_spike, slab)
        spikes = self.spike_probs.log() + _normal_log_prob(
            value.unsqueeze(-1), self.levels, self.spike_scale.unsqueeze(-1)
        )
        return torch.cat([spikes, slab.unsqueeze(-1)], dim=-1).logsumexp(-1)

    def sample(self, sample_shape: tuple[int, ...] | torch.Size = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            # Component K (the last) is the slab; components 0..K-1 are the spikes.
            weights = torch.cat([self.spike_probs, self.slab_prob.unsqueeze(-1)], dim=-1)
            component = Categorical(probs=weights, validate_args=False).sample(sample_shape)
            slab_loc = self.slab_loc.unsqueeze(-1)
            locs = torch.cat([self.levels.expand(self.batch_shape + (-1,)), slab_loc], dim=-1)
            scales = torch.cat(
                [self.spike_scale.unsqueeze(-1).expand(self.batch_shape + (self.num_levels,)),
                 self.slab_scale.unsqueeze(-1)],
                dim=-1,
            )
            index = component.unsqueeze(-1)
            loc = locs.expand(shape + (-1,)).gather(-1, index).squeeze(-1)
            scale = scales.expand(shape + (-1,)).gather(-1, index).squeeze(-1)
            # A point-mass spike has scale 0, so its sample is exactly the level.
            x = loc + scale * torch.randn(shape, dtype=loc.dtype, device=loc.device)
            if self.point_mass:
                x = self._redraw_slab_on_levels(x, component == self.num_levels, loc, scale)
            return x

    def _redraw_slab_on_levels(
        self, x: torch.Tensor, slab: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """Redraw the slab draws (``slab``, shape of ``x``) that round onto a level, which
        :meth:`log_prob` would read as a spike: the slab's mass there is ``O(eps)``."""
        for _ in range(_MAX_REDRAWS):
            redraw = slab & match_levels(x, self.levels)[1]
            if not redraw.any():
                return x
            x = torch.where(redraw, loc + scale * torch.randn_like(x), x)
        raise ValueError(
            f"slab_scale {scale[redraw].flatten()[:3].tolist()} is too small to tell the slab "
            f"from the spike at levels {self.levels.tolist()} in {x.dtype}"
        )

    def entropy(self) -> torch.Tensor:
        """``-E[log p(w)]`` with point-mass spikes (see the class docstring for the measure):
        ``-sum_k pi_k log pi_k - pi_0 log pi_0 + pi_0 log(slab_scale sqrt(2 pi e))``, shape
        ``batch_shape``.

        :raises NotImplementedError: with Gaussian spikes, whose mixture entropy has no
            closed form.
        """
        if not self.point_mass:
            raise NotImplementedError(
                "MultipleSpikeAndSlab with Gaussian spikes has no closed-form entropy (that "
                "of a Gaussian mixture); point-mass spikes (spike_scale=0) have one"
            )
        weights = torch.cat([self.spike_probs, self.slab_prob.unsqueeze(-1)], dim=-1)
        slab_entropy = self.slab_scale.log() + _HALF_LOG_2PI + 0.5
        return -torch.xlogy(weights, weights).sum(-1) + self.slab_prob * slab_entropy

    @property
    def mean(self) -> torch.Tensor:
        """``E[w] = sum_k pi_k v_k + pi_0 slab_loc``, shape ``batch_shape``."""
        return self.spike_probs @ self.levels + self.slab_prob * self.slab_loc

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[w^2] = sum_k pi_k (v_k^2 + s^2) + pi_0 (slab_loc^2 + slab_scale^2)`` with
        ``s = spike_scale``, shape ``batch_shape``."""
        spikes = self.spike_probs @ self.levels.square() + self.spike_probs.sum(-1) * (
            self.spike_scale.square()
        )
        return spikes + self.slab_prob * (self.slab_loc.square() + self.slab_scale.square())

    @property
    def variance(self) -> torch.Tensor:
        """``sum_k pi_k ((v_k - m)^2 + s^2) + pi_0 ((slab_loc - m)^2 + slab_scale^2)`` with
        ``m = E[w]`` and ``s = spike_scale``: the centred form, never negative; shape
        ``batch_shape``."""
        mean = self.mean
        centred = (self.levels - mean.unsqueeze(-1)).square() + self.spike_scale.unsqueeze(-1) ** 2
        spikes = (self.spike_probs * centred).sum(-1)
        slab = (self.slab_loc - mean).square() + self.slab_scale.square()
        return spikes + self.slab_prob * slab

    def moments(self) -> Moments:
        """``E[w]``, ``Var[w]`` and ``E[w^2]``, shape ``batch_shape`` each: what
        :class:`~pyro_bqn.infer.MomentMessenger` propagates through a layer."""
        return Moments(self.mean, self.variance, self.second_moment)

    @property
    def mode(self) -> torch.Tensor:
        """The location of the heaviest component, shape ``batch_shape``: the level ``v_k``
        with the largest spike weight, or ``slab_loc`` where the slab weighs more than every
        spike. For a posterior, the most probable network's weights (levels, and the
        full-precision outliers)."""
        spike_weight, index = self.spike_probs.max(-1)
        return torch.where(self.slab_prob > spike_weight, self.slab_loc, self.levels[index])


def _check_weights(spike_probs: torch.Tensor, slab_prob: torch.Tensor) -> None:
    spike_probs, slab_prob = spike_probs.detach(), slab_prob.detach()
    total = spike_probs.sum(-1) + slab_prob
    # Rounding of K + 1 weights, each computed to within a few ulps (e.g. by a softmax).
    tol = 16 * (spike_probs.shape[-1] + 1) * torch.finfo(total.dtype).eps
    # Written as "not (all good)" so that NaN weights fail too.
    valid = (spike_probs >= 0).all() and (slab_prob >= 0).all() and ((total - 1).abs() <= tol).all()
    if not valid:
        raise ValueError(
            "spike_probs and slab_prob must be non-negative and sum to one "
            f"(spike_probs.sum(-1) + slab_prob == 1), got sums {total.flatten()[:5].tolist()}"
        )
