"""Batch normalisation, for tensors and for means and variances."""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
from pyro.nn import PyroModule

from pyro_bqn import native
from pyro_bqn.moments import Moments, split_moments

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _MomentBatchNorm:
    """The moment rule shared by :class:`BatchNorm1d` and :class:`BatchNorm2d`; mixed in
    before the torch class, whose ``forward`` handles tensors."""

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        """:param x: a tensor, or :class:`~pyro_bqn.moments.Moments`, with channels in
        dimension 1.
        :returns: the same kind and shape as ``x``."""
        mean, var = split_moments(x)
        if var is None:
            return super().forward(x)
        self._check_input_dim(x)
        return Moments(*self._normalize_moments(mean, var))

    def _update_factor(self) -> float:
        # Mirrors torch's _BatchNorm.forward: count the batch, and momentum=None means a
        # cumulative average.
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _normalize_moments(
        self, mean: torch.Tensor, var: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self._update_factor()
        if self.training or self.running_mean is None:
            count = mean.numel() // mean.shape[1]
            if self.training and count <= 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got input of "
                    f"shape {tuple(mean.shape)}"
                )
            running = None
            if self.training and self.track_running_stats:
                running = RunningUpdate(self.running_mean, self.running_var, factor)
            return batch_norm_moments(mean, var, self.weight, self.bias, self.eps, running)
        channel_shape = _channel_shape(mean.dim())
        centred = mean - self.running_mean.view(channel_shape)
        return _scale_and_shift(centred, var, self.running_var, self.weight, self.bias, self.eps)


class RunningUpdate(NamedTuple):
    """Running statistics for :func:`batch_norm_moments` to update in place, per channel::

        running_mean <- (1 - factor) running_mean + factor m
        running_var <- (1 - factor) running_var + factor (within + n / (n - 1) between)

    with ``m``, ``between``, ``within`` and ``n`` as in :func:`batch_norm_moments`.
    """

    running_mean: torch.Tensor
    """Shape ``(C,)``."""
    running_var: torch.Tensor
    """Shape ``(C,)``."""
    factor: float
    """The weight of this batch (the momentum, or ``1 / batches`` for a cumulative
    average)."""


def _channel_shape(dim: int) -> tuple[int, ...]:
    return (1, -1) + (1,) * (dim - 2)


def _scale_and_shift(centred, var, norm_var, weight, bias, eps: float):
    """``(centred * scale + beta, var * scale^2)`` with ``scale = gamma / sqrt(norm_var +
    eps)``; ``norm_var``, ``weight`` (``gamma``) and ``bias`` (``beta``) are per channel,
    shape ``(C,)``, and the last two may be ``None``."""
    channel_shape = _channel_shape(centred.dim())
    scale = torch.rsqrt(norm_var + eps)
    if weight is not None:
        scale = scale * weight
    out_mean = centred * scale.view(channel_shape)
    if bias is not None:
        out_mean = out_mean + bias.view(channel_shape)
    return out_mean, var * scale.square().view(channel_shape)


Tensor = torch.Tensor


def _check_forward(mean, var, weight, bias, eps, track_running) -> None:
    if mean.dim() < 2 or var.shape != mean.shape:
        raise ValueError(
            "batch_norm_moments needs mean and var of one shape (N, C, *spatial), got "
            f"{tuple(mean.shape)} and {tuple(var.shape)}"
        )
    channels = mean.shape[1]
    named = {"weight": weight, "bias": bias}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != (channels,):
            raise ValueError(
                f"{name} must have shape ({channels},), one value per channel, got "
                f"{tuple(tensor.shape)}"
            )
    tensors = [var, *(t for t in named.values() if t is not None)]
    if not mean.is_floating_point() or any(t.dtype != mean.dtype for t in tensors):
        raise ValueError(f"batch_norm_moments needs floating-point tensors of {mean.dtype}")
    if any(t.device != mean.device for t in tensors):
        raise ValueError(f"batch_norm_moments needs every tensor on {mean.device}")
    if track_running and mean.numel() <= channels:
        raise ValueError(
            "updating running statistics needs more than 1 value per channel, got input of "
            f"shape {tuple(mean.shape)}"
        )


