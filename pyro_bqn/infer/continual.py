"""Continual learning: yesterday's posterior is today's prior.

After training on one task, :func:`posterior_as_prior` turns the guide's posterior into the
model's prior, so the next task's ELBO

.. math::
    \\mathbb{E}_{q'}[\\log p(\\mathcal{D}_{t+1} \\mid w)] - \\beta\\,
    \\mathrm{KL}(q' \\,\\|\\, q_t)

pays for every weight it moves away from what task ``t`` learned (variational continual
learning; BayesBiNN's continual mode for binary weights). Both KLs stay analytic: categorical
against a per-weight categorical, Normal against Normal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pyro.nn import PyroModule, PyroSample

from pyro_bqn.infer.auto_quantized_guide import AutoQuantizedGuide
from pyro_bqn.nn.quantized_layer import QuantizedLayer
from pyro_bqn.priors import (
    NormalSitePrior,
    PerWeightCategoricalPrior,
    check_floor,
    check_strength,
)

__all__ = ["posterior_as_prior"]

#: The suffix of the child module that holds a continuous site's prior: ``<site>_prior``.
PRIOR_SUFFIX = "_prior"


@dataclass(frozen=True)
class ChildPrior:
    """A :class:`pyro.nn.PyroSample` prior that calls the owner's child module ``child``
    (a :class:`~pyro_bqn.priors.NormalSitePrior`). Naming the child rather than holding it
    keeps the prior's tensors the owner's buffers, whatever ``model.to(...)`` does."""

    child: str

    def __call__(self, owner: torch.nn.Module) -> Any:
        return getattr(owner, self.child)(owner)


def _site_owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The module that declares site ``name`` (``"body.3.bias"`` -> ``model.body[3]``) and
    the attribute it declares it as."""
    path, _, attribute = name.rpartition(".")
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        owner = None
    if not isinstance(owner, PyroModule) or attribute not in owner._pyro_samples:
        raise ValueError(
            f"site '{name}' is not a PyroSample attribute of a submodule of the model: "
            "posterior_as_prior works with models built from PyroModules (the library's "
            "layers and PyroSample attributes)"
        )
    return owner, attribute


