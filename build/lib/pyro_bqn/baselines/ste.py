"""Deterministic quantized MLP trained with the straight-through estimator (STE).

As in Binarized Neural Networks (Hubara, Courbariaux et al., 2016): every quantized layer
keeps latent real weights ``w``; the forward pass uses their nearest level ``Q(w)``, the
backward pass treats ``Q`` as the identity inside the clip range ``[v_1, v_K]`` (zero
outside), and the latent weights are clipped to ``[v_1, v_K]`` after every optimizer step
(``[-1, 1]`` for binary and ternary levels), so they cannot drift far past a level and
stop flipping. Hidden activations are ``sign`` with the hardtanh STE: gradient
``1{|x| <= 1}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pyro_bqn.baselines.mlp import MLP, check_sizes
from pyro_bqn.baselines.training import train
from pyro_bqn.levels import LevelSet, check_levels

__all__ = [
    "SignSTE",
    "STELinear",
    "as_levels",
    "clip_latent_weights_",
    "export_quantized_weights",
    "quantize_ste",
    "sign_ste",
    "ste_mlp",
    "train_ste",
]

LevelsLike = torch.Tensor | LevelSet | Sequence[float]


def as_levels(levels: LevelsLike | None) -> torch.Tensor:
    """The level values as a validated tensor ``(K,)``; ``None`` means binary ``{-1, 1}``.

    :raises ValueError: if the levels are not 1-D, finite, and strictly increasing.
    """
    if levels is None:
        levels = [-1.0, 1.0]
    if isinstance(levels, LevelSet):
        levels = levels.values.detach()
    values = torch.as_tensor(levels, dtype=torch.get_default_dtype())
    return check_levels(values.clone(), name="levels")


class _QuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        ctx.bounds = (levels[0].item(), levels[-1].item())
        # right=True sends a value on a midpoint to the upper level (sign(0) = +1).
        thresholds = 0.5 * (levels[1:] + levels[:-1])
        return levels[torch.bucketize(w, thresholds, right=True)]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (w,) = ctx.saved_tensors
        low, high = ctx.bounds
        return grad * ((w >= low) & (w <= high)).to(grad.dtype), None


def quantize_ste(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest level of every entry of ``w`` (ties go to the upper level), same shape.

    Backward: the straight-through estimator, ``dQ/dw = 1{v_1 <= w <= v_K}``.

    :param levels: strictly increasing levels ``(K,)``.
    """
    return _QuantizeSTE.apply(w, levels)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` with ``sign(0) = +1``; backward is the hardtanh STE ``1{|x| <= 1}``."""
    return quantize_ste(x, x.new_tensor([-1.0, 1.0]))


class SignSTE(nn.Module):
    """Module form of :func:`sign_ste`: ``(N, *) → (N, *)`` with values in ``{-1, 1}``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x)


class STELinear(nn.Linear):
    """A linear layer whose forward uses the quantized latent weight ``Q(weight)``.

    ``y = x Q(W)^T + b``; input ``(N, in_features)``, output ``(N, out_features)``. The bias,
    if any, stays a float. Latent weights start uniform on ``[v_1, v_K]`` so the initial
    quantized weights use every level.

    :param levels: strictly increasing levels ``(K,)`` (see :func:`as_levels`).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, levels: LevelsLike
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("levels", as_levels(levels))
        with torch.no_grad():
            self.weight.uniform_(self.levels[0].item(), self.levels[-1].item())

    def quantized_weight(self) -> torch.Tensor:
        """``Q(weight)``, shape ``(out_features, in_features)``, every entry on a level."""
        return quantize_ste(self.weight, self.levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def clip_(self) -> None:
        """Clip the latent weights to ``[v_1, v_K]`` in place."""
        self.weight.clamp_(self.levels[0].item(), self.levels[-1].item())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels.tolist()}"


def ste_mlp(
    sizes: Sequence[int],
    levels: LevelsLike | None = None,
    *,
    output_scale: float | None = None,
    learn_output_scale: bool = True,
) -> MLP:
    """A quantized MLP ``[STELinear → BatchNorm1d → SignSTE] × (L − 1) → STELinear → scale``.

    :param sizes: layer widths ``(d_in, h_1, ..., d_out)``; input ``(N, d_in)``, output
        logits ``(N, d_out)``.
    :param levels: weight levels ``(K,)``, e.g. ``torch.tensor([-1., 0., 1.])``; default
        binary ``{-1, 1}``. Every linear layer, including the last, is quantized.
    :param output_scale: initial logit scale; default ``1 / sqrt(sizes[-2])``, which makes
        logits of ``±1`` weights on ``±1`` inputs of order one.
    :param learn_output_scale: learn the logit scale (default) or keep it fixed.
    """
    sizes = check_sizes(sizes)
    values = as_levels(levels)
    if output_scale is None:
        output_scale = sizes[-2] ** -0.5
    return MLP(
        sizes,
        linear=partial(STELinear, levels=values),
        activation=SignSTE,
        output_scale=output_scale,
        learn_output_scale=learn_output_scale,
    )


def clip_latent_weights_(model: nn.Module) -> None:
    """Clip the latent weights of every :class:`STELinear` in ``model`` to its level range."""
    for module in model.modules():
        if isinstance(module, STELinear):
            module.clip_()


@torch.no_grad()
def export_quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized weights of every :class:`STELinear` in ``model``, detached.

    :returns: ``{"<module name>.weight": Q(weight)}``, each ``(out_features, in_features)``
        with every entry exactly one of the layer's levels, i.e. the weights the forward
        pass uses (for storage, or to run the network with plain ``F.linear``).
    """
    return {
        f"{name}.weight": module.quantized_weight().detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, STELinear)
    }


def train_ste(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, **train_kwargs: Any
) -> list[float]:
    """:func:`~pyro_bqn.baselines.train` with the latent weights clipped after every step.

    :param train_kwargs: passed on to :func:`~pyro_bqn.baselines.train` (not ``after_step``).
        The default Adam learning rate is ``1e-2`` rather than ``1e-3``: a latent weight
        has to travel a distance of order one to change level.
    :returns: the mean loss of every epoch.
    """
    if "after_step" in train_kwargs:
        raise ValueError("train_ste sets after_step itself (to clip the latent weights)")
    train_kwargs.setdefault("lr", 1e-2)
    return train(model, x, y, after_step=partial(clip_latent_weights_, model), **train_kwargs)
