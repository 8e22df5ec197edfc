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


def _native_library(theta: torch.Tensor, levels: torch.Tensor) -> ctypes.CDLL | None:
    if theta.shape[0] > _MAX_NATIVE_LEVELS:
        return None
    return native.library_for("level_statistics", (theta, levels), _KERNEL_NAMES)


def _is_broadcast(tensor: torch.Tensor) -> bool:
    """Whether a ``(n,)`` tensor is one value seen ``n`` times (stride 0: the gradient of a
    sum arrives so)."""
    return tensor.dim() == 1 and tensor.stride(0) == 0


def _offset(tensor: torch.Tensor | None, begin: int) -> int | None:
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
    Returns whether the result is unusable (a non-finite logit, or a weight's logits more
    than half the float range apart)."""
    num_levels, n = theta.shape
    function = native.kernel(
        library, "level_statistics", direction, theta.dtype, _ARGTYPES[direction]
    )

    def call(begin: int, end: int) -> int:
        offsets = (_offset(array, begin) for array in arrays)
        sizes = (num_levels, end - begin, n)
        return function(_offset(theta, begin), *sizes, levels.data_ptr(), *offsets, *scalars)

    return native.run_in_ranges(call, n)


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


def _check_forward(theta: torch.Tensor, levels: torch.Tensor) -> None:
    if theta.dim() != 2 or levels.shape != theta.shape[:1]:
        raise ValueError(
            "level_statistics needs logits of shape (K, N) and levels of shape (K,), got "
            f"{tuple(theta.shape)} and {tuple(levels.shape)}"
        )
    if not theta.is_floating_point() or levels.dtype != theta.dtype:
        raise ValueError(
            "level_statistics needs floating-point logits and levels of their dtype, got "
            f"{theta.dtype} and {levels.dtype}"
        )
    if levels.device != theta.device:
        raise ValueError(
            f"levels must be on the logits' device {theta.device}, got {levels.device}"
        )


def _formulas_forward(
    theta: torch.Tensor, levels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, var, E[w^2], sum q log q, log-normaliser, False)`` by torch: each ``(N,)``
    but the last, a 0-dim flag that the C kernel did not compute them."""
    q = torch.softmax(theta, dim=0)
    # As statistics_from_probs, but with separate products: an operator's outputs may not
    # be views of one tensor.
    mean, second = levels @ q, levels.square() @ q
    var = torch.addcmul(second, mean, mean, value=-1.0).clamp_min(0.0)
    neg_entropy = torch.special.xlogy(q, q).sum(0)
    lse = torch.logsumexp(theta, dim=0)
    return mean, var, second, neg_entropy, lse, theta.new_zeros((), dtype=torch.bool)


def _kernel_forward(library, theta: torch.Tensor, levels: torch.Tensor):
    """As :func:`_formulas_forward` (flag ``True``) by the C kernel, or ``None`` when it
    refuses ``theta``: a non-finite logit (the kernel assumes finite values) or logits more
    than half the float range apart (their difference could overflow)."""
    outputs = [theta.new_empty(theta.shape[1]) for _ in range(5)]
    if _run_kernel(library, "forward", theta, levels, outputs):
        return None
    return (*outputs, theta.new_ones((), dtype=torch.bool))


_forward = native.operator(
    "level_statistics", _formulas_forward, _kernel_forward, _native_library, _check_forward
)


