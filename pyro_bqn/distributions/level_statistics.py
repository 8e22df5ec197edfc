"""Everything the sampling-free ELBO needs from a categorical posterior over levels, in one
fused pass with a hand-written backward.

A training step of a quantized network reads, for every weight, the posterior
probabilities, the mean and variance of the weight and the negative entropy (for the KL).
Written as separate tensor operations with autograd these take some twenty passes over
``K x (number of weights)`` values per step, which dominated the step time. Here a C
kernel (:mod:`pyro_bqn.native`) reads the logits once in each direction; a torch
implementation of the same formulas serves where the kernel is unavailable.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from pyro_bqn import native

__all__ = ["LevelStatistics", "level_statistics", "statistics_from_probs"]


class LevelStatistics(NamedTuple):
    """Statistics of independent categoricals over the levels ``v``, one per weight; each
    has the weights' shape ``S``."""

    mean: torch.Tensor
    """``E[w] = sum_k q_k v_k``."""
    var: torch.Tensor
    """``Var[w] = max(E[w^2] - E[w]^2, 0)``."""
    second_moment: torch.Tensor
    """``E[w^2] = sum_k q_k v_k^2``."""
    neg_entropy: torch.Tensor
    """``sum_k q_k log q_k`` (``-H[q]``)."""


_KERNEL_NAMES = native.kernel_names("level_statistics")
# The kernel is instantiated for 2 to this many levels (4-bit weights); more use torch.
_MAX_NATIVE_LEVELS = 16


def _native_library(theta: torch.Tensor) -> ctypes.CDLL | None:
    if theta.device.type != "cpu" or theta.dtype not in native.SUFFIXES:
        return None
    if theta.shape[0] > _MAX_NATIVE_LEVELS:
        return None
    return native.load("level_statistics", _KERNEL_NAMES)


def _is_broadcast(tensor: torch.Tensor) -> bool:
    """Whether a ``(n,)`` tensor is one value seen ``n`` times (stride 0: the gradient of a
    sum arrives so)."""
    return tensor.dim() == 1 and tensor.stride(0) == 0


def _offset(tensor: torch.Tensor | None, begin: int = 0) -> int | None:
    """Address of ``tensor``'s entry ``begin`` (of each row, for a levels-first array; a
    broadcast value stays where it is)."""
    if tensor is None:
        return None
    if _is_broadcast(tensor):
        return tensor.data_ptr()
    return tensor.data_ptr() + begin * tensor.element_size()


# Argument types: theta, K, n, stride, levels, then the per-weight arrays; the backward
# pass ends with the bitmask of broadcast gradients.
_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = {
    "forward": (_POINTER, _SIZE, _SIZE, _SIZE, _POINTER) + (_POINTER,) * 5,
    "backward": (_POINTER, _SIZE, _SIZE, _SIZE, _POINTER) + (_POINTER,) * 7 + (_SIZE,),
}


def _run_kernel(library, direction, theta, levels, arrays, *scalars: int) -> bool:
    """Run ``level_statistics_<direction>`` over ranges of weights, in parallel threads for
    large tensors (ctypes releases the GIL). ``arrays`` are per-weight tensors (shape
    ``(n,)`` or levels-first ``(K, n)``), passed offset to each range, then ``scalars``.
    Returns whether the result is unusable (a non-finite logit, a weight's logits more than
    half the float range apart, or a number of levels the kernel lacks)."""
    num_levels, n = theta.shape
    function = native.kernel(
        library, "level_statistics", direction, theta.dtype, _ARGTYPES[direction]
    )

    def call(begin: int, end: int) -> int:
        offsets = (_offset(array, begin) for array in arrays)
        sizes = (num_levels, end - begin, n)
        return function(_offset(theta, begin), *sizes, levels.data_ptr(), *offsets, *scalars)

    return native.run_in_ranges(call, n)


def _native_forward(library, theta: torch.Tensor, levels: torch.Tensor):
    """``(mean, var, second, neg_entropy, log_normaliser)`` from the C kernel, or ``None``
    when ``theta`` holds a non-finite logit (the kernel assumes finite values) or logits more
    than half the float range apart (their difference could overflow)."""
    outputs = [theta.new_empty(theta.shape[1]) for _ in range(5)]
    return None if _run_kernel(library, "forward", theta, levels, outputs) else outputs


def _native_backward(library, theta, levels, mean, log_normaliser, grads, need_levels: bool):
    """``(dL/dtheta, dL/dlevels or None)``: the first from the C kernel; the second, needed
    only for learnable levels, by torch (it sums over every weight, which the kernel's
    weight-parallel loop does not)."""
    g_theta = torch.empty_like(theta)
    # A sum's gradient is one value for every weight; the kernel reads it as such rather
    # than from a materialised copy.
    broadcast = sum(1 << j for j, g in enumerate(grads) if g is not None and _is_broadcast(g))
    grads = [g if g is None or _is_broadcast(g) else g.contiguous() for g in grads]
    arrays = [mean, log_normaliser, *grads, g_theta]
    _run_kernel(library, "backward", theta, levels, arrays, broadcast)
    if not need_levels:
        return g_theta, None
    q = torch.exp(theta - log_normaliser)
    return g_theta, _level_gradient(q, levels, *_centred_weights(mean, grads))


