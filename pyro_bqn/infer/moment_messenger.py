"""A messenger that puts the posterior's moments, not samples, at latent sites."""

from __future__ import annotations

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample

from pyro_bqn.distributions.wrappers import base_distribution
from pyro_bqn.moments import SiteMoments

__all__ = ["MomentMessenger"]


class MomentMessenger(Messenger):
    """Sets every latent sample site's value to :class:`~pyro_bqn.SiteMoments` built from
    its distribution's ``moments()`` (where it has them, e.g.
    :class:`~pyro_bqn.distributions.QuantizedCategorical`) or ``mean`` and ``variance``, so
    nothing is sampled.

    Wrap a guide with it and replay the model against the resulting trace: quantized layers
    then receive the posterior moments of their weights and propagate means and variances.
    Observed sites, sites already given a value and the subsample sites of
    ``pyro.plate(..., subsample_size=B)`` are left alone: a subsample site's value is the
    index tensor of shape ``(B,)`` that the plate (and the model, replaying the guide's
    trace) slices the data with, not a random quantity with moments.

    :raises NotImplementedError: naming the site, if its distribution has no analytic mean
        or variance.
    """

    def _pyro_sample(self, msg: Message) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        fn = msg["fn"]
        base = base_distribution(fn)
        if hasattr(base, "moments"):
            # The wrappers keep each entry's distribution; .expand may add batch dimensions.
            moments = base.moments().expand(fn.batch_shape + fn.event_shape)
            msg["value"] = SiteMoments(moments.mean, moments.var, moments.second_moment)
            msg["infer"] = {**msg["infer"], "moments": True}
            return
        try:
            mean, var = fn.mean, fn.variance
        except NotImplementedError as error:
            raise NotImplementedError(
                f"guide site '{msg['name']}' has a {type(fn).__name__} posterior with no "
                "analytic mean/variance, so it cannot be propagated without sampling"
            ) from error
        msg["value"] = SiteMoments(mean, var)
        msg["infer"] = {**msg["infer"], "moments": True}
