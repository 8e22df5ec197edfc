"""A fully connected layer with quantized Bayesian weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistributionMixin

from pyro_bqn.levels import LevelSet
from pyro_bqn.moments import Moments
from pyro_bqn.nn.quantized_layer import QuantizedLayer, add_bias, propagate
from pyro_bqn.priors import PriorFactory

__all__ = ["QuantizedLinear"]


class QuantizedLinear(QuantizedLayer):
    r"""``y = x W^T + b`` with ``W`` a Pyro sample site over a level set.

    The layer acts on what reaches it: with a concrete weight tensor (a sampled or
    most-probable network) it is :func:`torch.nn.functional.linear`; with the posterior's
    moments (under :class:`~pyro_bqn.infer.DeterministicELBO` or
    :func:`~pyro_bqn.infer.predict`) it returns output :class:`~pyro_bqn.Moments`
    (see :func:`~pyro_bqn.nn.quantized_layer.propagate`). Inputs may be tensors or moments.

    :param in_features: input size.
    :param out_features: output size.

    Other arguments as :class:`~pyro_bqn.nn.quantized_layer.QuantizedLayer`.
    Shapes: input ``(*, in_features)``, weight ``(out_features, in_features)``,
    output ``(*, out_features)``.

    Example::

        >>> import torch
        >>> from pyro_bqn import QuantizedLinear, levels
        >>> layer = QuantizedLinear(4, 3, levels=levels.ternary())
        >>> layer(torch.randn(2, 4)).shape  # outside inference: a network drawn from the prior
        torch.Size([2, 3])
        >>> sorted(set(layer.weight.unique().tolist()) - {-1.0, 0.0, 1.0})
        []

    **References**

    [1] *Sampling-free learning of Bayesian quantized neural networks*, J. Su, M. Cvitkovic,
        F. Huang (ICLR 2020)
    [2] *Discrete-valued neural networks using variational inference*, W. Roth, F. Pernkopf
        (2018): the probabilistic forward pass this propagation follows
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        levels: LevelSet | Sequence[float] | torch.Tensor | None = None,
        prior: TorchDistributionMixin | PriorFactory | None = None,
        bias: bool = True,
        bias_prior_scale: float = 1.0,
    ) -> None:
        super().__init__(
            (out_features, in_features), out_features, levels, prior, bias, bias_prior_scale
        )
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantizedLinear expected input with last dimension in_features="
                f"{self.in_features}, got shape {tuple(x.shape)}"
            )
        y = propagate(F.linear, x, self.sampled_weight(), feature_dims=1)
        if self.bias is None:
            return y
        return add_bias(y, self.bias, (self.out_features,))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
