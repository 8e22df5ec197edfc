"""KL divergences between distributions over levels, registered with
:func:`torch.distributions.kl_divergence`.

Both return a tensor of shape ``broadcast(q.batch_shape, p.batch_shape)`` (the guide's batch
shape, as Pyro expects). Because the distributions define ``expand``, a ``pyro.plate`` keeps
their type and the registrations below apply; ``.to_event(n)`` on both sides goes through
Pyro's ``Independent``/``Independent`` registration, which sums these over the event dims.

**Against a multiple spike-and-slab prior** ``p = sum_k pi_k N(v_k, sigma^2) + pi_0
N(0, sigma_0^2)`` (``sigma = 0``: point masses):

* a categorical posterior on the levels gets ``sum_k q_k log(q_k / pi_k)``, the zero-width
  limit of the spikes. The slab's scale and the spikes' width do not enter it (nor does the
  slab's weight, beyond a constant, when the spikes share ``1 - pi_0`` equally); an
  :class:`InertPriorWarning` says so, once per process.
* a spike-and-slab posterior ``q = sum_k q_k N(v_k, tau^2) + q_0 N(m, s^2)`` on the same
  levels gets

  ``sum_c q_c log(q_c / pi_c) + (1 - q_0) KL(N(0, tau^2) || N(0, sigma^2))
  + q_0 KL(N(m, s^2) || N(0, sigma_0^2))``,

  the KL of the joint distributions of (component, weight). It is exact for point-mass
  spikes (``tau = sigma = 0``, densities as in :class:`MultipleSpikeAndSlab`) and an upper
  bound on the KL otherwise, above it by ``E_q[KL(q(c | w) || p(c | w))]``, the divergence
  of the two mixtures' component responsibilities. It comes from the posterior's slab mass
  that falls within a few spike widths of a level, so it shrinks in proportion to the spike
  width: on the levels ``(-1, -0.2, 0.4, 1.2)`` with slabs of scale 0.2 to 0.5 it was at
  most 0.24 nats per weight at spike width 0.02, 0.07 at 0.005 and 0.03 at 0.002 (Monte
  Carlo, ``tests/distributions/test_kl.py``). The bound keeps the ELBO a lower bound on the
  evidence.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
from torch.distributions import register_kl

from pyro_bqn.distributions.multiple_spike_and_slab import MultipleSpikeAndSlab
from pyro_bqn.distributions.quantized_categorical import QuantizedCategorical, match_levels
from pyro_bqn.warning_location import user_stacklevel

__all__ = ["InertPriorWarning"]


class InertPriorWarning(UserWarning):
    """A prior's parameter cannot change the objective with the posterior it is paired with."""


# Warnings already given in this process (each is given once).
_WARNED: set[str] = set()


def _check_same_levels(
    q: QuantizedCategorical, p: QuantizedCategorical | MultipleSpikeAndSlab
) -> None:
    # Level by level, to the rounding of the coarser dtype: not bitwise across dtypes.
    same = q.levels.shape == p.levels.shape
    if same:
        index, is_level = match_levels(q.levels, p.levels)
        same = bool(is_level.all()) and torch.equal(index, torch.arange(len(index)).to(index))
    if not same:
        raise ValueError(
            f"KL({type(q).__name__} || {type(p).__name__}) needs both distributions on the "
            f"same levels, got {q.levels.tolist()} and {p.levels.tolist()}"
        )


