"""The sampling-free evidence lower bound."""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample
from pyro.util import check_site_shape

from pyro_bqn.distributions.moment_likelihoods import expected_log_prob
from pyro_bqn.infer.checked_replay import CheckedReplayMessenger
from pyro_bqn.infer.moment_messenger import MomentMessenger

__all__ = ["DeterministicELBO"]


def _latent_sites(trace: poutine.Trace) -> dict[str, dict[str, Any]]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _check_observed_value(site: dict[str, Any]) -> None:
    """Refuse an observed value that is not a tensor, or whose shape would broadcast the
    likelihood's ``batch_shape + event_shape`` to a larger shape.

    ``expected_log_prob`` broadcasts like ``log_prob``: labels of shape ``(N, 1)`` against a
    likelihood of batch shape ``(N,)`` give an ``(N, N)`` log-likelihood, whose sum is about
    ``N`` times the right one and still trains. A value may omit leading dimensions or have
    size 1 where the likelihood does not (it then broadcasts without changing the shape).
    """
    name, fn, value = site["name"], site["fn"], site["value"]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"observed site '{name}' needs a tensor value, got {type(value).__name__}")
    expected = fn.batch_shape + fn.event_shape
    try:
        broadcast = torch.broadcast_shapes(value.shape, expected)
    except RuntimeError:
        broadcast = None
    if broadcast != expected:
        result = "does not broadcast" if broadcast is None else f"broadcasts to {tuple(broadcast)}"
        raise ValueError(
            f"observed site '{name}' has a value of shape {tuple(value.shape)}, but its "
            f"{type(fn).__name__} expects shape {tuple(expected)} (batch_shape + event_shape); "
            f"the value {result}. Reshape the observation (e.g. labels of shape (N,), not "
            "(N, 1))"
        )


def _check_term_shape(term: torch.Tensor, site: dict[str, Any], what: str, nesting: float) -> None:
    """Refuse a per-site term (scaled and masked, before summing) whose shape its plates do
    not declare, by Pyro's own rule (:func:`pyro.util.check_site_shape`, which
    :class:`~pyro.infer.Trace_ELBO` applies under validation): each plate's dimension has
    the plate's (subsample) size, and dimensions left of the plates have size 1.

    This catches a broadcast that the value check cannot see: a likelihood of batch shape
    ``(N, 1)`` inside a plate of size ``N`` at dim -1 is expanded by the plate to ``(N, N)``,
    and so is a term masked by a mask of shape ``(N, 1)``.
    """
    try:
        check_site_shape({**site, "log_prob": term}, nesting)
    except ValueError as error:
        raise ValueError(
            f"the {what} of site '{site['name']}' has shape {tuple(term.shape)}, which its "
            f"plates do not declare: {error}"
        ) from error