def posterior_as_prior(
    model: torch.nn.Module,
    guide: AutoQuantizedGuide,
    *,
    strength: float = 1.0,
    floor: float = 1e-3,
) -> list[str]:
    r"""Make ``guide``'s posterior the prior of ``model``, in place: the continual-learning
    step between two tasks.

    * the weight site of every :class:`~pyro_bqn.nn.quantized_layer.QuantizedLayer` gets a
      :class:`~pyro_bqn.priors.PerWeightCategoricalPrior`: per weight, the categorical the
      guide learned over the same levels, ``p = (1 - floor) q^strength / Z + floor / K``
      (see :meth:`~pyro_bqn.priors.PerWeightCategoricalPrior.from_posterior` for why the
      floor: a level probability of 0 would make the next task's KL infinite);
    * every real-valued site (a bias) gets its guide posterior ``Normal(loc, scale)``
      tempered the same way, ``Normal(loc, scale / sqrt(strength))``
      (:class:`~pyro_bqn.priors.NormalSitePrior`, registered on the site's module as
      ``<site>_prior``).

    The priors' tensors are buffers of the model, so they move with ``model.to(...)`` and
    are saved by :func:`~pyro_bqn.save_checkpoint`. To load such a checkpoint, build the model
    and guide, run the guide once, call ``posterior_as_prior`` (which creates the buffers;
    their values are then overwritten) and :func:`~pyro_bqn.load_checkpoint`.

    The guide keeps its parameters: the next task starts from this posterior (fine-tuning)
    and is pulled back towards it by the KL term. Calling it again after the next task
    replaces the priors.

    Usage::

        >>> import pyro, torch
        >>> from pyro_bqn import AutoQuantizedGuide, QuantizedMLP, fit
        >>> pyro.clear_param_store()
        >>> x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
        >>> model = QuantizedMLP((4, 8, 2)); guide = AutoQuantizedGuide(model)
        >>> _ = fit(model, guide, x, y, epochs=1, batch_size=20, progress=False)
        >>> posterior_as_prior(model, guide, strength=1.0)
        ['body.1.weight', 'body.4.weight', 'body.4.bias']
        >>> _ = fit(model, guide, x, 1 - y, epochs=1, batch_size=20, progress=False)

    **References**

    [1] *Variational continual learning*, C. V. Nguyen, Y. Li, T. D. Bui, R. E. Turner
        (ICLR 2018): the posterior of one task as the prior of the next
    [2] *Training binary neural networks using the Bayesian learning rule*, X. Meng,
        R. Bachmann, M. E. Khan (ICML 2020): the same for binary weights, by natural
        parameters (:meth:`pyro_bqn.baselines.BayesBiNN.posterior_as_prior_`)

    :param model: the model ``guide`` was trained on, built from PyroModules.
    :param guide: a trained :class:`~pyro_bqn.AutoQuantizedGuide` with a ``"categorical"`` or
        ``"partition"`` posterior (it must have run, e.g. one training step).
    :param strength: multiplies the posterior's natural parameters, ``> 0``: ``1`` is the
        posterior itself, smaller values a weaker prior (towards uniform), larger a stronger.
    :param floor: share of the uniform distribution mixed into each categorical, in
        ``(0, 1)``; every level keeps prior probability at least ``floor / K``.
    :returns: the names of the sites whose prior was replaced, in model order.
    :raises ValueError: before changing anything, for a bad ``strength`` or ``floor``, a
        guide that has not run or has a spike-and-slab posterior, or a site that is not the
        weight of a quantized layer nor a ``PyroSample`` attribute.
    """
    check_strength(strength)
    check_floor(floor)
    if not isinstance(guide, AutoQuantizedGuide):
        raise ValueError(f"guide must be an AutoQuantizedGuide, got {type(guide).__name__}")
    if guide.prototype_trace is None:
        raise ValueError("the guide has not run yet: train it (or call it once) first")
    if guide.posterior == "spike-and-slab":
        raise ValueError(
            "posterior_as_prior needs a 'categorical' or 'partition' posterior: a spike-and-"
            "slab posterior's slab has no categorical prior to become"
        )
    quantized = set(guide.quantized_sites)
    updates: list[tuple[Any, ...]] = []
    # Everything is worked out first, so that an error leaves the model as it was.
    with torch.no_grad():
        for name, site in guide.prototype_trace.iter_stochastic_nodes():
            owner, attribute = _site_owner(model, name)
            if name in quantized:
                if not isinstance(owner, QuantizedLayer) or attribute != "weight":
                    raise ValueError(
                        f"site '{name}' has a posterior over levels but is not the weight of a "
                        "QuantizedLayer: declare quantized weights with the library's layers"
                    )
                log_q = torch.log_softmax(guide.site_logits(name), dim=-1).movedim(-1, 0)
                prior = PerWeightCategoricalPrior.from_posterior(log_q, strength, floor)
                owner.checked_prior(prior(owner.levels), owner.levels, owner.levels.values)
                updates.append((owner, "prior", prior, None))
            else:
                posterior = guide.exact_posterior(name)
                prior = NormalSitePrior.from_posterior(
                    posterior.loc, posterior.scale, site["fn"].event_dim, strength
                )
                updates.append((owner, attribute + PRIOR_SUFFIX, prior, attribute))
    for owner, attribute, prior, site_attribute in updates:
        setattr(owner, attribute, prior)  # a child module: its buffers join the model's
        if site_attribute is not None:
            setattr(owner, site_attribute, PyroSample(ChildPrior(attribute)))
    return [name for name, _ in guide.prototype_trace.iter_stochastic_nodes()]
