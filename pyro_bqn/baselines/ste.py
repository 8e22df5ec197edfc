"""Deterministic quantized networks trained with the straight-through estimator (STE).

As in Binarized Neural Networks (Hubara, Courbariaux et al., NeurIPS 2016): every quantized
layer keeps latent real weights ``w``; the forward pass uses their nearest level ``Q(w)``,
the backward pass treats ``Q`` as the identity inside the clip range ``[v_1, v_K]`` (zero
outside), and the latent weights are clipped to ``[v_1, v_K]`` after every optimizer step
(``[-1, 1]`` for binary and ternary levels), so they cannot drift far past a level and
stop flipping. Hidden activations are ``sign`` with the hardtanh STE: gradient
``1{|x| <= 1}``.

Any :class:`~pyro_bqn.architectures.Architecture` can be built this way
(:func:`ste_network`): :class:`STELinear` and :class:`STEConv2d` share the quantized latent
weight (:class:`STEWeight`). :mod:`pyro_bqn.baselines.binarized` trains the binary
network with the paper's own schedule.

Usage::

    >>> import torch
    >>> from pyro_bqn.architectures import Architecture
    >>> net = ste_network(Architecture("cnn", (1, 28, 28), 10, (4, 8, 16)), [-1.0, 0.0, 1.0])
    >>> net(torch.randn(3, 784)).shape
    torch.Size([3, 10])
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pyro_bqn.architectures import TORCH_LAYERS, Architecture, Layers
from pyro_bqn.baselines._checks import check_positive_int
from pyro_bqn.baselines.mlp import Network, mlp_architecture
from pyro_bqn.baselines.training import train
from pyro_bqn.levels import LevelSet, check_levels

__all__ = [
    "LR_SCHEDULES",
    "STEConv2d",
    "STELinear",
    "STEWeight",
    "SignSTE",
    "as_levels",
    "clip_latent_weights_",
    "export_quantized_weights",
    "glorot_lr_scale",
    "quantize_ste",
    "sign_ste",
    "ste_layers",
    "ste_mlp",
    "ste_network",
    "train_ste",
    "train_with_lr_schedule",
]

LevelsLike = torch.Tensor | LevelSet | Sequence[float]
#: The learning-rate schedules of :func:`train_with_lr_schedule`.
LR_SCHEDULES = ("constant", "exponential", "cosine")


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
    """Module form of :func:`sign_ste`: ``(N, *) → (N, *)`` with values in ``{-1, 1}``.

    Usage::

        >>> import torch
        >>> SignSTE()(torch.tensor([-0.5, 0.0, 2.0]))
        tensor([-1.,  1.,  1.])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sign_ste(x)


class STEWeight(nn.Module):
    """What :class:`STELinear` and :class:`STEConv2d` share: a latent real ``weight`` whose
    forward value is its nearest level ``Q(weight)`` (:func:`quantize_ste`), and the clip of
    the latent weights to the level range. Not used on its own."""

    weight: nn.Parameter
    levels: torch.Tensor

    def _init_levels(self, levels: LevelsLike) -> None:
        # Latent weights start uniform on [v_1, v_K] so the quantized ones use every level.
        self.register_buffer("levels", as_levels(levels))
        with torch.no_grad():
            self.weight.uniform_(self.levels[0].item(), self.levels[-1].item())

    def quantized_weight(self) -> torch.Tensor:
        """``Q(weight)``, the weight's shape, every entry on a level."""
        return quantize_ste(self.weight, self.levels)

    @torch.no_grad()
    def clip_(self) -> None:
        """Clip the latent weights to ``[v_1, v_K]`` in place."""
        self.weight.clamp_(self.levels[0].item(), self.levels[-1].item())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels.tolist()}"


