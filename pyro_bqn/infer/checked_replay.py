"""Replay a guide trace into a model, checking that the two agree site by site."""

from __future__ import annotations

from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample

from pyro_bqn.distributions.wrappers import is_moment_likelihood

__all__ = ["CheckedReplayMessenger"]


class CheckedReplayMessenger(ReplayMessenger):
    """:class:`~pyro.poutine.replay_messenger.ReplayMessenger` that refuses a latent model
    site missing from the guide trace, or whose shape differs from the guide's.

    The check runs as the site is reached, before the model uses the replayed value, so
    a mismatch is reported by site name rather than as a shape error deep in a layer.

    :param allow_unobserved_likelihoods: let a moment-aware likelihood site whose value was
        not given (prediction, ``y=None``) run without a guide counterpart.
    """

    def __init__(self, trace, allow_unobserved_likelihoods: bool = False) -> None:
        super().__init__(trace=trace)
        self.allow_unobserved_likelihoods = allow_unobserved_likelihoods

    def _pyro_sample(self, msg: Message) -> None:
        name = msg["name"]
        if not msg["is_observed"] and not site_is_subsample(msg):
            if name not in self.trace:
                if self.allow_unobserved_likelihoods and is_moment_likelihood(msg["fn"]):
                    return
                raise ValueError(f"model sample site '{name}' has no matching site in the guide")
            model_fn, guide_fn = msg["fn"], self.trace.nodes[name]["fn"]
            model_shape = model_fn.batch_shape + model_fn.event_shape
            guide_shape = guide_fn.batch_shape + guide_fn.event_shape
            if model_shape != guide_shape:
                raise ValueError(
                    f"model and guide shapes disagree at site '{name}': "
                    f"{tuple(model_shape)} vs {tuple(guide_shape)}"
                )
        super()._pyro_sample(msg)
