"""An autoguide with posteriors over the levels of every quantized weight: categorical,
partitioned (a latent Gaussian weight quantized by learned thresholds) or spike-and-slab."""

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
from pyro_bqn.distributions.multiple_spike_and_slab import MultipleSpikeAndSlab
from pyro_bqn.distributions.partition import partition_log_probs
from pyro_bqn.distributions.quantized_categorical import QuantizedCategorical
from pyro_bqn.distributions.wrappers import is_moment_likelihood
from pyro_bqn.levels import LearnableThresholds, LevelSet
from pyro_bqn.priors import base_distribution

__all__ = ["AutoQuantizedGuide", "POSTERIORS"]

#: The kinds of posterior :class:`AutoQuantizedGuide` puts on quantized weights.
POSTERIORS = ("categorical", "partition", "spike-and-slab")


def _hide_from_prototype(msg) -> bool:
    """Pyro's rule, plus: an unobserved moment-aware likelihood (a model run for prediction,
    ``y=None``) is the model's output, not a latent the guide should cover."""
    return prototype_hide_fn(msg) or is_moment_likelihood(msg.get("fn"))


class AutoQuantizedGuide(AutoGuide):
    r"""A mean-field guide for models with quantized weights.

    A site whose prior is over a level set (a
    :class:`~pyro_bqn.distributions.QuantizedCategorical` or
    :class:`~pyro_bqn.distributions.MultipleSpikeAndSlab`) gets, by ``posterior``:

    * ``"categorical"`` (default): ``q(w = v_k) = softmax(theta)_k``, one logit vector per
      weight, stored level-major as ``guide.logits.<name>`` of shape ``(K,) + weight_shape``
      (reductions over the levels are then contiguous).
    * ``"partition"``: a latent real weight ``u ~ N(m, s^2)`` quantized by learned
      partitions ``t_1 < ... < t_{K-1}`` (one set per site): ``w = v_k`` where
      ``t_{k-1} <= u < t_k``, so ``q(w = v_k) = Phi((t_k - m)/s) - Phi((t_{k-1} - m)/s)``
      (:func:`~pyro_bqn.distributions.partition.partition_log_probs`). This is the quantizer
      of Bayesian asymmetric M-ary quantization (Chien & Chang, *Pattern Recognition* 139,
      2023) with partitions and levels both learned; its posterior is a categorical with two
      parameters per weight (``guide.latent_locs.<name>``, ``guide.latent_scales.<name>``)
      instead of ``K``, ordered along the levels, plus the partitions
      ``guide.partitions.<name>`` (a :class:`~pyro_bqn.levels.LearnableThresholds`).
    * ``"spike-and-slab"`` (needs a :class:`~pyro_bqn.distributions.MultipleSpikeAndSlab`
      prior with ``slab_prob > 0``): a
      :class:`~pyro_bqn.distributions.MultipleSpikeAndSlab` per weight: the levels with
      weights ``softmax(theta)_{1..K}`` and a full-precision slab
      ``N(guide.slab_locs.<name>, guide.slab_scales.<name>^2)`` with weight
      ``softmax(theta)_{K+1}`` (``guide.logits.<name>`` of shape ``(K + 1,) + weight_shape``).
      Where the prior's spikes have a width, the posterior's spikes have a learned width of
      their own (``guide.spike_scales.<name>``, one per site, starting at the prior's), so
      the prior's ``slab_scale``, ``slab_prob`` and ``spike_scale`` all act on the KL; the
      most probable network keeps the weights whose slab outweighs every level at full
      precision (see :func:`~pyro_bqn.export_network`).

    A real-valued continuous site (e.g. a bias) gets ``Normal(loc, scale)`` — the KL to a
    Normal prior is analytic.

    The posterior starts around a float weight ``w_0``: drawn uniformly on ``[v_1, v_K]``
    (seed with :func:`pyro.set_rng_seed`), or taken from ``init_weights`` (e.g. a trained
    float network's weights, in the levels' units). Categorical logits start at
    ``theta_k = -(w_0 - v_k)^2 / (2 init_scale^2)``; a partition posterior at ``m = w_0``,
    ``s = init_scale`` with the partitions at the midpoints between levels; a spike-and-slab
    posterior with the categorical's spikes, the prior's slab weight and the slab at ``w_0``
    with scale ``init_loc_scale``.

    The same guide serves three uses, chosen by what is asked of it:

    * under :class:`~pyro_bqn.infer.DeterministicELBO` / :func:`~pyro_bqn.infer.predict`,
      its moments are propagated;
    * called plainly (e.g. by :class:`pyro.infer.Predictive`), it draws networks;
    * with ``temperature`` set, categorical and partition sites are relaxed (Gumbel-softmax,
      straight-through by default), so the model trains with :class:`pyro.infer.Trace_ELBO`
      — the sampling baseline.

    Usage::

        >>> import pyro, torch
        >>> from pyro_bqn import AutoQuantizedGuide, DeterministicELBO, QuantizedLinear, levels
        >>> from pyro_bqn.priors import SpikeAndSlabPrior
        >>> from pyro_bqn.distributions import MomentCategorical
        >>> class Net(pyro.nn.PyroModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = QuantizedLinear(4, 3, levels=levels.learnable([-1, -0.2, 0.4, 1.2]),
        ...                                   prior=SpikeAndSlabPrior(0.05, 1.0, 0.02))
        ...     def forward(self, x, y=None):
        ...         logits = self.fc(x)  # outside the plate: the weights are global
        ...         with pyro.plate("data", x.shape[0]):
        ...             return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)
        >>> model = Net(); guide = AutoQuantizedGuide(model, posterior="spike-and-slab")
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), DeterministicELBO())
        >>> loss = svi.step(torch.randn(8, 4), torch.randint(0, 3, (8,)))

    **References**

    [1] *Sampling-free learning of Bayesian quantized neural networks*, J. Su, M. Cvitkovic,
        F. Huang (ICLR 2020)
    [2] *Bayesian asymmetric quantized neural networks*, J.-T. Chien, S.-T. Chang (Pattern
        Recognition 139, 2023): the partition and spike-and-slab posteriors
    [3] *Categorical reparameterization with Gumbel-softmax*, E. Jang, S. Gu, B. Poole
        (ICLR 2017): the relaxed guide of the sampling baseline

    :param model: a Pyro model (typically a :class:`~pyro.nn.PyroModule`).
    :param posterior: one of :data:`POSTERIORS`, for every quantized site.
    :param init_scale: width of the initial posterior around ``w_0``, in level units.
    :param init_weights: optional ``{site name: tensor}`` of initial float weights.
    :param init_loc_scale: initial standard deviation of continuous sites' Normal posteriors
        and of the slabs of spike-and-slab posteriors.
    :param temperature: ``None`` for the exact posterior, or the Gumbel-softmax
        temperature ``> 0`` of the relaxed one (not with ``posterior="spike-and-slab"``).
    :param straight_through: with a temperature, draw exact levels forward and pass relaxed
        gradients backward (so the prior's ``log_prob`` stays finite and exact).
    """

    _prototype_hide_fn = staticmethod(_hide_from_prototype)

    def __init__(
        self,
        model,
        *,
        posterior: str = "categorical",
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
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, got {posterior!r}")
        self.posterior = posterior
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
        if value is not None and self.posterior == "spike-and-slab":
            raise ValueError(
                "a spike-and-slab posterior has no relaxed form: use temperature=None (or "
                "posterior='categorical' for the relaxed Trace_ELBO baseline)"
            )
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
        # Spike-and-slab sites whose spikes have a learned width (the prior's are Gaussian).
        self._wide_spikes: set[str] = set()
        unknown = set(self.init_weights)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            fn = site["fn"]
            self._event_dims[name] = fn.event_dim
            base = base_distribution(fn)
            if hasattr(base, "levels"):
                self._levels[name] = (
                    base.level_set if base.level_set is not None else base.levels.detach()
                )
                levels = base.levels.detach()
                w0 = self._init_weight(name, site["value"].to(levels.dtype))
                if w0 is None:
                    draw = torch.rand(site["value"].shape, dtype=levels.dtype, device=levels.device)
                    w0 = levels[0] + (levels[-1] - levels[0]) * draw
                self._setup_quantized(name, base, w0, levels, fn.event_dim)
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

    def _container(self, attribute: str) -> PyroModule:
        """The guide's submodule ``attribute`` that holds one kind of parameter per site."""
        if attribute not in self._modules:
            setattr(self, attribute, PyroModule())
        return getattr(self, attribute)

    def _setup_quantized(
        self,
        name: str,
        prior: dist.TorchDistribution,
        w0: torch.Tensor,
        levels: torch.Tensor,
        event_dim: int,
    ) -> None:
        """Create the posterior parameters of quantized site ``name`` around weights ``w0``."""
        logits = -(w0.unsqueeze(-1) - levels).square() / (2 * self.init_scale**2)
        if self.posterior == "categorical":
            # Stored level-major, (K,) + weight shape: reductions over the K levels then
            # add K contiguous slices instead of striding through (..., K) triples.
            init = logits.movedim(-1, 0).contiguous()
            deep_setattr(self.logits, name, PyroParam(init, constraints.real, event_dim + 1))
            return
        if self.posterior == "partition":
            latent_scale = torch.full_like(w0, self.init_scale)
            deep_setattr(self._container("latent_locs"), name,
                         PyroParam(w0.detach().clone(), constraints.real, event_dim))
            deep_setattr(self._container("latent_scales"), name,
                         PyroParam(latent_scale, constraints.softplus_positive, event_dim))
            midpoints = 0.5 * (levels[1:] + levels[:-1])
            deep_setattr(self._container("partitions"), name, LearnableThresholds(midpoints))
            return
        if not isinstance(prior, MultipleSpikeAndSlab) or not bool((prior.slab_prob > 0).all()):
            raise ValueError(
                f"posterior='spike-and-slab' needs a MultipleSpikeAndSlab prior with "
                f"slab_prob > 0 at site '{name}', got {type(prior).__name__}"
                + (f" with slab_prob {prior.slab_prob.max().item()}"
                   if isinstance(prior, MultipleSpikeAndSlab) else "")
                + " (e.g. prior=pyro_bqn.priors.SpikeAndSlabPrior(slab_prob=0.05))"
            )
        slab_prob = prior.slab_prob.detach().mean().clamp(1e-6, 1 - 1e-6)
        spikes = torch.log_softmax(logits, -1) + torch.log1p(-slab_prob)
        slab = slab_prob.log().expand(w0.shape).unsqueeze(-1)
        init = torch.cat([spikes, slab], -1).movedim(-1, 0).contiguous()
        deep_setattr(self.logits, name, PyroParam(init, constraints.real, event_dim + 1))
        slab_scale = torch.full_like(w0, self.init_loc_scale)
        deep_setattr(self._container("slab_locs"), name,
                     PyroParam(w0.detach().clone(), constraints.real, event_dim))
        deep_setattr(self._container("slab_scales"), name,
                     PyroParam(slab_scale, constraints.softplus_positive, event_dim))
        if not prior.point_mass:
            spike_scale = prior.spike_scale.detach().mean()
            deep_setattr(self._container("spike_scales"), name,
                         PyroParam(spike_scale, constraints.softplus_positive, 0))
            self._wide_spikes.add(name)

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
        """Posterior logits of quantized site ``name``, shape ``weight_shape + (K,)``
        (``weight_shape + (K + 1,)`` for a spike-and-slab posterior, the slab's last).

        For a categorical or spike-and-slab posterior, a view of the level-major parameter
        ``guide.logits.<name>`` of shape ``(K,) + weight_shape``; for a partition posterior,
        the log-probabilities of the levels that the latent weights and partitions give."""
        if self.posterior == "partition":
            return self._partition_log_probs(name).movedim(0, -1)
        return attrgetter(name)(self.logits).movedim(0, -1)

    def _partition_log_probs(self, name: str) -> torch.Tensor:
        """Level-major ``(K,) + weight_shape`` log-probabilities of a partition posterior."""
        loc = attrgetter(name)(self.latent_locs)
        scale = attrgetter(name)(self.latent_scales)
        return partition_log_probs(loc, scale, self.partitions_of(name))

    def partitions_of(self, name: str) -> torch.Tensor:
        """The learned partitions ``t_1 < ... < t_{K-1}`` of site ``name``, shape ``(K - 1,)``
        (a partition posterior only)."""
        if self.posterior != "partition":
            raise ValueError(f"site '{name}' has a {self.posterior} posterior, without partitions")
        return attrgetter(name)(self.partitions).values

    @property
    def quantized_sites(self) -> list[str]:
        """Names of the sites with a posterior over levels, in model order."""
        return list(self._levels)

    def exact_posterior(self, name: str) -> dist.TorchDistribution:
        """The exact (never relaxed) posterior of site ``name``, without its event dims,
        with batch shape equal to the weight's shape: a
        :class:`~pyro_bqn.distributions.QuantizedCategorical` (categorical and partition
        posteriors), a :class:`~pyro_bqn.distributions.MultipleSpikeAndSlab` (spike-and-slab
        posterior), or a ``Normal`` for a continuous site."""
        if name not in self._levels:
            return dist.Normal(attrgetter(name)(self.locs), attrgetter(name)(self.scales))
        # The logits are this guide's own unconstrained parameters; re-validating them
        # costs several passes over every weight per step. DeterministicELBO refuses a
        # NaN loss instead. A LevelSet (rather than its values) skips re-checking levels
        # the model's prior has checked already.
        levels = self._levels[name]
        if self.posterior == "spike-and-slab":
            spike_scale = (
                attrgetter(name)(self.spike_scales) if name in self._wide_spikes else 0.0
            )
            return MultipleSpikeAndSlab.from_logits(
                levels,
                self.site_logits(name),
                slab_loc=attrgetter(name)(self.slab_locs),
                slab_scale=attrgetter(name)(self.slab_scales),
                spike_scale=spike_scale,
                validate_args=False,
            )
        return QuantizedCategorical(levels, logits=self.site_logits(name), validate_args=False)

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
        """The most probable network: each weight's most probable level (for a spike-and-slab
        posterior, its slab's mean where the slab outweighs every level: a full-precision
        weight), and each continuous site's posterior mean."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result: dict[str, Any] = {}
        for name in self._event_dims:
            posterior = self.exact_posterior(name)
            result[name] = posterior.mode if name in self._levels else posterior.mean
        return result
