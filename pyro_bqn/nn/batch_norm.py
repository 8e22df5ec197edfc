"""Batch normalisation, for tensors and for means and variances."""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
from pyro.nn import PyroModule
from torch.autograd.function import once_differentiable

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


def _torch_batch_norm_moments(mean, var, weight, bias, eps: float, running=None):
    """:func:`batch_norm_moments` by differentiable torch operations: the reference, and
    the fallback where the C kernel is unavailable or an input is not finite."""
    dims = [0, *range(2, mean.dim())]
    batch_mean = mean.mean(dims)
    centred = mean - batch_mean.view(_channel_shape(mean.dim()))
    between = centred.square().mean(dims)
    within = var.mean(dims)
    if running is not None:
        count = mean.numel() // mean.shape[1]
        with torch.no_grad():
            # Bessel's correction belongs to the spread of the means only: the within-unit
            # variances are exact, not estimated from the batch.
            unbiased = within + between * (count / (count - 1))
            factor = running.factor
            running.running_mean.mul_(1.0 - factor).add_(batch_mean, alpha=factor)
            running.running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)
    return _scale_and_shift(centred, var, between + within, weight, bias, eps)


_KERNEL_NAMES = native.kernel_names("batch_norm_moments")


def _native_library(mean, var, weight, bias, running) -> ctypes.CDLL | None:
    """The C kernels if they apply to these arguments: CPU tensors of one supported dtype,
    contiguous (a strided input is rare: torch handles it without a copy), a non-empty
    batch, and at least two values per channel if the running statistics are updated."""
    dtype = mean.dtype
    if dtype not in native.SUFFIXES or mean.numel() == 0 or var.shape != mean.shape:
        return None
    tensors = [mean, var, weight, bias]
    if running is not None:
        if mean.numel() <= mean.shape[1]:
            return None
        tensors += running[:2]
    for tensor in tensors:
        if tensor is not None and not (
            tensor.is_cpu and tensor.dtype == dtype and tensor.is_contiguous()
        ):
            return None
    return native.load("batch_norm_moments", _KERNEL_NAMES)


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


class _BatchNormMomentsFunction(torch.autograd.Function):
    """``(mu, s2, gamma, beta)`` to ``(mu', s2')`` by the C kernel, as
    :func:`batch_norm_moments`.

    Backward, per channel, with ``g = dL/dmu'`` and ``h = dL/ds2'``, sums over the
    channel's ``n`` values, ``d = mu - m``, ``r = 1 / sqrt(v + eps)`` and ``scale = gamma r``::

        dL/dscale = sum(g d) + 2 scale sum(h s2),  dL/dv = -dL/dscale * scale * r^2 / 2
        dL/dmu = scale (g - sum(g) / n) + 2 dL/dv d / n,  dL/ds2 = scale^2 h + dL/dv / n
        dL/dgamma = dL/dscale * r,  dL/dbeta = sum(g)

    (``v = between + within`` depends on ``mu`` through ``between``, whose derivative
    ``2 d / n`` needs no centring because ``sum(d) = 0``.) Where the kernel finds a
    non-finite input (forward) or output gradient (backward), this function computes with
    :func:`_torch_batch_norm_moments` instead (backward: by autograd through a
    recomputation). The backward pass is not itself differentiable.
    """

    @staticmethod
    def forward(ctx, mean, var, weight, bias, eps: float, running, library: ctypes.CDLL):
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        out_mean, out_var = torch.empty_like(mean), torch.empty_like(var)
        # Per channel m, scale and r, which the backward pass reads.
        stats = mean.new_empty((3, mean.shape[1]))
        address, step = stats.data_ptr(), stats.stride(0) * stats.element_size()
        running_mean, running_var, factor = running or (None, None, 0.0)
        status = _kernel(library, "forward", mean.dtype)(
            mean.data_ptr(),
            var.data_ptr(),
            _pointer(weight),
            _pointer(bias),
            *_layout(mean),
            eps,
            out_mean.data_ptr(),
            out_var.data_ptr(),
            address,
            address + step,
            address + 2 * step,
            _pointer(running_mean),
            _pointer(running_var),
            factor,
        )
        ctx.native = library if status == 0 else None
        if ctx.native is None:  # a non-finite input: the kernel changed no running statistic
            out_mean, out_var = _torch_batch_norm_moments(mean, var, weight, bias, eps, running)
        ctx.save_for_backward(mean, var, weight, bias, stats)
        return out_mean, out_var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mean, grad_var):
        needs = ctx.needs_input_grad[:4]
        if (grad_mean is None and grad_var is None) or not any(needs):
            return None, None, None, None, None, None, None
        mean, var, weight, bias, stats = ctx.saved_tensors
        grads = None
        if ctx.native is not None:
            grads = _native_backward(
                ctx.native, mean, var, weight, stats, grad_mean, grad_var, needs
            )
        if grads is None:
            grads = _autograd_backward(mean, var, weight, bias, ctx.eps, grad_mean, grad_var, needs)
        return (*grads, None, None, None)


