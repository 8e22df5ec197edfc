"""Weight the KL term of a sampling ELBO by scaling latent sites."""

from __future__ import annotations

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message

__all__ = ["ScaleLatentsMessenger"]


class ScaleLatentsMessenger(Messenger):
    """Multiplies the scale of every unobserved sample site by ``scale``.

    Applied to both model and guide it turns the KL term into ``scale * KL(q || p)``, whether
    the ELBO computes it in closed form (weighted by the guide site's scale) or by Monte Carlo
    (model site's ``log p`` minus guide site's ``log q``); the likelihood is untouched. This is
    how a tempered posterior (``kl_weight`` of :class:`~pyro_bqn.infer.DeterministicELBO`) is
    expressed for Pyro's own ELBOs.
    """

    def __init__(self, scale: float) -> None:
        if not scale >= 0:
            raise ValueError(f"scale must be non-negative, got {scale}")
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: Message) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.scale * msg["scale"]