class DeterministicELBO(ELBO):
    r"""An ELBO computed by propagating means and variances instead of sampling.

    The guide runs under :class:`~pyro_bqn.infer.MomentMessenger`, so each latent site
    carries its posterior's moments; the model is replayed against that trace, and

    .. math::
        -\mathrm{ELBO} = -\sum_{obs} \mathrm{scale} \cdot E_q[\log p(y \mid \cdot)]
                        + \beta \sum_{latent} \mathrm{scale} \cdot KL(q \,\|\, p)

    where the expected log-likelihood comes from the observed site's
    ``expected_log_prob`` (exact for :class:`~pyro_bqn.distributions.MomentNormal`, a
    Jensen lower bound for the categorical and Bernoulli likelihoods) and each KL from the
    registered ``kl_divergence``. Plate subsampling scales and masks are applied per site.
    No random number is drawn by the ELBO itself (a plate with ``subsample_size`` draws its
    indices): the same parameters, data and subsample give the same loss.

    Shapes are checked before anything is summed, whether or not Pyro's validation is
    enabled (the checks read shapes only): each observed value must fit its likelihood's
    ``batch_shape + event_shape`` without broadcasting it larger, and each site's
    expected log-likelihood and KL term must have the shape its plates declare, as
    :class:`~pyro.infer.Trace_ELBO` requires of ``log_prob`` under validation. A mismatch
    raises ``ValueError`` naming the site and both shapes instead of training on a
    broadcast loss.

    :param kl_weight: ``beta``. ``1.0`` (the default) is the true ELBO; ``beta < 1`` gives a
        tempered ("cold") posterior, a deliberate user choice.
    :param max_plate_nesting: as for :class:`pyro.infer.ELBO`.

    After each evaluation, :attr:`last_terms` holds the floats
    ``expected_log_likelihood``, ``kl`` and ``elbo`` for logging; :meth:`terms` returns the
    differentiable tensors.

    Example::

        >>> import pyro, torch
        >>> from pyro_bqn import AutoQuantizedGuide, DeterministicELBO, QuantizedMLP
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> model = QuantizedMLP((4, 8, 3)); guide = AutoQuantizedGuide(model)
        >>> elbo = DeterministicELBO(kl_weight=1e-2)
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
        >>> losses = [svi.step(x, y) for _ in range(20)]
        >>> losses[-1] < losses[0], sorted(elbo.last_terms)
        (True, ['elbo', 'expected_log_likelihood', 'kl'])

    **References**

    [1] *Sampling-free learning of Bayesian quantized neural networks*, J. Su, M. Cvitkovic,
        F. Huang (ICLR 2020)
    """

    def __init__(self, kl_weight: float = 1.0, max_plate_nesting: float = math.inf) -> None:
        if not (isinstance(kl_weight, int | float) and math.isfinite(kl_weight) and kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
        super().__init__(num_particles=1, max_plate_nesting=max_plate_nesting)
        self.kl_weight = float(kl_weight)
        self.last_terms: dict[str, float] = {}

    def _get_trace(self, model, guide, args, kwargs):
        """One (model trace, guide trace) pair, with moments at the latent sites."""
        guide_trace = poutine.trace(MomentMessenger()(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(CheckedReplayMessenger(trace=guide_trace)(model)).get_trace(
            *args, **kwargs
        )
        return model_trace, guide_trace

    @staticmethod
    def _check_guide_sites(model_latents: dict, guide_latents: dict) -> None:
        for name, site in guide_latents.items():
            auxiliary = site["infer"].get("is_auxiliary")
            if name not in model_latents and not auxiliary:
                raise ValueError(
                    f"guide sample site '{name}' does not appear in the model (mark it "
                    "infer={'is_auxiliary': True} if that is intended)"
                )
            if name in model_latents and auxiliary:
                raise ValueError(
                    f"guide sample site '{name}' is marked infer={{'is_auxiliary': True}} but "
                    "is a latent site of the model, whose KL needs the guide's posterior there"
                )

    def terms(self, model, guide, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The differentiable ``expected_log_likelihood``, ``kl`` and ``elbo`` (scalars)."""
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        model_latents = _latent_sites(model_trace)
        # Checked: the guide's auxiliary sites are no model latents, so the KL loop below,
        # which looks up the model's latents, never reads them.
        guide_latents = _latent_sites(guide_trace)
        self._check_guide_sites(model_latents, guide_latents)

        observed = [
            site
            for site in model_trace.nodes.values()
            if site["type"] == "sample" and site["is_observed"]
        ]
        for site in observed:
            _check_observed_value(site)

        ell = torch.zeros(())
        for site in observed:
            log_lik = expected_log_prob(site["fn"], site["value"])
            log_lik = scale_and_mask(log_lik, site["scale"], site["mask"])
            _check_term_shape(log_lik, site, "expected log-likelihood", self.max_plate_nesting)
            ell = ell + log_lik.sum()

        kl = torch.zeros(())
        for name, model_site in model_latents.items():
            guide_fn = guide_latents[name]["fn"]
            try:
                site_kl = kl_divergence(guide_fn, model_site["fn"])
            except NotImplementedError as error:
                raise NotImplementedError(
                    f"no analytic KL at site '{name}' between the guide's "
                    f"{type(guide_fn).__name__} and the model's {type(model_site['fn']).__name__}"
                ) from error
            site_kl = scale_and_mask(site_kl, model_site["scale"], model_site["mask"])
            _check_term_shape(site_kl, model_site, "KL divergence", self.max_plate_nesting)
            kl = kl + site_kl.sum()

        return {"expected_log_likelihood": ell, "kl": kl, "elbo": ell - self.kl_weight * kl}

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``-(E_q[log p(y|.)] - kl_weight * KL)``, a differentiable scalar."""
        terms = self.terms(model, guide, *args, **kwargs)
        # One host transfer for the three floats (on a GPU, one synchronisation per step).
        values = torch.stack([value.detach() for value in terms.values()]).tolist()
        self.last_terms = dict(zip(terms, values, strict=True))
        if not math.isfinite(self.last_terms["elbo"]):
            # Refused before backward: an infinite loss would turn every parameter into NaN.
            raise ValueError(
                f"DeterministicELBO is not finite (terms {self.last_terms}): NaN means a "
                "parameter or an input holds NaN, or the learning rate is too large; an "
                "infinite KL means the guide puts mass where the prior has none"
            )
        return -terms["elbo"]

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return -self.last_terms["elbo"]  # loss.item(), without a second host transfer