def statistics_from_probs(probs: torch.Tensor, levels: torch.Tensor) -> LevelStatistics:
    """The :class:`LevelStatistics` of given probabilities ``probs`` (levels first, shape
    ``(K,) + S``), by ordinary differentiable torch operations."""
    flat = probs.reshape(probs.shape[0], -1)
    mean, second = torch.stack([levels, levels.square()]).to(flat.dtype) @ flat
    var = torch.addcmul(second, mean, mean, value=-1.0).clamp_min(0.0)
    neg_entropy = torch.special.xlogy(flat, flat).sum(0)
    return LevelStatistics(
        *(out.reshape(probs.shape[1:]) for out in (mean, var, second, neg_entropy))
    )


def _torch_forward(theta: torch.Tensor, levels: torch.Tensor):
    log_q = torch.log_softmax(theta, dim=0)
    q = log_q.exp()
    return list(statistics_from_probs(q, levels)), log_q, q


def _centred_weights(mean: torch.Tensor, grads) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = dL/dmean - 2 mean dL/dvar`` and ``b = dL/dE[w^2] + dL/dvar`` (see
    :class:`_LevelStatisticsFunction`), each ``(N,)``; a missing gradient counts as 0."""
    g_mean, g_var, g_second, _ = (torch.zeros_like(mean) if g is None else g for g in grads)
    return torch.addcmul(g_mean, mean, g_var, value=-2.0), g_second + g_var


def _level_gradient(q: torch.Tensor, levels: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """``dL/dv_k = sum_i q_ik (a_i + 2 v_k b_i)``, shape ``(K,)``."""
    return q @ a + 2 * levels * (q @ b)


def _torch_backward(log_q, q, levels, mean, grads, need_levels: bool):
    a, b = _centred_weights(mean, grads)
    g = levels.unsqueeze(-1) * a + levels.square().unsqueeze(-1) * b
    if grads[3] is not None:
        # q log q has derivative log q + 1; the constant cancels below, and 0 log 0 counts 0.
        g = g + torch.where(q > 0, log_q, 0.0) * grads[3]
    g_theta = q * (g - (q * g).sum(0))
    return g_theta, (_level_gradient(q, levels, a, b) if need_levels else None)


class _LevelStatisticsFunction(torch.autograd.Function):
    """``theta (K, N), levels (K,)`` to ``(mean, var, E[w^2], sum q log q)``, each ``(N,)``.

    Backward: with ``g_k`` the derivative of the loss with respect to ``q_k`` through every
    output,

    .. math::
        g_k = a v_k + b v_k^2 + \\bar h \\log q_k, \\qquad
        \\partial L / \\partial \\theta_k = q_k \\big(g_k - \\textstyle\\sum_j q_j g_j\\big)

    where ``a = dL/dmean - 2 mean dL/dvar`` and ``b = dL/dE[w^2] + dL/dvar`` (the ``+1``
    of ``d(q log q)/dq`` cancels in the centred form). The variance's clamp only absorbs
    rounding, so its gradient is taken as that of ``E[w^2] - E[w]^2``. The backward pass is
    not itself differentiable (second derivatives raise an error).

    The C kernel (:mod:`pyro_bqn.native`) does each direction in one pass over the logits;
    the torch code computes the same values where the kernel is unavailable or refuses the
    logits (one not finite, or two more than half the float range apart).
    """

    @staticmethod
    def forward(ctx, theta: torch.Tensor, levels: torch.Tensor):
        ctx.set_materialize_grads(False)
        library = _native_library(theta)
        outputs = None if library is None else _native_forward(library, theta, levels)
        if outputs is not None:
            ctx.native = library
            ctx.save_for_backward(theta, levels, outputs[0], outputs[4])
            return tuple(outputs[:4])
        outputs, log_q, q = _torch_forward(theta, levels)
        ctx.native = None
        ctx.save_for_backward(log_q, q, levels, outputs[0])
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return None, None
        need_levels = ctx.needs_input_grad[1]
        if ctx.native is not None:
            return _native_backward(ctx.native, *ctx.saved_tensors, grads, need_levels)
        log_q, q, levels, mean = ctx.saved_tensors
        return _torch_backward(log_q, q, levels, mean, grads, need_levels)


def level_statistics(logits: torch.Tensor, levels: torch.Tensor) -> LevelStatistics:
    """The :class:`LevelStatistics` of ``q = softmax(logits)`` over the levels.

    :param logits: unnormalised log-probabilities, levels first: shape ``(K,) + S``. A
        contiguous tensor avoids a copy.
    :param levels: the level values ``v``, shape ``(K,)`` (may require grad, e.g. learnable
        levels).
    """
    num_levels = levels.shape[0]
    if logits.dim() < 1 or logits.shape[0] != num_levels:
        raise ValueError(
            f"logits must have the K={num_levels} levels as their first dimension, got shape "
            f"{tuple(logits.shape)}"
        )
    shape = logits.shape[1:]
    theta = logits.reshape(num_levels, -1).contiguous()
    outputs = _LevelStatisticsFunction.apply(theta, levels.to(logits.dtype).contiguous())
    return LevelStatistics(*(out.reshape(shape) for out in outputs))
