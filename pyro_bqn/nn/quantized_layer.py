"""The shared machinery of quantized weight layers: priors built from the current levels,
and moment propagation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.nn import PyroModule, PyroSample

from pyro_bqn.levels import LevelSet, from_values, ternary
from pyro_bqn.moments import Moments, SiteMoments, moments_of, split_moments
from pyro_bqn.priors import DistributionPrior, PriorFactory, as_prior_factory

__all__ = ["QuantizedLayer", "propagate", "VARIANCE_FLOOR"]

# Output variances are floored here so that the next layer's ratios mu / sigma stay finite
# when every input and weight happens to be (nearly) certain.
VARIANCE_FLOOR = 1e-8

Operand = torch.Tensor | Moments | SiteMoments


def propagate(
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: Operand,
    weight: Operand,
    feature_dims: int | None = None,
) -> torch.Tensor | Moments:
    r"""Apply a bilinear map ``op(x, W)`` (a linear layer or a convolution) to inputs and
    weights that are fixed tensors or independent ``(mean, var)`` pairs.

    With ``x ~ (m, s)`` and ``W ~ (E[W], Var[W])`` independent and entries mean-field:

    .. math::
        \mu_y = op(m, E[W]), \qquad
        \sigma^2_y = op(m^2, Var[W]) + op(s, E[W^2])

    Terms that vanish (fixed input: ``s = 0``; fixed weight: ``Var[W] = 0``) are skipped,
    so a fixed input costs two products and fixed input *and* weights one (the ordinary
    layer, returning a plain tensor).

    When every input has the same second moment ``E[x^2] = c`` (the outputs of
    :class:`~pyro_bqn.nn.Sign` have ``c = 1``), ``m^2 = c - s`` gives the same variance with
    one product over the batch instead of two, and no cancelling subtraction:

    .. math::
        \sigma^2_y = c \, op(1, Var[W]) + op(s, E[W]^2)

    where ``op(1, .)`` acts on a single example of ones (it broadcasts over the batch).

    :param feature_dims: how many trailing dimensions of ``x`` make one example (1 for a
        linear layer, 3 for a 2-D convolution), which lets the rule above build its example
        of ones; ``None`` always uses the general rule.
    """
    x_moments, w_moments = moments_of(x), moments_of(weight)
    x_mean = x if x_moments is None else x_moments.mean
    w_mean = weight if w_moments is None else w_moments.mean
    mean = op(x_mean, w_mean)
    if x_moments is None and w_moments is None:
        return mean
    constant = None if x_moments is None else x_moments.constant_second_moment
    if constant is not None and w_moments is not None and feature_dims is not None:
        ones = x_mean.new_ones(x_mean.shape[x_mean.dim() - feature_dims :])
        var = constant * op(ones, w_moments.var) + op(x_moments.var, w_mean.square())
        return Moments(mean, var.clamp_min(VARIANCE_FLOOR))
    var = torch.zeros_like(mean)
    if w_moments is not None:
        var = var + op(x_mean.square(), w_moments.var)
    if x_moments is not None:
        w_second = w_mean.square() if w_moments is None else w_moments.second_moment
        var = var + op(x_moments.var, w_second)
    return Moments(mean, var.clamp_min(VARIANCE_FLOOR))


def add_bias(
    y: torch.Tensor | Moments, bias: Operand, view: Sequence[int]
) -> torch.Tensor | Moments:
    """Add a fixed or moment bias of shape ``(C,)``, viewed as ``view`` to broadcast."""
    b_mean, b_var = split_moments(bias)
    y_mean, y_var = split_moments(y)
    mean = y_mean + b_mean.reshape(view)
    if y_var is None and b_var is None:
        return mean
    var = torch.zeros_like(mean) if y_var is None else y_var
    if b_var is not None:
        var = var + b_var.reshape(view)
    return Moments(mean, var)


def _check_same_values(prior_values: torch.Tensor, values: torch.Tensor) -> None:
    if prior_values.shape != values.shape or not torch.equal(
        prior_values.detach(), values.detach()
    ):
        raise ValueError(
            f"prior levels {prior_values.tolist()} differ from the layer's levels "
            f"{values.tolist()}"
        )


def _weight_site_prior(layer: QuantizedLayer) -> TorchDistributionMixin:
    """The weight site's prior, built at every call from the layer's current levels.

    Bound to the site by ``PyroSample`` (a module-level function, so the layer pickles), it
    dispatches to :meth:`QuantizedLayer.weight_prior`, so a subclass's override is used.
    The levels are read here, inside the model's module context: that is what puts learnable
    levels into Pyro's param store (and so in front of the optimiser).
    """
    level_set = layer.levels
    values = level_set.values
    prior = layer.checked_prior(layer.weight_prior(level_set), level_set, values)
    return prior.expand(layer.weight_shape).to_event()


def _bias_site_prior(layer: QuantizedLayer) -> TorchDistributionMixin:
    """``Normal(0, bias_prior_scale)`` over the ``C`` biases, with the dtype and device of
    the layer's levels (so it follows ``model.to(...)``)."""
    like = layer.levels.values.detach()
    loc = like.new_zeros(layer.out_channels)
    return dist.Normal(loc, layer.bias_prior_scale).to_event()


