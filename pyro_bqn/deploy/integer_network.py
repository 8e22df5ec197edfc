"""The most probable network as a plain PyTorch module in integer arithmetic.

:func:`integer_network` turns a :class:`~pyro_bqn.export.QuantizedNetwork` of a
:class:`~pyro_bqn.models.QuantizedClassifier` into a ``torch.nn.Sequential`` of the small
modules below, which use nothing but torch (so :func:`torch.export.export` turns it into a
program that runs without Pyro or pyro_bqn). It returns the output logits ``(N, C)``, whose
softmax is :meth:`~pyro_bqn.export.QuantizedNetwork.run`'s class probabilities.

**Integer weights.** A layer whose levels are uniform and whose values are a scale ``c``
times integers ``q`` (binary ``{-1, 1}``, ternary ``{-1, 0, 1}``, uniform ``2**b`` levels
``{-1, ..., 1}`` as ``(1/(2**b - 1)) * {-(2**b - 1), ..., 2**b - 1}`` in steps of 2) keeps
``q`` as ``int8``. Other levels (learned, non-uniform) and full-precision outliers keep
their float values: such a layer computes in float.

**Sign layers fold batch norm and sign into one integer comparison** (the deployment form of
binarized networks). With inputs ``a = alpha * v + beta`` stored as integers ``v`` (the
signs ``±1``, or the input's 8-bit codes), the pre-activation is ``h = c (alpha s + beta S)``
with ``s = sum q v`` (``int8`` products, ``int32`` sums) and ``S = sum q``; batch norm in
evaluation mode is ``y = g (h - mu) + b`` with ``g = gamma / sqrt(var + eps)``, so
``y = A s + B`` per channel, and ``sign(y) = +1`` iff ``s >= -B/A`` (``A > 0``) or
``s <= -B/A`` (``A < 0``). The weights of a channel with ``A < 0`` are negated, which makes
every channel ``s' >= T`` with one integer threshold ``T``. ``T`` is the smallest integer
whose float batch norm (evaluated as the model evaluates it) is ``>= 0``, so the
comparison reproduces the model's where its float sums are exact.

**What stays in float.** The output layer's ``A s + B`` (scale, bias and temperature);
for ReLU networks batch norm and ReLU (``relu(A s + B)``) and every later layer, whose input
is then real-valued; layers with non-integer levels; the first layer when no 8-bit input
code is given; and in PyTorch the convolutions, which run as float convolutions of the
integer values (exact while ``|s| < 2**24``, which :func:`integer_network` checks), since
PyTorch has no integer convolution on the CPU. The ONNX graph
(:mod:`pyro_bqn.deploy.onnx_graph`) uses ``MatMulInteger`` and ``ConvInteger`` for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pyro_bqn import nn as qnn
from pyro_bqn.architectures import Reshape
from pyro_bqn.export import QuantizedNetwork
from pyro_bqn.nn.local_reparameterization import LocalReparameterization
from pyro_bqn.nn.quantized_activation import QuantizedActivation
from pyro_bqn.nn.quantized_conv import QuantizedConv2d
from pyro_bqn.nn.quantized_linear import QuantizedLinear

__all__ = [
    "FloatAffine",
    "InputCodes",
    "IntegerConv2d",
    "IntegerLevels",
    "IntegerLinear",
    "OutputScale",
    "ScaledReLU",
    "SignThreshold",
    "integer_levels",
    "integer_network",
]

#: Integer sums in a float32 convolution are exact below this magnitude.
_FLOAT32_EXACT = 2**24
_CODE_ZERO = 128  # int8 input codes are the 8-bit codes minus 128
# A threshold beyond every sum (|s| <= fan_in * 127 * 128 < 2**30), with room for 1 - T.
_NEVER = 2**30


@dataclass(frozen=True)
class IntegerLevels:
    """Levels ``values = scale * (step * index + first)``, integers ``step * index + first``
    in ``int8``."""

    scale: float
    step: int
    first: int

    def integers(self, indices: torch.Tensor) -> torch.Tensor:
        """``step * index + first`` as ``int8``, the shape of ``indices``."""
        return (indices * self.step + self.first).to(torch.int8)


def integer_levels(levels: torch.Tensor) -> IntegerLevels | None:
    """The :class:`IntegerLevels` of ``levels`` ``(K,)``, or ``None`` where they are not
    uniform, not ``scale`` times integers or half-integers of one sign pattern, or the
    integers do not fit ``int8``. The float values must be ``scale * integer`` to
    ``1e-6`` relative."""
    spacing = levels[1:] - levels[:-1]
    if not torch.allclose(spacing, spacing[0].expand_as(spacing), rtol=1e-5, atol=0.0):
        return None
    gap = float(levels[-1] - levels[0]) / (levels.numel() - 1)
    for step in (1, 2):  # integers, or half-integers doubled (binary, 2-bit uniform)
        first = float(levels[0]) * step / gap
        if abs(first - round(first)) > 1e-4:
            continue
        found = IntegerLevels(gap / step, step, round(first))
        integers = found.integers(torch.arange(levels.numel()))
        largest = max(abs(found.first), abs(found.first + step * (levels.numel() - 1)))
        exact = torch.allclose(integers.to(levels.dtype) * found.scale, levels, rtol=1e-6)
        if largest <= 127 and exact:
            return found
    return None


class InputCodes(nn.Module):
    """Float inputs to 8-bit codes: ``code = clamp(round((x - offset) / step), 0, 255)``,
    returned as ``int8`` ``code - 128``; shape unchanged. Inputs made from 8-bit data with
    ``x = offset + step * code`` (e.g. normalised pixels) give back their codes exactly."""

    def __init__(self, offset: float, step: float) -> None:
        super().__init__()
        self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32))
        self.register_buffer("step", torch.tensor(step, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = torch.round((x - self.offset) / self.step).clamp(0, 255)
        return (codes - _CODE_ZERO).to(torch.int8)


class IntegerLinear(nn.Module):
    """``int8`` ``(N, in)`` to ``int32`` ``(N, out)``: ``s = v q^T`` with ``int8`` weights
    ``q`` ``(out, in)``, ``int8`` products and ``int32`` sums."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int8))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(v, self.weight.t())


