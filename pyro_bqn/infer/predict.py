"""Sampling-free prediction from a model and its quantized guide."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from pyro import poutine
from pyro.distributions import TorchDistribution

from pyro_bqn.devices import move_to, resolve_device
from pyro_bqn.distributions.wrappers import is_moment_likelihood
from pyro_bqn.infer.checked_replay import CheckedReplayMessenger
from pyro_bqn.infer.moment_messenger import MomentMessenger
from pyro_bqn.moments import Moments
from pyro_bqn.nn.training_mode import training_mode

__all__ = ["predict", "predict_by_sampling", "predictive_distribution", "eval_mode"]


def eval_mode(model) -> AbstractContextManager[None]:
    """Deprecated second name of ``pyro_bqn.nn.training_mode(model, False)``: evaluation mode
    (batch norm on running statistics) for the duration. It warns and will be removed."""
    warnings.warn(
        "pyro_bqn.infer.eval_mode is deprecated; use pyro_bqn.nn.training_mode(model, False)",
        FutureWarning,
        stacklevel=2,
    )
    return training_mode(model, False)


def _observed_site_name(trace: poutine.Trace, site: str | None) -> str:
    candidates = [
        name
        for name, node in trace.nodes.items()
        if node["type"] == "sample" and is_moment_likelihood(node["fn"])
    ]
    if site is not None:
        if site not in trace.nodes:
            raise ValueError(f"site '{site}' is not in the model; its sites: {list(trace.nodes)}")
        return site
    if len(candidates) != 1:
        raise ValueError(
            "could not tell which site is the prediction target; pass site=<name> "
            f"(moment-aware likelihood sites found: {candidates})"
        )
    return candidates[0]


def _on_device(
    device: str | torch.device | None, model, guide, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """Move ``model`` and ``guide`` to ``device`` (in place) and return ``args`` and
    ``kwargs`` with their tensors there; nothing moves for ``device=None``."""
    if device is None:
        return args, kwargs
    target = resolve_device(device)
    move_to(target, model, guide)
    values = move_to(target, *kwargs.values())
    return tuple(move_to(target, *args)), dict(zip(kwargs, values, strict=True))


@torch.no_grad()
def predictive_distribution(
    model, guide, *args, site: str | None = None, device: str | torch.device | None = None, **kwargs
) -> TorchDistribution:
    """The observed site's distribution when the guide's moments (not samples) are
    propagated through ``model`` in evaluation mode.

    :param site: name of the observed site; default: the only site with a moment-aware
        likelihood (:class:`~pyro_bqn.distributions.MomentCategorical`, ...).
    :param device: where to compute (:func:`pyro_bqn.devices.resolve_device`): the model
        and guide move there (``model.to(device)``) and so do the tensor inputs; default:
        where they are.
    """
    args, kwargs = _on_device(device, model, guide, args, kwargs)
    # A relaxed (non-straight-through) posterior has no analytic moments: use the exact one.
    with training_mode(model, False), poutine.block(), _exact_guide(guide):
        guide_trace = poutine.trace(MomentMessenger()(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            CheckedReplayMessenger(guide_trace, allow_unobserved_likelihoods=True)(model)
        ).get_trace(*args, **kwargs)
    return model_trace.nodes[_observed_site_name(model_trace, site)]["fn"]


def predict(
    model, guide, *args, site: str | None = None, device: str | torch.device | None = None, **kwargs
) -> torch.Tensor | Moments:
    """Sampling-free predictive of ``model`` under ``guide`` for the inputs ``*args``.

    The guide's moments are propagated through the model (no network is drawn) and the
    likelihood site's predictive is returned, e.g. for a
    :class:`~pyro_bqn.distributions.MomentCategorical` with logit moments ``(mu, s^2)`` the
    probit-style approximation of ``E[softmax(f)]``.

    Example::

        >>> import torch
        >>> from pyro_bqn import AutoQuantizedGuide, QuantizedMLP, predict
        >>> model = QuantizedMLP((4, 8, 3)); guide = AutoQuantizedGuide(model)
        >>> probs = predict(model, guide, torch.randn(5, 4))
        >>> probs.shape, bool(torch.allclose(probs.sum(-1), torch.ones(5)))
        (torch.Size([5, 3]), True)

    **References**

    [1] *Sampling-free learning of Bayesian quantized neural networks*, J. Su, M. Cvitkovic,
        F. Huang (ICLR 2020)

    :param device: where to compute; the model, the guide and the tensor inputs move there
        (as for :func:`predictive_distribution`), and so does the result.
    :return: class probabilities ``(N, C)`` for a
        :class:`~pyro_bqn.distributions.MomentCategorical` site, ``P(y = 1)`` ``(N,)`` for a
        :class:`~pyro_bqn.distributions.MomentBernoulli` site, and the predictive
        :class:`~pyro_bqn.Moments` (mean, variance including the noise) for a
        :class:`~pyro_bqn.distributions.MomentNormal` site.
    """
    fn = predictive_distribution(model, guide, *args, site=site, device=device, **kwargs)
    if hasattr(fn, "probs"):
        return fn.probs
    return Moments(fn.mean, fn.variance)


@contextmanager
def _exact_guide(guide):
    """Draw exact levels even from a guide set to a relaxed temperature."""
    temperature = getattr(guide, "temperature", None)
    if temperature is not None:
        guide.temperature = None
    try:
        yield guide
    finally:
        if temperature is not None:
            guide.temperature = temperature


@torch.no_grad()
def predict_by_sampling(
    model,
    guide,
    *args,
    num_samples: int = 20,
    site: str | None = None,
    device: str | torch.device | None = None,
    **kwargs,
) -> torch.Tensor:
    """Monte Carlo predictive: the observed site's ``probs`` averaged over ``num_samples``
    discrete networks drawn from the guide, each run in evaluation mode.

    The baseline against which :func:`predict`'s analytic predictive is measured. Draws use
    torch's global generator (seed it with :func:`pyro.set_rng_seed`).

    :param device: where to compute; the model, the guide and the tensor inputs move there
        (as for :func:`predictive_distribution`).
    :return: averaged probabilities, the shape of the site's ``probs`` (``(N, C)`` for a
        categorical site).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    args, kwargs = _on_device(device, model, guide, args, kwargs)
    total = None
    with training_mode(model, False), poutine.block(), _exact_guide(guide):
        for _ in range(num_samples):
            weights = guide(*args, **kwargs)
            trace = poutine.trace(poutine.condition(model, data=weights)).get_trace(*args, **kwargs)
            probs = trace.nodes[_observed_site_name(trace, site)]["fn"].probs
            total = probs if total is None else total + probs
    return total / num_samples