class QuantizedLayer(PyroModule):
    """Base class of layers whose weight is a Pyro sample site over a level set.

    ``weight`` has the prior ``weight_prior(levels).expand(weight_shape).to_event(...)``,
    built at every call from the layer's *current* levels (so it follows learnable levels
    as they learn, and the layer's dtype and device); the optional ``bias`` is a real-valued
    site with prior ``Normal(0, bias_prior_scale).expand([C]).to_event(1)``.

    Learnable levels (:func:`pyro_bqn.levels.learnable`) are parameters of the model: the
    layer reads them at every call, inside its module context, so they are in Pyro's param
    store, move under :class:`~pyro.infer.SVI` and are saved by checkpoints and exported
    networks. Give each layer its own copy (:meth:`~pyro_bqn.levels.LevelSet.copy`).

    :param weight_shape: shape of the weight tensor.
    :param out_channels: ``C``, the number of biases.
    :param levels: the level set (a :class:`~pyro_bqn.levels.LevelSet` or a sequence of
        values); default: the prior's levels, else ternary ``{-1, 0, 1}``.
    :param prior: the weights' prior, one of

        * ``None``: uniform over the levels;
        * a prior factory, ``levels -> distribution`` (see :mod:`pyro_bqn.priors`, e.g.
          ``priors.SpikeAndSlabPrior(slab_prob=0.05, spike_scale=0.02)``);
        * a scalar-batch distribution over the levels (a
          :class:`~pyro_bqn.distributions.QuantizedCategorical` or
          :class:`~pyro_bqn.distributions.MultipleSpikeAndSlab`), whose weights are re-built
          on the current levels at every call (:class:`~pyro_bqn.priors.DistributionPrior`).

        A subclass may override :meth:`weight_prior` instead.
    :param bias: whether the layer has a bias.
    :param bias_prior_scale: standard deviation of the bias prior.
    """

    def __init__(
        self,
        weight_shape: Sequence[int],
        out_channels: int,
        levels: LevelSet | Sequence[float] | torch.Tensor | None = None,
        prior: TorchDistributionMixin | PriorFactory | None = None,
        bias: bool = True,
        bias_prior_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.prior = as_prior_factory(prior)
        self.levels = self._resolve_levels(levels, self.prior)
        self.weight_shape = torch.Size(weight_shape)
        self.out_channels = out_channels
        self.weight = PyroSample(_weight_site_prior)
        if bias:
            if not bias_prior_scale > 0:
                raise ValueError(f"bias_prior_scale must be positive, got {bias_prior_scale}")
            self.bias_prior_scale = float(bias_prior_scale)
            self.bias = PyroSample(_bias_site_prior)
        else:
            self.bias = None
        if type(self).weight_prior is QuantizedLayer.weight_prior:
            # Refuse a prior that does not fit now, not at the first training step. (An
            # override may need attributes its __init__ sets later: it is checked at its call.)
            level_set = self.levels
            with torch.no_grad():
                self.checked_prior(self.weight_prior(level_set), level_set, level_set.values)

    @staticmethod
    def _resolve_levels(levels, prior: PriorFactory) -> LevelSet:
        declared = prior.levels if isinstance(prior, DistributionPrior) else None
        if levels is None:
            levels = ternary() if declared is None else declared
        if not isinstance(levels, LevelSet):
            levels = from_values(levels)
        if declared is not None:
            _check_same_values(
                declared.values if isinstance(declared, LevelSet) else declared, levels.values
            )
        return levels

    def weight_prior(self, levels: LevelSet) -> TorchDistributionMixin:
        """The prior of the weights over ``levels`` (the layer's level set, read at every
        call): a distribution over those levels with a batch shape that broadcasts to
        ``weight_shape`` (usually ``()``; the layer expands it).

        Override it in a subclass for a prior of your own; build it on ``levels`` itself (not
        on a copy of its values), so that it follows learnable levels. The default calls the
        layer's prior factory.

        Usage::

            >>> from pyro_bqn import QuantizedLinear, levels
            >>> from pyro_bqn.distributions import MultipleSpikeAndSlab
            >>> class SparseLinear(QuantizedLinear):
            ...     def weight_prior(self, levels):
            ...         return MultipleSpikeAndSlab.with_uniform_spikes(levels, 0.01, 0.5)
            >>> layer = SparseLinear(3, 2, levels=levels.ternary())
        """
        return self.prior(levels)

    def checked_prior(
        self, prior: TorchDistributionMixin, levels: LevelSet, values: torch.Tensor
    ) -> TorchDistributionMixin:
        """``prior`` if it is a distribution over ``levels`` (current values ``values``) with
        a batch shape that broadcasts to ``weight_shape``.

        :raises ValueError: naming what does not fit.
        """
        name = type(self).__name__
        prior_values = getattr(prior, "levels", None)
        if not isinstance(prior, torch.distributions.Distribution) or prior_values is None:
            raise ValueError(
                f"{name}.weight_prior must return a distribution over levels (e.g. "
                f"QuantizedCategorical or MultipleSpikeAndSlab), got {type(prior).__name__}"
            )
        try:
            fits = torch.broadcast_shapes(prior.batch_shape, self.weight_shape) == self.weight_shape
        except RuntimeError:
            fits = False
        if prior.event_shape != () or not fits:
            raise ValueError(
                f"{name}.weight_prior must return a distribution with event shape () and a "
                f"batch shape that broadcasts to the weight shape {tuple(self.weight_shape)}, "
                f"got batch shape {tuple(prior.batch_shape)}, event shape "
                f"{tuple(prior.event_shape)}"
            )
        if getattr(prior, "level_set", None) is levels:
            return prior
        if levels.learnable:
            raise ValueError(
                f"{name}.weight_prior must build the prior on the layer's level set itself "
                "(its values would go stale as the learnable levels learn)"
            )
        _check_same_values(prior_values, values)
        return prior

    def sampled_weight(self) -> torch.Tensor | SiteMoments:
        """The weight site's value (a tensor or the posterior's moments), shape-checked.

        :raises ValueError: if the weight carries extra batch dimensions, which happens when
            the layer is first called inside a ``pyro.plate`` (the weight is then drawn once
            per data point).
        """
        weight = self.weight
        if weight.shape != self.weight_shape:
            raise ValueError(
                f"{type(self).__name__} weight has shape {tuple(weight.shape)}, expected "
                f"{tuple(self.weight_shape)}: call the layer outside pyro.plate (weights are "
                "global), and use Predictive(..., parallel=False) to draw networks and "
                "Trace_ELBO(vectorize_particles=False) to train with several particles"
            )
        return weight