def _log_prior(log_p: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``log_p`` with ``-inf`` where ``p == 0`` (torch clamps the logits of zero
    probabilities to a finite value). The zero test reads the storage behind an expanded
    prior, not its weight-sized view, so the common case costs nothing."""
    base = p if p._base is None else p._base
    if not (base == 0).any():
        return log_p
    return torch.where(p == 0, -math.inf, log_p)


def _shared_row(log_p: torch.Tensor) -> torch.Tensor | None:
    """The ``(K,)`` log-probabilities when every batch entry of ``log_p`` shares them (a
    prior expanded to the weights' shape has zero strides there), else ``None``."""
    batch = zip(log_p.stride()[:-1], log_p.shape[:-1], strict=True)
    if log_p.numel() == 0 or any(stride != 0 and size > 1 for stride, size in batch):
        return None
    return log_p.reshape(-1, log_p.shape[-1])[0]


def _shared_prior_kl(q: QuantizedCategorical, log_p: torch.Tensor) -> torch.Tensor | None:
    """``sum_k q_k log q_k - sum_k q_k log p_k`` from ``q``'s fused statistics when the prior
    is the same for every weight (the usual case), else ``None``. A fixed uniform prior
    makes the second sum the constant ``log p_1``; a learnable one keeps the full sum, whose
    gradient reaches every ``log p_k``."""
    row = _shared_row(log_p)
    if row is None:
        return None
    neg_entropy = q.statistics.neg_entropy
    dtype = torch.promote_types(neg_entropy.dtype, log_p.dtype)
    uniform = not row.requires_grad and bool((row == row[0]).all())
    cross = row[0] if uniform else q.probs @ row.to(q.probs.dtype)
    kl = neg_entropy.to(dtype) - cross.to(dtype)
    shape = torch.broadcast_shapes(q.batch_shape, log_p.shape[:-1])
    # A fresh tensor, as the term-by-term path returns (not a view callers could not write);
    # when kl has the shape already, both are views of it: no copy.
    return kl.expand(shape).contiguous()


def _categorical_kl(q: QuantizedCategorical, log_p: torch.Tensor) -> torch.Tensor:
    """``sum_k q_k (log q_k - log p_k)``, with ``0 log 0 = 0`` and ``+inf`` where
    ``p_k = 0 < q_k``; shape ``broadcast(q.batch_shape, log_p.shape[:-1])``."""
    # NaN and inf survive summation, so one scalar test stands for a pass over every term;
    # only when it fails are the 0 log 0 terms (0 * inf = NaN) worked out term by term.
    kl = _shared_prior_kl(q, log_p)
    if kl is not None and torch.isfinite(kl.sum()):
        return kl
    q_probs = q.probs
    terms = q_probs * (q.logits - log_p)
    return torch.where(q_probs == 0, 0.0, terms).sum(-1)


@register_kl(QuantizedCategorical, QuantizedCategorical)
def _kl_quantized_quantized(q: QuantizedCategorical, p: QuantizedCategorical) -> torch.Tensor:
    """``KL(q || p) = sum_k q_k log(q_k / p_k)``; the levels must match."""
    _check_same_levels(q, p)
    return _categorical_kl(q, _log_prior(p.logits, p.probs))


@register_kl(QuantizedCategorical, MultipleSpikeAndSlab)
def _kl_quantized_spike_and_slab(q: QuantizedCategorical, p: MultipleSpikeAndSlab) -> torch.Tensor:
    """``KL(q || p) = sum_k q_k log(q_k / pi_k)`` with the prior's spike weights ``pi_k``; the
    levels must match.

    A distribution on the levels gives the slab no mass, so the slab enters only through
    the weight it takes from the spikes (``sum_k pi_k = 1 - pi_0``). With Gaussian spikes
    (``spike_scale > 0``) the true KL of a discrete posterior is infinite; this returns the
    zero-width limit of the spikes, i.e. the KL against the point-mass prior with the same
    weights.
    """
    _check_same_levels(q, p)
    _warn_if_slab_is_inert(p)
    return _categorical_kl(q, p.spike_probs.log())


def _warn_if_slab_is_inert(p: MultipleSpikeAndSlab) -> None:
    if "categorical-slab" in _WARNED or (p.point_mass and not bool((p.slab_prob > 0).any())):
        return
    _WARNED.add("categorical-slab")
    warnings.warn(
        "KL(QuantizedCategorical || MultipleSpikeAndSlab): a categorical posterior puts no "
        "mass on the slab, so the prior's slab_scale and spike_scale (and, with equal spike "
        "weights, slab_prob) do not change the objective; the KL is the zero-width limit of "
        "the spikes. Use AutoQuantizedGuide(model, posterior='spike-and-slab') for a "
        "posterior whose slab and spike width they act on.",
        InertPriorWarning,
        stacklevel=user_stacklevel(sys._getframe()),
    )


def _normal_kl(
    loc: float | torch.Tensor,
    scale: torch.Tensor,
    prior_loc: float | torch.Tensor,
    prior_scale: torch.Tensor,
) -> torch.Tensor:
    """``KL(N(loc, scale^2) || N(prior_loc, prior_scale^2))``, elementwise."""
    ratio = (scale / prior_scale).square()
    return 0.5 * (ratio + ((loc - prior_loc) / prior_scale).square() - 1 - ratio.log())


@register_kl(MultipleSpikeAndSlab, MultipleSpikeAndSlab)
def _kl_spike_and_slab(q: MultipleSpikeAndSlab, p: MultipleSpikeAndSlab) -> torch.Tensor:
    """The KL of the joint (component, weight) distributions (see the module docstring):
    exact for point-mass spikes, an upper bound for Gaussian ones; the levels must match,
    and the spikes of both must be point masses or both Gaussian.

    :raises ValueError: for spikes of only one kind: point masses against Gaussian spikes
        have an infinite KL, and the bound would be infinite the other way round.
    """
    _check_same_levels(q, p)
    if q.point_mass != p.point_mass:
        raise ValueError(
            "KL(MultipleSpikeAndSlab || MultipleSpikeAndSlab) needs the spikes of both to be "
            "point masses or both Gaussian, got spike_scale "
            f"{q.spike_scale.flatten()[:1].tolist()} (posterior) and "
            f"{p.spike_scale.flatten()[:1].tolist()} (prior): give the posterior the prior's "
            "kind of spike"
        )
    log_q, log_p = q.log_weights, p.log_weights
    q_weights = log_q.exp()
    empty = q_weights == 0
    # 0 log 0 = 0, with finite gradients where q_c = 0 (a masked inf would give NaN).
    log_q = torch.where(empty, 0.0, log_q)
    log_p = torch.where(empty, 0.0, log_p)
    kl = (q_weights * (log_q - log_p)).sum(-1)
    slab_weight = q_weights[..., -1]
    kl = kl + slab_weight * _normal_kl(q.slab_loc, q.slab_scale, p.slab_loc, p.slab_scale)
    if not q.point_mass:
        spike = _normal_kl(0.0, q.spike_scale, 0.0, p.spike_scale)
        kl = kl + (1 - slab_weight) * spike
    return kl
