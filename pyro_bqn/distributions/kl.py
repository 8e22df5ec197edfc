"""KL divergences between distributions over levels, registered with
:func:`torch.distributions.kl_divergence`.

Both return a tensor of shape ``broadcast(q.batch_shape, p.batch_shape)`` (the guide's batch
shape, as Pyro expects). Because the distributions define ``expand``, a ``pyro.plate`` keeps
their type and the registrations below apply; ``.to_event(n)`` on both sides goes through
Pyro's ``Independent``/``Independent`` registration, which sums these over the event dims.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import register_kl

from pyro_bqn.distributions.multiple_spike_and_slab import MultipleSpikeAndSlab
from pyro_bqn.distributions.quantized_categorical import QuantizedCategorical

__all__: list[str] = []


def _check_same_levels(
    q: QuantizedCategorical, p: QuantizedCategorical | MultipleSpikeAndSlab
) -> None:
    if q.levels.shape != p.levels.shape or not torch.equal(q.levels.detach(), p.levels.detach()):
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
    # A fresh tensor, as the term-by-term path returns (not a view callers could not write).
    return kl if kl.shape == shape else kl.expand(shape).contiguous()


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
    return _categorical_kl(q, p.spike_probs.log())
