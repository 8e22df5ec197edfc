"""The shared machinery of quantized weight layers: priors and moment propagation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.nn import PyroModule, PyroSample

from pyro_bqn.distributions.quantized_categorical import QuantizedCategorical
from pyro_bqn.levels import LevelSet, from_values, ternary
from pyro_bqn.moments import Moments, SiteMoments, moments_of, split_moments

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


def _base_distribution(prior: TorchDistributionMixin) -> TorchDistributionMixin:
    while isinstance(prior, dist.Independent | dist.ExpandedDistribution):
        prior = prior.base_dist
    return prior


class QuantizedLayer(PyroModule):
    """Base class of layers whose weight is a Pyro sample site over a level set.

    ``weight`` has the prior ``prior.expand(weight_shape).to_event(len(weight_shape))``;
    the optional ``bias`` is a real-valued site with prior
    ``Normal(0, bias_prior_scale).expand([C]).to_event(1)``.

    :param weight_shape: shape of the weight tensor.
    :param levels: the level set (a :class:`~pyro_bqn.levels.LevelSet` or a sequence of
        values); default ternary ``{-1, 0, 1}``.
    :param prior: a scalar-batch distribution over the levels (e.g. a
        :class:`~pyro_bqn.distributions.QuantizedCategorical` with non-uniform ``probs``
        or a :class:`~pyro_bqn.distributions.MultipleSpikeAndSlab`); default uniform.
    :param bias: whether the layer has a bias.
    :param bias_prior_scale: standard deviation of the bias prior.
    """

    def __init__(
        self,
        weight_shape: Sequence[int],
        out_channels: int,
        levels: LevelSet | Sequence[float] | torch.Tensor | None = None,
        prior: TorchDistributionMixin | None = None,
        bias: bool = True,
        bias_prior_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.levels = self._resolve_levels(levels, prior)
        self.weight_shape = torch.Size(weight_shape)
        self._prior = prior
        self.weight = PyroSample(QuantizedLayer._weight_prior)
        if bias:
            if not bias_prior_scale > 0:
                raise ValueError(f"bias_prior_scale must be positive, got {bias_prior_scale}")
            loc = torch.zeros(out_channels)
            self.bias = PyroSample(dist.Normal(loc, bias_prior_scale).to_event(1))
        else:
            self.bias = None

    @staticmethod
    def _resolve_levels(levels, prior) -> LevelSet:
        if prior is not None:
            if (
                not hasattr(prior, "batch_shape")
                or _base_distribution(prior).batch_shape.numel() != 1
            ):
                raise ValueError("prior must be a distribution with a scalar batch shape")
            prior_levels = getattr(_base_distribution(prior), "levels", None)
            if prior_levels is None:
                raise ValueError(
                    f"prior must be a distribution over levels (QuantizedCategorical or "
                    f"MultipleSpikeAndSlab), got {type(prior).__name__}"
                )
            if levels is None:
                levels = getattr(_base_distribution(prior), "level_set", None) or prior_levels
        if levels is None:
            levels = ternary()
        if not isinstance(levels, LevelSet):
            levels = from_values(levels)
        if prior is not None:
            prior_levels = _base_distribution(prior).levels
            if prior_levels.shape != levels.values.shape or not torch.equal(
                prior_levels.detach(), levels.values.detach()
            ):
                raise ValueError(
                    f"prior levels {prior_levels.tolist()} differ from the layer's levels "
                    f"{levels.values.tolist()}"
                )
        return levels

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

    def _weight_prior(self) -> TorchDistributionMixin:
        if self._prior is None:
            values = self.levels.values
            logits = values.new_zeros(values.shape)
            # Zero logits are valid by construction, and log_prob refuses a value off the
            # levels by itself; validating would cost more than the rest of this method.
            base = QuantizedCategorical(self.levels, logits=logits, validate_args=False)
        else:
            base = self._prior
        return base.expand(self.weight_shape).to_event(len(self.weight_shape))