def _native_backward(library, mean, var, weight, stats, grad_mean, grad_var, needs):
    """``[dL/dmu, dL/ds2, dL/dgamma, dL/dbeta]`` from the C kernel (``None`` where ``needs``
    is false), or ``None`` when an output gradient is not finite."""
    need_mean, need_var, need_weight, need_bias = needs
    # beta reaches the loss through mu' only (as in autograd, no gradient without it).
    need_bias = need_bias and grad_mean is not None
    # The kernel reads both output gradients; a missing one is zero.
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.contiguous()
    grad_var = torch.zeros_like(var) if grad_var is None else grad_var.contiguous()
    channels = mean.shape[1]
    grads = [
        torch.empty_like(mean) if need_mean else None,
        torch.empty_like(var) if need_var else None,
        mean.new_empty(channels) if need_weight and weight is not None else None,
        mean.new_empty(channels) if need_bias else None,
    ]
    address, step = stats.data_ptr(), stats.stride(0) * stats.element_size()
    status = _kernel(library, "backward", mean.dtype)(
        mean.data_ptr(),
        var.data_ptr(),
        grad_mean.data_ptr(),
        grad_var.data_ptr(),
        *_layout(mean),
        address,
        address + step,
        address + 2 * step,
        *(_pointer(grad) for grad in grads),
    )
    return None if status != 0 else grads


def _autograd_backward(mean, var, weight, bias, eps, grad_mean, grad_var, needs):
    """The gradients by autograd through :func:`_torch_batch_norm_moments`."""
    inputs = [
        None if tensor is None else tensor.detach().requires_grad_(need)
        for tensor, need in zip((mean, var, weight, bias), needs, strict=True)
    ]
    with torch.enable_grad():
        outputs = _torch_batch_norm_moments(*inputs, eps)
        used = [
            (out, g) for out, g in zip(outputs, (grad_mean, grad_var), strict=True) if g is not None
        ]
        wanted = [tensor for tensor, need in zip(inputs, needs, strict=True) if need]
        results = iter(
            torch.autograd.grad(
                [out for out, _ in used], wanted, [g for _, g in used], allow_unused=True
            )
        )
    return [next(results) if need else None for need in needs]


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

    Contiguous float32/float64 CPU tensors go to a C kernel (:mod:`pyro_bqn.native`) that
    takes two passes over the data in each direction (per-channel sums in double, then the
    element-wise outputs) and updates the running statistics on the way, in place of some
    twenty torch operations forward and twenty-five backward, each of which costs more than
    the arithmetic at these sizes. Anything else uses the same formulas in torch.
    """
    library = _native_library(mean, var, weight, bias, running)
    if library is None:
        return _torch_batch_norm_moments(mean, var, weight, bias, eps, running)
    return _BatchNormMomentsFunction.apply(mean, var, weight, bias, eps, running, library)


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