class IntegerConv2d(nn.Module):
    """``int8`` ``(N, C, H, W)`` to ``int32`` ``(N, O, H', W')``: the convolution of the
    integers with ``int8`` weights ``(O, C, kH, kW)``, zero padding. Computed as a float32
    convolution of the integer values (PyTorch has no integer convolution on the CPU),
    exact since every sum is below ``2**24`` in magnitude."""

    def __init__(self, weight: torch.Tensor, padding: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int8))
        self.padding = tuple(padding)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(v.to(torch.float32), self.weight.to(torch.float32), padding=self.padding)
        return out.to(torch.int32)


class FloatAffine(nn.Module):
    """A linear layer or convolution in float: ``x`` (float, or ``int8`` signs) with the
    weights ``weight`` (float values, or ``int8`` integers whose scale the next module
    applies); no bias."""

    def __init__(self, weight: torch.Tensor, padding: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.padding = None if padding is None else tuple(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = x.to(torch.float32), self.weight.to(torch.float32)
        if self.padding is None:
            return F.linear(x, weight)
        return F.conv2d(x, weight, padding=self.padding)


class SignThreshold(nn.Module):
    """The sign of batch norm of a layer's sums ``s`` ``(N, C, ...)`` (``int32`` or float):
    ``int8`` ``+1`` where ``s >= threshold`` per channel, else ``-1``."""

    def __init__(self, threshold: torch.Tensor, spatial: int) -> None:
        super().__init__()
        self.register_buffer("threshold", threshold.reshape(-1, *([1] * spatial)))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        # A cast of the comparison costs an eighth of torch.where's broadcast of two scalars.
        return (s >= self.threshold).to(torch.int8) * 2 - 1


class OutputScale(nn.Module):
    """Float ``A s + B`` per channel (channels in dimension 1) of a layer's sums ``s``."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, spatial: int) -> None:
        super().__init__()
        shape = (-1, *([1] * spatial))
        self.register_buffer("scale", scale.to(torch.float32).reshape(shape))
        self.register_buffer("shift", shift.to(torch.float32).reshape(shape))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s.to(torch.float32) * self.scale + self.shift


class ScaledReLU(OutputScale):
    """``relu(A s + B)``: batch norm and ReLU of a layer's sums, in float."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(s))


@dataclass
class _Input:
    """What the next layer receives: ``kind`` ``"float"``, ``"codes"`` or ``"signs"``, with
    real value ``alpha * v + beta`` of the integers ``v``."""

    kind: str
    alpha: float = 1.0
    beta: float = 0.0


@dataclass
class _Affine:
    """A built linear or convolution layer: its module, the real pre-activation
    ``h = c (alpha s + beta S)`` per channel as ``h = scale * s + shift``, whether ``s`` is
    an exact integer, and the integer weights (if any) to negate per channel."""

    module: nn.Module
    scale: torch.Tensor  # (C,) float64
    shift: torch.Tensor  # (C,) float64
    exact: bool
    spatial: int


def _sum_bound(q: torch.Tensor, source: _Input) -> int:
    """Largest ``|s|`` a layer with integers ``q`` ``(C, ...)`` can produce."""
    largest_input = 128 if source.kind == "codes" else 1
    return int(q.abs().reshape(q.shape[0], -1).sum(1).max()) * largest_input


def _affine(layer, name: str, network: QuantizedNetwork, source: _Input) -> _Affine:
    site = network.quantized[name]
    conv = isinstance(layer, QuantizedConv2d)
    padding = layer._conv.keywords["padding"] if conv else None
    spatial = 2 if conv else 0
    found = None if site.num_outliers else integer_levels(site.levels)
    channels = site.shape[0]
    if found is None:  # float weights on a real input
        weight = site.values().to(torch.float32)
        ones = torch.ones(channels, dtype=torch.float64)
        scale, shift = ones * source.alpha, ones * 0.0
        if source.beta:
            shift = weight.to(torch.float64).reshape(channels, -1).sum(1) * source.beta
        return _Affine(FloatAffine(weight, padding), scale, shift, False, spatial)
    q = found.integers(site.indices())
    if _sum_bound(q, source) >= _NEVER:
        raise ValueError(f"layer '{name}' is too wide: its integer sums could reach 2**30")
    sums = q.to(torch.float64).reshape(channels, -1).sum(1)
    scale = torch.full((channels,), found.scale * source.alpha, dtype=torch.float64)
    shift = sums * (found.scale * source.beta)
    if source.kind == "float":  # a real input: float sums
        return _Affine(FloatAffine(q, padding), scale, shift, False, spatial)
    if conv:
        if _sum_bound(q, source) >= _FLOAT32_EXACT:
            raise ValueError(f"layer '{name}' has sums too large for an exact float convolution")
        return _Affine(IntegerConv2d(q, padding), scale, shift, True, spatial)
    return _Affine(IntegerLinear(q), scale, shift, True, spatial)


def _batch_norm_line(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, b - mu g)`` per channel, float64, of an evaluation-mode batch norm."""
    g = torch.rsqrt(bn.running_var.to(torch.float64) + bn.eps)
    if bn.weight is not None:
        g = g * bn.weight.to(torch.float64)
    shift = -bn.running_mean.to(torch.float64) * g
    if bn.bias is not None:
        shift = shift + bn.bias.to(torch.float64)
    return g, shift


def _integer_threshold(
    slope: torch.Tensor, intercept: torch.Tensor, to_output: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Per channel, the smallest integer ``t`` with ``to_output(t) >= 0`` for ``slope > 0``
    (for ``slope < 0`` the caller has negated ``s``, so this is the same question of
    ``-s``). ``slope * t + intercept`` gives the estimate; ``to_output`` (a ``(3, C)``
    float64 tensor of candidate sums to the model's float outputs) settles rounding.
    A zero slope gives a threshold no sum reaches (output ``-1``) or every sum reaches
    (``+1``), by the sign of ``intercept``."""
    limit = _NEVER
    flat = slope == 0
    estimate = torch.ceil(-intercept / torch.where(flat, torch.ones_like(slope), slope))
    estimate = estimate.clamp(-limit + 1, limit - 1)
    candidates = estimate + torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).unsqueeze(-1)
    passes = to_output(candidates) >= 0
    # The first passing candidate, or the estimate where rounding leaves none passing.
    first = torch.where(passes.any(0), passes.to(torch.int8).argmax(0) - 1, 0)
    threshold = estimate + first
    threshold = torch.where(flat, torch.where(intercept >= 0, -limit, limit), threshold)
    return threshold.to(torch.int32)


def _sign_layer(affine: _Affine, bn: nn.Module) -> tuple[list[nn.Module], _Input]:
    """The modules of ``affine -> batch norm -> sign``: the affine layer with per-channel
    negated weights where the batch norm's slope is negative, and the threshold."""
    g, b = _batch_norm_line(bn)
    slope, intercept = g * affine.scale, g * affine.shift + b
    negative = slope < 0
    direction = torch.where(negative, -1.0, 1.0).to(torch.float64)
    view = (-1, *([1] * (affine.module.weight.dim() - 1)))
    sign = direction.reshape(view)
    module = affine.module
    module.weight = (module.weight.to(torch.float64) * sign).to(module.weight.dtype)

    def model_output(candidates: torch.Tensor) -> torch.Tensor:
        # Candidate sums s' (= -s on negated channels): the model's pre-activation, then its
        # float batch norm.
        h = (candidates * direction * affine.scale + affine.shift).to(bn.running_mean.dtype)
        if affine.spatial:
            h = h.reshape(*h.shape, 1, 1)
        y = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
        return y.reshape(candidates.shape).to(torch.float64)

    if affine.exact:  # y = A s + B = |A| s' + B
        threshold = _integer_threshold(slope * direction, intercept, model_output)
    else:  # a float comparison: s' >= -B/|A| (no rounding search for float sums)
        flat = slope == 0
        ratio = -intercept / torch.where(flat, torch.ones_like(slope), slope) * direction
        infinite = torch.where(intercept >= 0, -math.inf, math.inf).to(torch.float64)
        threshold = torch.where(flat, infinite, ratio).to(torch.float32)
    return [module, SignThreshold(threshold, affine.spatial)], _Input("signs")


def _activation_kind(module: nn.Module, name: str) -> str:
    if isinstance(module, qnn.ReLU):
        return "relu"
    if (
        isinstance(module, QuantizedActivation)
        and module.values.tolist() == [-1.0, 1.0]
        and (module.thresholds.tolist() == [0.0])
    ):
        return "sign"
    raise ValueError(
        f"module '{name}' ({type(module).__name__}) is neither a sign nor a ReLU activation"
    )


def _temperature(model: nn.Module) -> torch.Tensor:
    value = model.temperature.temperature
    return torch.as_tensor(value, dtype=torch.float64)


def integer_network(
    network: QuantizedNetwork,
    model: nn.Module,
    example: torch.Tensor,
    input_codes: tuple[float, float] | None = None,
) -> nn.Sequential:
    """The most probable network ``network`` of ``model`` as a plain PyTorch module of
    integer arithmetic (see the module docstring), mapping inputs ``(N, ...)`` as the
    model takes them to logits ``(N, C)``.

    :param network: the exported network (:func:`~pyro_bqn.export.export_network`).
    :param model: a :class:`~pyro_bqn.models.QuantizedClassifier` of the network's
        architecture, levels and activation (a fresh one will do; it is left unchanged).
    :param example: example inputs ``(B, ...)`` (a few rows), run once to read the model.
    :param input_codes: ``(offset, step)`` where inputs are ``offset + step * code`` for
        8-bit codes ``0..255`` (e.g. images normalised as in :mod:`pyro_bqn.data`): the
        first layer of an MLP then takes the codes and runs in integers. ``None``: it
        takes the float input.
    :raises ValueError: for a model that is not a quantized classifier of sign or ReLU
        activations, a network that does not fit the model, or ``input_codes`` whose step
        is not positive and finite.
    """
    if not (hasattr(model, "body") and hasattr(model, "temperature")):
        raise ValueError(
            f"model must be a pyro_bqn QuantizedClassifier, got {type(model).__name__}"
        )
    if input_codes is not None:
        offset, step = (float(v) for v in input_codes)
        if not (math.isfinite(offset) and math.isfinite(step) and step > 0):
            raise ValueError(f"input_codes must be a finite (offset, step > 0), got {input_codes}")
    with network.loaded_into(model, example):
        return nn.Sequential(*_modules(network, model, input_codes))


def _modules(network, model, input_codes) -> list[nn.Module]:
    body = list(model.body)
    source = _Input("float")
    modules: list[nn.Module] = []
    if input_codes is not None:
        offset, step = input_codes
        modules.append(InputCodes(offset, step))
        source = _Input("codes", step, offset + _CODE_ZERO * step)
    index = 0
    while index < len(body):
        layer = body[index]
        name = f"body.{index}"
        if isinstance(layer, (Reshape, qnn.Flatten)):
            if isinstance(layer, qnn.Flatten):
                layer = nn.Flatten(layer.start_dim, layer.end_dim)
            modules.append(layer)
        elif isinstance(layer, qnn.MaxPool2d):
            modules.append(nn.MaxPool2d(layer.kernel_size, layer.stride))
        elif isinstance(layer, LocalReparameterization):
            pass  # the identity on a fixed network
        elif isinstance(layer, (QuantizedLinear, QuantizedConv2d)):
            if source.kind == "codes" and isinstance(layer, QuantizedConv2d):
                # A padded convolution pads the real input with 0, which is no 8-bit code.
                raise ValueError("input_codes apply to an MLP only (a CNN's first layer pads)")
            affine = _affine(layer, f"{name}.weight", network, source)
            if layer.bias is not None:  # the output layer
                temperature = _temperature(model)
                bias = network.continuous[f"{name}.bias"].to(torch.float64)
                modules += [
                    affine.module,
                    OutputScale(
                        affine.scale / temperature,
                        (affine.shift + bias) / temperature,
                        affine.spatial,
                    ),
                ]
                source = _Input("float")
                index += 1
                continue
            bn, activation = body[index + 1], body[index + 2]
            kind = _activation_kind(activation, f"body.{index + 2}")
            if kind == "sign":
                built, source = _sign_layer(affine, bn)
            else:
                g, b = _batch_norm_line(bn)
                relu = ScaledReLU(g * affine.scale, g * affine.shift + b, affine.spatial)
                built, source = [affine.module, relu], _Input("float")
            modules += built
            index += 3
            continue
        else:
            raise ValueError(f"module '{name}' ({type(layer).__name__}) cannot be deployed")
        index += 1
    return modules
