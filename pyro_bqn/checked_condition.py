"""Condition a model on a fixed network, checking that the network fits the model."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import torch
from pyro.poutine.condition_messenger import ConditionMessenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample

from pyro_bqn.distributions.wrappers import is_moment_likelihood

__all__ = ["CheckedConditionMessenger"]


class CheckedConditionMessenger(ConditionMessenger):
    """:class:`~pyro.poutine.condition_messenger.ConditionMessenger` for a whole network
    of weights (e.g. the most probable network or one drawn from the guide).

    Plain conditioning silently accepts three mistakes that this messenger refuses, each
    with a ``ValueError`` naming the site:

    * a value whose shape differs from its site's distribution (checked as the site is
      reached, before a layer fails on it with a shape error);
    * a latent site with no value, which would otherwise be drawn from the prior. A
      moment-aware likelihood site (one with ``expected_log_prob``, e.g. ``"obs"`` when
      predicting with ``y=None``) may stay unobserved;
    * a name that no sample site of the model carries (checked when a run completes).

    :param data: ``{site name: value}``, each value shaped ``batch_shape + event_shape`` of
        its site.
    """

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        super().__init__(dict(data))
        self._reached: set[str] = set()

    def __enter__(self) -> CheckedConditionMessenger:
        self._reached = set()
        return super().__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc_value, traceback)
        unknown = sorted(set(self.data) - self._reached)
        if exc_type is None and unknown:
            raise ValueError(
                f"the model has no sample site named {unknown[0]!r} (unknown: {unknown}); "
                "the network does not belong to this model"
            )

    def _pyro_sample(self, msg: Message) -> None:
        name = msg["name"]
        fn = msg["fn"]
        if name in self.data:
            self._reached.add(name)
            expected = fn.batch_shape + fn.event_shape
            value = self.data[name]
            if value.shape != expected:
                raise ValueError(
                    f"site '{name}' expects a value of shape {tuple(expected)}, the network "
                    f"gives shape {tuple(value.shape)}"
                )
        elif not (msg["is_observed"] or site_is_subsample(msg) or is_moment_likelihood(fn)):
            raise ValueError(
                f"model sample site '{name}' has no value in the network and would be drawn "
                "from its prior"
            )
        super()._pyro_sample(msg)