def _formulas_forward(
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    track_running: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(mu', s2', stats, batch)`` of :func:`batch_norm_moments` by torch, with ``stats``
    the per-channel ``(m, scale, r)`` (shape ``(3, C)``, ``r = 1 / sqrt(v + eps)``) that the
    backward pass reads and ``batch`` the per-channel ``(m, within + n / (n - 1) between)``
    that update the running statistics (shape ``(2, C)``; zeros unless ``track_running``).
    """
    dims = [0, *range(2, mean.dim())]
    channel_shape = _channel_shape(mean.dim())
    batch_mean = mean.mean(dims)
    centred = mean - batch_mean.view(channel_shape)
    between = centred.square().mean(dims)
    within = var.mean(dims)
    batch = mean.new_zeros((2, mean.shape[1]))
    if track_running:
        count = mean.numel() // mean.shape[1]
        # Bessel's correction belongs to the spread of the means only: the within-unit
        # variances are exact, not estimated from the batch.
        batch = torch.stack([batch_mean, within + between * (count / (count - 1))])
    rstd = torch.rsqrt(between + within + eps)
    scale = rstd if weight is None else rstd * weight
    out_mean = centred * scale.view(channel_shape)
    if bias is not None:
        out_mean = out_mean + bias.view(channel_shape)
    out_var = var * scale.square().view(channel_shape)
    return out_mean, out_var, torch.stack([batch_mean, scale, rstd]), batch


_KERNEL_NAMES = native.kernel_names("batch_norm_moments")


def _native_library(mean, var, weight, bias, running) -> ctypes.CDLL | None:
    """The C kernels if they apply to these arguments (see
    :func:`pyro_bqn.native.library_for`; a strided input is rare, and torch handles it
    without a copy) and the batch is not empty."""
    if mean.numel() == 0:
        return None
    tensors = (mean, var, weight, bias, *(running or ()))
    return native.library_for("batch_norm_moments", tensors, _KERNEL_NAMES)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _layout(mean: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(N, C, L, c0, c1)`` for the kernels: the input as ``(N, C, L)``, all channels."""
    batch, channels = mean.shape[:2]
    return batch, channels, mean.numel() // (batch * channels), 0, channels


# Argument types: x, s, gamma, beta, (N, C, L, c0, c1), then per direction the rest (see
# batch_norm_moments.c).
_POINTER, _SIZE, _REAL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
_ARGTYPES = {
    "forward": (_POINTER,) * 4 + (_SIZE,) * 5 + (_REAL,) + (_POINTER,) * 7 + (_REAL,),
    "backward": (_POINTER,) * 4 + (_SIZE,) * 5 + (_POINTER,) * 7,
}


def _kernel(library: ctypes.CDLL, direction: str, dtype: torch.dtype):
    return native.kernel(library, "batch_norm_moments", direction, dtype, _ARGTYPES[direction])


def _stat_rows(stats: torch.Tensor) -> tuple[int, int, int]:
    """Addresses of the rows ``m``, ``scale`` and ``r`` of ``stats``."""
    address, step = stats.data_ptr(), stats.stride(0) * stats.element_size()
    return address, address + step, address + 2 * step


def _kernel_forward(library, mean, var, weight, bias, eps, track_running):
    """As :func:`_formulas_forward` by the C kernel, or ``None`` when an input is not
    finite."""
    out_mean, out_var = torch.empty_like(mean), torch.empty_like(var)
    stats = mean.new_empty((3, mean.shape[1]))
    # The kernel updates running statistics in place; from zeros, with factor 1, it leaves
    # this batch's.
    batch = mean.new_zeros((2, mean.shape[1]))
    rows = _stat_rows(batch)[:2] if track_running else (None, None)
    status = _kernel(library, "forward", mean.dtype)(
        mean.data_ptr(),
        var.data_ptr(),
        _pointer(weight),
        _pointer(bias),
        *_layout(mean),
        eps,
        out_mean.data_ptr(),
        out_var.data_ptr(),
        *_stat_rows(stats),
        *rows,
        1.0,
    )
    return None if status != 0 else (out_mean, out_var, stats, batch)


_forward = native.operator(
    "batch_norm_moments",
    _formulas_forward,
    _kernel_forward,
    lambda mean, var, weight, bias, *rest: _native_library(mean, var, weight, bias, None),
    _check_forward,
)


def _check_backward(mean, var, stats, grad_mean, grad_var) -> None:
    _check_forward(mean, var, None, None, 0.0, False)
    if stats.shape != (3, mean.shape[1]) or stats.dtype != mean.dtype:
        raise ValueError(f"stats must have shape (3, C) and dtype {mean.dtype}")
    for grad in (grad_mean, grad_var):
        if grad is not None and (grad.shape != mean.shape or grad.dtype != mean.dtype):
            raise ValueError(
                f"output gradients must have shape {tuple(mean.shape)} and dtype {mean.dtype}"
            )
    if any(t is not None and t.device != mean.device for t in (stats, grad_mean, grad_var)):
        raise ValueError(f"batch_norm_moments_backward needs every tensor on device {mean.device}")


def _formulas_backward(
    mean: Tensor, var: Tensor, stats: Tensor, grad_mean: Tensor | None, grad_var: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dL/dmu, dL/ds2, dL/dgamma, dL/dbeta)`` by torch (see :func:`_gradient`)."""
    dims = [0, *range(2, mean.dim())]
    channel_shape = _channel_shape(mean.dim())
    count = mean.numel() // mean.shape[1]
    batch_mean, scale, rstd = (row.view(channel_shape) for row in stats)
    gy = torch.zeros_like(mean) if grad_mean is None else grad_mean
    gz = torch.zeros_like(var) if grad_var is None else grad_var
    centred = mean - batch_mean
    sum_gy = gy.sum(dims)
    g_scale = (gy * centred).sum(dims) + 2 * stats[1] * (gz * var).sum(dims)
    g_v = (-0.5 * g_scale * stats[1] * stats[2].square()).view(channel_shape)
    g_mean = scale * (gy - sum_gy.view(channel_shape) / count) + 2 * g_v * centred / count
    g_var = scale.square() * gz + g_v / count
    return g_mean, g_var, g_scale * stats[2], sum_gy


def _kernel_backward(library, mean, var, stats, grad_mean, grad_var):
    """As :func:`_formulas_backward` by the C kernel, or ``None`` when an input or output
    gradient is not finite."""
    # The kernel reads both output gradients; a missing one is zero.
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.contiguous()
    grad_var = torch.zeros_like(var) if grad_var is None else grad_var.contiguous()
    channels = mean.shape[1]
    grads = (torch.empty_like(mean), torch.empty_like(var))
    grads += (mean.new_empty(channels), mean.new_empty(channels))
    status = _kernel(library, "backward", mean.dtype)(
        mean.data_ptr(),
        var.data_ptr(),
        grad_mean.data_ptr(),
        grad_var.data_ptr(),
        *_layout(mean),
        *_stat_rows(stats),
        *(grad.data_ptr() for grad in grads),
    )
    return None if status != 0 else grads


_backward = native.operator(
    "batch_norm_moments_backward",
    _formulas_backward,
    _kernel_backward,
    lambda mean, var, stats, *grads: _native_library(mean, var, stats, None, None),
    _check_backward,
)


def _setup_context(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)
    mean, var, weight, bias = inputs[:4]
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(mean, var, output[2])


def _gradient(ctx, grad_mean, grad_var, *_):
    """Gradients of ``(mu, s2, gamma, beta)``. Per channel, with ``g = dL/dmu'`` and
    ``h = dL/ds2'``, sums over the channel's ``n`` values, ``d = mu - m``,
    ``r = 1 / sqrt(v + eps)`` and ``scale = gamma r``::

        dL/dscale = sum(g d) + 2 scale sum(h s2),  dL/dv = -dL/dscale * scale * r^2 / 2
        dL/dmu = scale (g - sum(g) / n) + 2 dL/dv d / n,  dL/ds2 = scale^2 h + dL/dv / n
        dL/dgamma = dL/dscale * r,  dL/dbeta = sum(g)

    (``v = between + within`` depends on ``mu`` through ``between``, whose derivative
    ``2 d / n`` needs no centring because ``sum(d) = 0``.) The backward pass is not itself
    differentiable."""
    if grad_mean is None and grad_var is None:
        return None, None, None, None, None, None
    mean, var, stats = ctx.saved_tensors
    g_mean, g_var, g_weight, g_bias = _backward(mean, var, stats, grad_mean, grad_var)
    # beta reaches the loss through mu' only (as in autograd, no gradient without it).
    g_weight = g_weight if ctx.has_weight else None
    g_bias = g_bias if ctx.has_bias and grad_mean is not None else None
    return g_mean, g_var, g_weight, g_bias, None, None


_forward.register_autograd(_gradient, setup_context=_setup_context)


def batch_norm_moments(
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running: RunningUpdate | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode batch normalisation of means and variances (:class:`BatchNorm1d`).

    Per channel ``c``, over the ``n = N * L`` values of that channel::

        m = mean(mu),  between = mean((mu - m)^2),  within = mean(s2),
        scale = gamma / sqrt(between + within + eps),
        mu' = (mu - m) * scale + beta,  s2' = s2 * scale^2

    :param mean: ``mu``, shape ``(N, C, *spatial)`` (``L`` = the product of ``spatial``).
    :param var: ``s2``, the same shape.
    :param weight: ``gamma``, shape ``(C,)``, or ``None`` (1).
    :param bias: ``beta``, shape ``(C,)``, or ``None`` (0).
    :param running: running statistics to update in place with ``m``, ``between`` and
        ``within`` (not differentiated), or ``None``; needs ``n > 1``.
    :returns: ``(mu', s2')``, each shaped like ``mean``.

    Computed by the operator ``torch.ops.pyro_bqn.batch_norm_moments``. Contiguous
    float32/float64 CPU tensors go to a C kernel (:mod:`pyro_bqn.native`) that takes two
    passes over the data in each direction (per-channel sums in double, then the
    element-wise outputs) and updates the running statistics on the way, in place of some
    twenty torch operations forward and twenty-five backward, each of which costs more than
    the arithmetic at these sizes. Anything else (and input the kernel refuses: a value not
    finite) uses the same formulas in torch.
    """
    out_mean, out_var, _, batch = _forward(mean, var, weight, bias, eps, running is not None)
    if running is not None:
        with torch.no_grad():
            factor = running.factor
            running.running_mean.mul_(1.0 - factor).add_(batch[0], alpha=factor)
            running.running_var.mul_(1.0 - factor).add_(batch[1], alpha=factor)
    return out_mean, out_var


_DOC = """Batch normalisation over {shape} input, as :class:`torch.nn.{name}`.

    Same arguments, parameters (``weight`` = gamma, ``bias`` = beta; Pyro parameters here)
    and buffers as torch's module, whose documentation applies.

    * **Tensor in**: exactly torch's batch norm (training: batch statistics and a
      running-statistics update; evaluation: running statistics).
    * **Moments in** (``h ~ N(mu, s^2)``, independent entries), in training, per channel
      over the batch{spatial}::

          m = mean(mu),  v = mean((mu - m)^2 + s^2)
          mu' = gamma (mu - m) / sqrt(v + eps) + beta,  s'^2 = gamma^2 s^2 / (v + eps)

      ``m`` and ``v`` are the mean and variance of the batch's mixture of Gaussians (law of
      total variance): the statistics torch's batch norm would see on a batch of infinitely
      many samples from the input moments. The running statistics are updated with ``m``
      and ``mean(s^2) + n / (n - 1) * mean((mu - m)^2)`` (``n`` values per channel: unbiased
      like torch's, and equal to it when ``s^2 = 0``). In evaluation the running
      statistics replace ``m`` and ``v``.

    **Running statistics.** Moment-mode training accumulates statistics of the moment
    network. A sampled or most-probable network has different activation statistics: call
    :meth:`reset_running_stats`, then run that network in training mode over some batches
    under ``torch.no_grad()`` (``momentum=None`` gives their plain average) before
    evaluating.
    """


class BatchNorm1d(_MomentBatchNorm, PyroModule[torch.nn.BatchNorm1d]):
    __doc__ = _DOC.format(
        shape="``(N, C)`` or ``(N, C, L)``", name="BatchNorm1d", spatial=" (and ``L``)"
    )


class BatchNorm2d(_MomentBatchNorm, PyroModule[torch.nn.BatchNorm2d]):
    __doc__ = _DOC.format(
        shape="``(N, C, H, W)``", name="BatchNorm2d", spatial=" and the spatial dimensions"
    )