def _centred_weights(mean: torch.Tensor, grads) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = dL/dmean - 2 mean dL/dvar`` and ``b = dL/dE[w^2] + dL/dvar`` (see
    :func:`level_statistics`), each ``(N,)``; a missing gradient counts as 0."""
    g_mean, g_var, g_second, _ = (torch.zeros_like(mean) if g is None else g for g in grads)
    return torch.addcmul(g_mean, mean, g_var, value=-2.0), g_second + g_var


def _level_gradient(q: torch.Tensor, levels: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """``dL/dv_k = sum_i q_ik (a_i + 2 v_k b_i)``, shape ``(K,)``."""
    return q @ a + 2 * levels * (q @ b)


def _check_backward(theta, levels, mean, lse, by_kernel, *grads) -> None:
    _check_forward(theta, levels)
    expected = theta.shape[1:]
    for name, tensor in zip(
        ("mean", "lse", "g_mean", "g_var", "g_second", "g_negent"), (mean, lse, *grads), strict=True
    ):
        if tensor is not None and (tensor.shape != expected or tensor.dtype != theta.dtype):
            raise ValueError(
                f"level_statistics_backward: {name} must have shape {tuple(expected)} and "
                f"dtype {theta.dtype}, got {tuple(tensor.shape)} and {tensor.dtype}"
            )
        if tensor is not None and tensor.device != theta.device:
            raise ValueError(
                f"level_statistics_backward: {name} must be on the logits' device "
                f"{theta.device}, got {tensor.device}"
            )


def _formulas_backward(
    theta: torch.Tensor,
    levels: torch.Tensor,
    mean: torch.Tensor,
    lse: torch.Tensor,
    by_kernel: torch.Tensor,
    g_mean: torch.Tensor | None,
    g_var: torch.Tensor | None,
    g_second: torch.Tensor | None,
    g_negent: torch.Tensor | None,
) -> torch.Tensor:
    """``dL/dtheta``, shape ``(K, N)``, by torch (see :func:`level_statistics`)."""
    log_q = theta - lse
    q = log_q.exp()
    a, b = _centred_weights(mean, (g_mean, g_var, g_second, g_negent))
    g = levels.unsqueeze(-1) * a + levels.square().unsqueeze(-1) * b
    if g_negent is not None:
        # q log q has derivative log q + 1; the constant cancels below, and 0 log 0 counts 0.
        g = g + torch.where(q > 0, log_q, 0.0) * g_negent
    return q * (g - (q * g).sum(0))


def _kernel_backward(library, theta, levels, mean, lse, by_kernel, *grads):
    """``dL/dtheta`` by the C kernel, after a forward pass by the kernel (else ``None``)."""
    if not by_kernel.item():  # a CPU tensor here: no device synchronisation
        return None
    g_theta = torch.empty_like(theta)
    # A sum's gradient is one value for every weight; the kernel reads it as such rather
    # than from a materialised copy.
    broadcast = sum(1 << j for j, g in enumerate(grads) if g is not None and _is_broadcast(g))
    grads = [g if g is None or _is_broadcast(g) else g.contiguous() for g in grads]
    _run_kernel(library, "backward", theta, levels, [mean, lse, *grads, g_theta], broadcast)
    return g_theta


_backward = native.operator(
    "level_statistics_backward",
    _formulas_backward,
    _kernel_backward,
    # The kernel reads mean and lse as contiguous arrays (gradients it copies if need be).
    lambda theta, levels, mean, lse, *rest: (
        _native_library(theta, levels) if mean.is_contiguous() and lse.is_contiguous() else None
    ),
    _check_backward,
)


def _setup_context(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)
    theta, levels = inputs
    mean, lse, by_kernel = output[0], output[4], output[5]
    ctx.save_for_backward(theta, levels, mean, lse, by_kernel)


def _gradient(ctx, *output_grads):
    """``(dL/dtheta, dL/dlevels)`` (see :func:`level_statistics`); the second, for
    learnable levels only, by torch: it sums over every weight."""
    grads = output_grads[:4]
    if all(g is None for g in grads):
        return None, None
    theta, levels, mean, lse, by_kernel = ctx.saved_tensors
    g_theta = _backward(theta, levels, mean, lse, by_kernel, *grads)
    g_levels = None
    if ctx.needs_input_grad[1]:
        q = torch.exp(theta - lse)
        g_levels = _level_gradient(q, levels, *_centred_weights(mean, grads))
    return g_theta, g_levels


_forward.register_autograd(_gradient, setup_context=_setup_context)


def level_statistics(logits: torch.Tensor, levels: torch.Tensor) -> LevelStatistics:
    """The :class:`LevelStatistics` of ``q = softmax(logits)`` over the levels.

    :param logits: unnormalised log-probabilities, levels first: shape ``(K,) + S``. A
        contiguous tensor avoids a copy.
    :param levels: the level values ``v``, shape ``(K,)`` (may require grad, e.g. learnable
        levels).

    Computed by the operator ``torch.ops.pyro_bqn.level_statistics``: the C kernel
    (:mod:`pyro_bqn.native`) does each direction in one pass over the logits for float32
    and float64 CPU tensors with ``K <= 16``; torch computes the same values elsewhere and
    where the kernel refuses the logits (one not finite, or two more than half the float
    range apart). Backward: with ``g_k`` the derivative of the loss with respect to ``q_k``
    through every output,

    .. math::
        g_k = a v_k + b v_k^2 + \\bar h \\log q_k, \\qquad
        \\partial L / \\partial \\theta_k = q_k \\big(g_k - \\textstyle\\sum_j q_j g_j\\big)

    where ``a = dL/dmean - 2 mean dL/dvar``, ``b = dL/dE[w^2] + dL/dvar`` and ``h = dL/d(sum
    q log q)`` (the ``+1`` of ``d(q log q)/dq`` cancels in the centred form). The variance's
    clamp only absorbs rounding, so its gradient is taken as that of ``E[w^2] - E[w]^2``.
    The backward pass is not itself differentiable (second derivatives raise an error).
    """
    num_levels = levels.shape[0]
    if logits.dim() < 1 or logits.shape[0] != num_levels:
        raise ValueError(
            f"logits must have the K={num_levels} levels as their first dimension, got shape "
            f"{tuple(logits.shape)}"
        )
    shape = logits.shape[1:]
    theta = logits.reshape(num_levels, -1).contiguous()
    outputs = _forward(theta, levels.to(logits.dtype).contiguous())
    return LevelStatistics(*(out.reshape(shape) for out in outputs[:4]))