class STELinear(STEWeight, nn.Linear):
    """A linear layer whose forward uses the quantized latent weight ``Q(weight)``.

    ``y = x Q(W)^T + b``; input ``(N, in_features)``, output ``(N, out_features)``. The bias,
    if any, stays a float. Latent weights start uniform on ``[v_1, v_K]`` so the initial
    quantized weights use every level.

    :param levels: strictly increasing levels ``(K,)`` (see :func:`as_levels`).

    Usage::

        >>> import torch
        >>> layer = STELinear(5, 3, levels=[-1.0, 0.0, 1.0])
        >>> layer(torch.randn(2, 5)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, levels: LevelsLike
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._init_levels(levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class STEConv2d(STEWeight, nn.Conv2d):
    """A 2-D convolution whose forward uses the quantized latent kernel ``Q(weight)``.

    Input ``(N, in_channels, H, W)``, kernel ``(out_channels, in_channels // groups, kH, kW)``,
    output ``(N, out_channels, H', W')``; arguments as :class:`torch.nn.Conv2d` plus
    ``levels``. The bias, if any, stays a float; latent weights start uniform on
    ``[v_1, v_K]``.

    :param levels: strictly increasing levels ``(K,)`` (see :func:`as_levels`).

    Usage::

        >>> import torch
        >>> conv = STEConv2d(1, 4, 5, padding=2, levels=[-1.0, 1.0])
        >>> conv(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 4, 28, 28])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *args: Any,
        levels: LevelsLike,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, *args, **kwargs)
        self._init_levels(levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


def ste_layers(levels: LevelsLike | None = None) -> Layers:
    """The :class:`~pyro_bqn.architectures.Layers` of a straight-through network: every
    linear and convolution layer quantized to ``levels`` (default binary ``{-1, 1}``),
    :class:`SignSTE` activations, float batch norm and max pooling."""
    values = as_levels(levels)
    return TORCH_LAYERS.replace(
        linear=partial(STELinear, levels=values),
        conv=partial(STEConv2d, levels=values),
        activation=SignSTE,
    )


def ste_network(
    architecture: Architecture,
    levels: LevelsLike | None = None,
    *,
    output_scale: float | None = None,
    learn_output_scale: bool = True,
) -> Network:
    """A quantized network of ``architecture`` built from :func:`ste_layers`; for an MLP
    ``[STELinear → BatchNorm1d → SignSTE] × (L − 1) → STELinear → scale``, for a CNN the
    convolutions are :class:`STEConv2d` (see :mod:`pyro_bqn.architectures`).

    Input ``(N, ...)`` (reshaped to the architecture's input shape), output logits
    ``(N, num_classes)``.

    :param levels: weight levels ``(K,)``, e.g. ``torch.tensor([-1., 0., 1.])``; default
        binary ``{-1, 1}``. Every linear and convolution layer, including the last, is
        quantized.
    :param output_scale: initial logit scale; default ``1 / sqrt(fan_in)`` of the output
        layer, which makes logits of ``±1`` weights on ``±1`` inputs of order one.
    :param learn_output_scale: learn the logit scale (default) or keep it fixed.
    """
    if output_scale is None:
        output_scale = architecture.sizes[-2] ** -0.5
    return Network(
        architecture,
        ste_layers(levels),
        output_scale=output_scale,
        learn_output_scale=learn_output_scale,
    )


def ste_mlp(
    sizes: Sequence[int],
    levels: LevelsLike | None = None,
    *,
    output_scale: float | None = None,
    learn_output_scale: bool = True,
) -> Network:
    """:func:`ste_network` of the MLP of widths ``sizes = (d_in, h_1, ..., d_out)``
    (:func:`~pyro_bqn.baselines.mlp.mlp_architecture`): input ``(N, d_in)``, output logits
    ``(N, d_out)``; the other arguments as :func:`ste_network`."""
    return ste_network(
        mlp_architecture(sizes),
        levels,
        output_scale=output_scale,
        learn_output_scale=learn_output_scale,
    )


def clip_latent_weights_(model: nn.Module) -> None:
    """Clip the latent weights of every :class:`STEWeight` layer in ``model`` to its level
    range."""
    for module in model.modules():
        if isinstance(module, STEWeight):
            module.clip_()


@torch.no_grad()
def export_quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized weights of every :class:`STEWeight` layer in ``model``, detached.

    :returns: ``{"<module name>.weight": Q(weight)}``, each of the layer's weight shape with
        every entry exactly one of the layer's levels, i.e. the weights the forward pass
        uses (for storage, or to run the network with plain ``F.linear`` / ``F.conv2d``).
    """
    return {
        f"{name}.weight": module.quantized_weight().detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, STEWeight)
    }


def glorot_lr_scale(weight: torch.Tensor) -> float:
    """BinaryConnect's per-layer learning-rate scale ``1 / sqrt(1.5 / (fan_in + fan_out))``
    (Courbariaux et al. 2015, kept by Hubara et al.'s code): the inverse of the Glorot
    uniform bound, so that a layer's latent weights in ``[-1, 1]`` move as fast, relative to
    their range, as Glorot-initialised float weights would.

    :param weight: a linear ``(out, in)`` or convolution ``(out, in, kH, kW)`` weight.
    """
    receptive = math.prod(weight.shape[2:])
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    return 1.0 / math.sqrt(1.5 / (fan_in + fan_out))


def _lr_factor(schedule: str, final_lr_fraction: float, epochs: int) -> Callable[[int], float]:
    if schedule == "constant":
        return lambda epoch: 1.0
    if schedule == "exponential":
        return lambda epoch: final_lr_fraction ** (epoch / epochs)
    return lambda epoch: (
        final_lr_fraction
        + (1.0 - final_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    )


def train_with_lr_schedule(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    lr_schedule: str = "constant",
    final_lr_fraction: float = 1.0,
    **train_kwargs: Any,
) -> list[float]:
    """:func:`~pyro_bqn.baselines.train` with every optimizer's learning rates (each
    group's own) multiplied, during epoch ``e`` of ``E``, by

    * ``"constant"``: ``1``;
    * ``"exponential"``: ``f ** (e / E)`` (Hubara et al.'s per-epoch decay);
    * ``"cosine"``: ``f + (1 − f)(1 + cos(π e / E)) / 2`` (the BayesBiNN authors' schedule);

    with ``f = final_lr_fraction``, the factor the schedule reaches at the end of the run.
    The learning rates are restored afterwards.

    :param optimizers: passed to :func:`~pyro_bqn.baselines.train` as ``optimizer``.
    :param lr_schedule: one of :data:`LR_SCHEDULES`.
    :param final_lr_fraction: ``f`` in ``(0, 1]`` (``[0, 1]`` for ``"cosine"``).
    :param train_kwargs: passed on (``epochs``, ``batch_size``, ``seed``, ``callback``...).
    :returns: the mean loss of every epoch.
    """
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    low = 0.0 if lr_schedule == "cosine" else math.nextafter(0.0, 1.0)
    ok = isinstance(final_lr_fraction, int | float) and not isinstance(final_lr_fraction, bool)
    if not (ok and low <= final_lr_fraction <= 1.0):
        raise ValueError(
            f"final_lr_fraction must be in {'[0' if low == 0 else '(0'}, 1] for the "
            f"{lr_schedule} schedule, got {final_lr_fraction!r}"
        )
    epochs = train_kwargs.setdefault(
        "epochs", inspect.signature(train).parameters["epochs"].default
    )
    check_positive_int(epochs, "epochs")
    factor = _lr_factor(lr_schedule, final_lr_fraction, epochs)
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    initial = [group["lr"] for group in groups]
    user_callback = train_kwargs.pop("callback", None)

    def set_rates(epoch: int) -> None:
        for group, lr in zip(groups, initial, strict=True):
            group["lr"] = lr * factor(epoch)

    def callback(epoch: int, loss: float) -> None:
        if user_callback is not None:
            user_callback(epoch, loss)
        set_rates(epoch + 1)

    set_rates(0)
    try:
        return train(model, x, y, optimizer=list(optimizers), callback=callback, **train_kwargs)
    finally:
        for group, lr in zip(groups, initial, strict=True):
            group["lr"] = lr


def train_ste(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float = 1e-2,
    lr_schedule: str = "constant",
    final_lr_fraction: float = 1.0,
    glorot_scale: bool = False,
    **train_kwargs: Any,
) -> list[float]:
    """Train a straight-through network with Adam, clipping the latent weights after every
    step (:func:`clip_latent_weights_`).

    :param lr: Adam's learning rate; the default ``1e-2`` rather than ``1e-3`` because a
        latent weight has to travel a distance of order one to change level.
    :param lr_schedule: ``"constant"``, ``"exponential"`` or ``"cosine"`` decay to
        ``lr * final_lr_fraction`` (see :func:`train_with_lr_schedule`).
    :param glorot_scale: multiply each quantized layer's learning rate by
        :func:`glorot_lr_scale` of its weight (as BinaryConnect and Binarized Neural
        Networks do); the other parameters keep ``lr``.
    :param train_kwargs: passed on to :func:`~pyro_bqn.baselines.train` (``epochs``,
        ``batch_size``, ``seed``, ``callback``, ...; not ``optimizer`` or ``after_step``).
    :returns: the mean loss of every epoch.
    """
    for own in ("after_step", "optimizer"):
        if own in train_kwargs:
            raise ValueError(f"train_ste sets {own} itself (Adam, clipping the latent weights)")
    latent = {id(m.weight): m.weight for m in model.modules() if isinstance(m, STEWeight)}
    groups: list[dict[str, Any]] = []
    if glorot_scale:
        groups = [{"params": [w], "lr": lr * glorot_lr_scale(w)} for w in latent.values()]
    claimed = {id(p) for group in groups for p in group["params"]}
    groups.append({"params": [p for p in model.parameters() if id(p) not in claimed]})
    optimizer = torch.optim.Adam(groups, lr=lr)
    return train_with_lr_schedule(
        model,
        x,
        y,
        [optimizer],
        lr_schedule=lr_schedule,
        final_lr_fraction=final_lr_fraction,
        after_step=partial(clip_latent_weights_, model),
        **train_kwargs,
    )
