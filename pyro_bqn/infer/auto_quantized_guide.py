"""An autoguide with categorical posteriors over the levels of every quantized weight."""

from __future__ import annotations

from contextlib import ExitStack
from operator import attrgetter
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.guides import prototype_hide_fn
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam

from pyro_bqn.distributions import relaxed_quantized_categorical as relaxed
from pyro_bqn.distributions.quantized_categorical import QuantizedCategorical
from pyro_bqn.levels import LevelSet

__all__ = ["AutoQuantizedGuide"]


def _hide_from_prototype(msg) -> bool:
    """Pyro's rule, plus: an unobserved moment-aware likelihood (a model run for prediction,
    ``y=None``) is the model's output, not a latent the guide should cover."""
    return prototype_hide_fn(msg) or hasattr(msg.get("fn"), "expected_log_prob")


def _unwrap(fn: dist.TorchDistribution) -> dist.TorchDistribution:
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution | dist.MaskedDistribution):
        fn = fn.base_dist
    return fn


class AutoQuantizedGuide(AutoGuide):
    r"""A mean-field guide for models with quantized weights.

    * A site whose prior is over a level set (a
      :class:`~pyro_bqn.distributions.QuantizedCategorical` or
      :class:`~pyro_bqn.distributions.MultipleSpikeAndSlab`) gets a categorical posterior
      ``q(w = v_k) = softmax(theta)_k`` with one logit vector per weight.
    * A real-valued continuous site (e.g. a bias) gets ``Normal(loc, scale)`` — the KL to a
      Normal prior is analytic.

    The logits of site ``name`` are the parameter ``guide.logits.<name>``, stored
    level-major with shape ``(K,) + weight_shape`` (reductions over the levels are then
    contiguous); :meth:`site_logits` gives the ``weight_shape + (K,)`` view.

    Logits start from ``theta_k = -(w_0 - v_k)^2 / (2 init_scale^2)`` around a float weight
    ``w_0``: drawn uniformly on ``[v_1, v_K]`` (seed with :func:`pyro.set_rng_seed`), or taken
    from ``init_weights`` (e.g. a trained float network's weights, in the levels' units).

    The same guide serves three uses, chosen by what is asked of it:

    * under :class:`~pyro_bqn.infer.DeterministicELBO` / :func:`~pyro_bqn.infer.predict`,
      its moments are propagated;
    * called plainly (e.g. by :class:`pyro.infer.Predictive`), it draws discrete networks;
    * with ``temperature`` set, quantized sites are relaxed (Gumbel-softmax, straight-through
      by default), so the model trains with :class:`pyro.infer.Trace_ELBO` — the sampling
      baseline.

    :param model: a Pyro model (typically a :class:`~pyro.nn.PyroModule`).
    :param init_scale: width of the initial posterior around ``w_0``, in level units.
    :param init_weights: optional ``{site name: tensor}`` of initial float weights.
    :param init_loc_scale: initial standard deviation of continuous sites' Normal posteriors.
    :param temperature: ``None`` for the exact categorical posterior, or the Gumbel-softmax
        temperature ``> 0`` of the relaxed posterior.
    :param straight_through: with a temperature, draw exact levels forward and pass relaxed
        gradients backward (so the prior's ``log_prob`` stays finite and exact).
    """

    _prototype_hide_fn = staticmethod(_hide_from_prototype)

    def __init__(
        self,
        model,
        *,
        init_scale: float = 0.5,
        init_weights: dict[str, torch.Tensor] | None = None,
        init_loc_scale: float = 0.1,
        temperature: float | None = None,
        straight_through: bool = True,
        create_plates=None,
    ) -> None:
        for name, value in (("init_scale", init_scale), ("init_loc_scale", init_loc_scale)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.init_scale = init_scale
        self.init_weights = dict(init_weights or {})
        self.init_loc_scale = init_loc_scale
        self.temperature = temperature
        self.straight_through = straight_through
        super().__init__(model, create_plates=create_plates)

    @property
    def temperature(self) -> float | None:
        """Gumbel-softmax temperature of the relaxed posterior, or ``None`` (exact)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float | None) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"temperature must be positive or None, got {value}")
        self._temperature = value

    def _setup_prototype(self, *args, **kwargs) -> None:
        # The prototype run draws weights from the prior; keep it from moving batch-norm
        # running statistics (or any other buffer) of the user's model.
        model = self.model
        buffers = (
            {k: v.clone() for k, v in model.named_buffers()}
            if isinstance(model, torch.nn.Module)
            else {}
        )
        super()._setup_prototype(*args, **kwargs)
        if buffers:
            with torch.no_grad():
                for key, buffer in model.named_buffers():
                    buffer.copy_(buffers[key])

        self.logits = PyroModule()
        self.locs = PyroModule()
        self.scales = PyroModule()
        self._event_dims: dict[str, int] = {}
        # Plain dicts: the model's level sets must not become submodules of the guide.
        self._levels: dict[str, LevelSet | torch.Tensor] = {}
        unknown = set(self.init_weights)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn = site["fn"]
            self._event_dims[name] = fn.event_dim
            base = _unwrap(fn)
            if hasattr(base, "levels"):
                self._levels[name] = (
                    base.level_set if base.level_set is not None else base.levels.detach()
                )
                init = self._init_logits(name, site["value"], base.levels.detach())
                # Stored level-major, (K,) + weight shape: reductions over the K levels then
                # add K contiguous slices instead of striding through (..., K) triples.
                init = init.movedim(-1, 0).contiguous()
                deep_setattr(self.logits, name, PyroParam(init, constraints.real, fn.event_dim + 1))
            elif base.support is constraints.real:
                loc = self._init_weight(name, site["value"])
                loc = torch.zeros_like(site["value"]) if loc is None else loc
                scale = torch.full_like(site["value"], self.init_loc_scale)
                deep_setattr(
                    self.locs, name, PyroParam(loc.detach().clone(), constraints.real, fn.event_dim)
                )
                deep_setattr(
                    self.scales, name, PyroParam(scale, constraints.softplus_positive, fn.event_dim)
                )
            else:
                raise ValueError(
                    f"AutoQuantizedGuide cannot handle site '{name}': its prior "
                    f"{type(fn).__name__} is neither over a level set nor real-valued "
                    f"(support {fn.support})"
                )
            unknown.discard(name)
        if unknown:
            raise ValueError(f"init_weights names sites the model does not have: {sorted(unknown)}")

    def _init_weight(self, name: str, value: torch.Tensor) -> torch.Tensor | None:
        """``init_weights[name]`` checked against the site's value, or ``None``."""
        if name not in self.init_weights:
            return None
        w0 = torch.as_tensor(self.init_weights[name], dtype=value.dtype)
        if w0.shape != value.shape:
            raise ValueError(
                f"init_weights['{name}'] must have shape {tuple(value.shape)}, "
                f"got {tuple(w0.shape)}"
            )
        if not torch.isfinite(w0).all():
            raise ValueError(f"init_weights['{name}'] must be finite")
        return w0

    def _init_logits(self, name: str, value: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        w0 = self._init_weight(name, value.to(levels.dtype))
        if w0 is None:
            w0 = levels[0] + (levels[-1] - levels[0]) * torch.rand(value.shape, dtype=levels.dtype)
        return -(w0.unsqueeze(-1) - levels).square() / (2 * self.init_scale**2)

    def _level_values(self, name: str) -> torch.Tensor:
        levels = self._levels[name]
        return levels.values if isinstance(levels, LevelSet) else levels

    def get_posterior(self, name: str) -> dist.TorchDistribution:
        """The posterior of site ``name`` as a distribution with the site's event dims."""
        if name in self._levels and self.temperature is not None:
            cls = (
                relaxed.RelaxedQuantizedCategoricalStraightThrough
                if self.straight_through
                else relaxed.RelaxedQuantizedCategorical
            )
            logits = self.site_logits(name)
            base = cls(self._level_values(name), self.temperature, logits=logits)
        else:
            base = self.exact_posterior(name)
        return base.to_event(self._event_dims[name])

    def site_logits(self, name: str) -> torch.Tensor:
        """Posterior logits of quantized site ``name``, shape ``weight_shape + (K,)`` (a view
        of the level-major parameter ``guide.logits.<name>`` of shape ``(K,) + weight_shape``)."""
        return attrgetter(name)(self.logits).movedim(0, -1)

    @property
    def quantized_sites(self) -> list[str]:
        """Names of the sites with a categorical posterior over levels, in model order."""
        return list(self._levels)

    def exact_posterior(self, name: str) -> dist.TorchDistribution:
        """The exact (never relaxed) posterior of site ``name``, without its event dims:
        a :class:`~pyro_bqn.distributions.QuantizedCategorical` with batch shape equal to
        the weight's shape, or a ``Normal`` for a continuous site."""
        if name in self._levels:
            logits = self.site_logits(name)
            # The logits are this guide's own unconstrained parameters; re-validating them
            # costs several passes over every weight per step. DeterministicELBO refuses a
            # NaN loss instead. A LevelSet (rather than its values) skips re-checking levels
            # the model's prior has checked already.
            return QuantizedCategorical(self._levels[name], logits=logits, validate_args=False)
        return dist.Normal(attrgetter(name)(self.locs), attrgetter(name)(self.scales))

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, self.get_posterior(name))
        return result

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The most probable network: each weight's most probable level (a continuous
        site's posterior mean)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result: dict[str, Any] = {}
        for name in self._event_dims:
            posterior = self.exact_posterior(name)
            result[name] = posterior.mode if name in self._levels else posterior.mean
        return result
