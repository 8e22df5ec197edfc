"""Quantized activations: a step function onto ``M`` output values, and its ``M = 2`` case
:class:`Sign`.

The moment rule of a two-valued activation runs in every training step of a binary
network. Written as tensor operations it takes some eighteen small operations forward and
thirty backward, each a pass over the activations; the operator
``torch.ops.pyro_bqn.two_valued_moments`` does each direction in one pass of a C kernel
(:mod:`pyro_bqn.native`), with the torch formulas as the fallback where the kernel is
unavailable or an input is not finite.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from pyro.nn import PyroModule

from pyro_bqn import native
from pyro_bqn.levels import LearnableThresholds, LevelSet, check_levels
from pyro_bqn.moments import Moments, split_moments
from pyro_bqn.nn.gaussian import (
    _Z_MAX,
    normal_cdf,
    normal_pdf,
    safe_std,
    standardize,
    variance_floor,
)

__all__ = ["QuantizedActivation", "Sign", "quantized_activation_moments"]

_KERNEL_NAMES = native.kernel_names("two_valued")


def _native_library(
    mean: torch.Tensor, var: torch.Tensor, values: torch.Tensor, thresholds: torch.Tensor, *rest
) -> ctypes.CDLL | None:
    """The kernel library if it applies to these arguments (see
    :func:`pyro_bqn.native.library_for`), else ``None``."""
    return native.library_for(
        "two_valued_activation", (mean, var, values, thresholds), _KERNEL_NAMES
    )


# Argument types: mean, var, number of entries, values, thresholds, variance floor, then
# the outputs (forward) or the output gradients and gradients (backward).
_HEAD = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p)
_ARGTYPES = {
    "forward": (*_HEAD, ctypes.c_double) + (ctypes.c_void_p,) * 2,
    "backward": (*_HEAD, ctypes.c_double) + (ctypes.c_void_p,) * 4,
}


def _run_kernel(library, direction, mean, var, values, thresholds, arrays) -> bool:
    """Run ``two_valued_<direction>`` over ranges of entries, in parallel threads for large
    tensors (ctypes releases the GIL). ``arrays`` are per-entry tensors (or ``None``),
    passed offset to each range. Returns whether an input was not finite (forward only)."""
    function = native.kernel(library, "two_valued", direction, mean.dtype, _ARGTYPES[direction])
    floor = variance_floor(mean.dtype)
    size = mean.element_size()
    addresses = [mean.data_ptr(), var.data_ptr()]
    addresses += [None if array is None else array.data_ptr() for array in arrays]
    levels = (values.data_ptr(), thresholds.data_ptr(), floor)

    def call(begin: int, end: int) -> int:
        at = [None if a is None else a + begin * size for a in addresses]
        return function(at[0], at[1], end - begin, *levels, *at[2:])

    return native.run_in_ranges(call, mean.numel())


def _two_valued_torch(
    mean: torch.Tensor, var: torch.Tensor, values: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-valued moment rule by differentiable torch operations (the reference)."""
    z = standardize(thresholds[0], mean, safe_std(var))
    above, below = normal_cdf(-z), normal_cdf(z)
    step = values[1] - values[0]
    return values[0] + step * above, (step.square() * above * below).clamp_min(0.0)


def _check(mean, var, values, thresholds, *rest) -> None:
    if var.shape != mean.shape or values.shape != (2,) or thresholds.shape != (1,):
        raise ValueError(
            "two_valued_moments needs mean and var of one shape, values of shape (2,) and "
            f"thresholds of shape (1,), got {tuple(mean.shape)}, {tuple(var.shape)}, "
            f"{tuple(values.shape)} and {tuple(thresholds.shape)}"
        )
    tensors = (mean, var, values, thresholds, *(t for t in rest if t is not None))
    if not mean.is_floating_point() or any(t.dtype != mean.dtype for t in tensors[1:4]):
        raise ValueError(
            "two_valued_moments needs floating-point tensors of one dtype, got "
            f"{[t.dtype for t in tensors[:4]]}"
        )
    if any(t.device != mean.device for t in tensors):
        raise ValueError(f"two_valued_moments needs every tensor on {mean.device}")
    grads = [g for g in rest[1:] if g is not None]  # the backward pass's output gradients
    if any(g.shape != mean.shape or g.dtype != mean.dtype for g in grads):
        raise ValueError(
            f"output gradients must have shape {tuple(mean.shape)} and dtype {mean.dtype}"
        )


def _formulas_forward(
    mean: torch.Tensor, var: torch.Tensor, values: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out_mean, out_var, False)`` by torch; the last a 0-dim flag that the C kernel did
    not compute them."""
    return (*_two_valued_torch(mean, var, values, thresholds), mean.new_zeros((), dtype=bool))


def _kernel_forward(library, mean, var, values, thresholds):
    """As :func:`_formulas_forward` (flag ``True``) by the C kernel, or ``None`` when an
    input is not finite (the kernel assumes finite values)."""
    out_mean, out_var = torch.empty_like(mean), torch.empty_like(mean)
    if _run_kernel(library, "forward", mean, var, values, thresholds, (out_mean, out_var)):
        return None
    return out_mean, out_var, mean.new_ones((), dtype=torch.bool)


_forward = native.operator(
    "two_valued_moments", _formulas_forward, _kernel_forward, _native_library, _check
)


def _formulas_backward(
    mean: torch.Tensor,
    var: torch.Tensor,
    values: torch.Tensor,
    thresholds: torch.Tensor,
    by_kernel: torch.Tensor,
    g_out_mean: torch.Tensor | None,
    g_out_var: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dmean, dL/dvar)`` by torch (see :func:`_gradient`)."""
    floor = variance_floor(mean.dtype)
    clamped = var.clamp_min(floor)
    sigma = clamped.sqrt()
    u = (thresholds[0] - mean) / sigma
    # Inside the clip z = u, and outside it the gradient is cut (where an infinite u still
    # makes dL/dvar NaN, as in autograd): u serves for z throughout.
    step = values[1] - values[0]
    g_z = torch.zeros_like(mean)
    if g_out_mean is not None:
        g_z = g_z - step * g_out_mean
    if g_out_var is not None:
        g_z = g_z + step.square() * (normal_cdf(-u) - normal_cdf(u)) * g_out_var
    g_u = torch.where(u.abs() <= _Z_MAX, normal_pdf(u) * g_z, 0.0)
    g_var = torch.where(var >= floor, -g_u * u / (2 * clamped), 0.0)
    return -g_u / sigma, g_var


def _kernel_backward(library, mean, var, values, thresholds, by_kernel, *grads):
    """``(dL/dmean, dL/dvar)`` by the C kernel, after a forward pass by it (else ``None``)."""
    if not by_kernel.item():  # a CPU tensor here: no device synchronisation
        return None
    grads = [None if g is None else g.contiguous() for g in grads]
    g_mean, g_var = torch.empty_like(mean), torch.empty_like(var)
    _run_kernel(library, "backward", mean, var, values, thresholds, (*grads, g_mean, g_var))
    return g_mean, g_var


_backward = native.operator(
    "two_valued_moments_backward", _formulas_backward, _kernel_backward, _native_library, _check
)


def _setup_context(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs, output[2])


def _gradient(ctx, g_out_mean, g_out_var, _):
    r"""Gradients of ``(mean, var, values, thresholds)``. With ``sigma = sqrt(max(var,
    floor))``, ``u = (t - mu) / sigma``, ``z = clip(u, -40, 40)``, ``d = a_1 - a_0``, ``g_m,
    g_v`` the gradients of the two outputs and ``phi`` the normal density:
    ``dL/dz = phi(z) (d^2 (Phi(-z) - Phi(z)) g_v - d g_m)``, cut to zero outside the clip;
    ``dL/dmu = -(dL/dz) / sigma``; ``dL/dvar = -(dL/dz) z / (2 sigma^2)``, cut to zero below
    the floor. These are the gradients autograd gives for the torch formulas. Gradients of
    the values and threshold (learnable levels) are sums over all entries, computed with
    torch only when needed: ``dL/dt = -sum dL/dmu``,
    ``dL/da_1 = sum (g_m Phi(-z) + 2 d g_v Phi(-z) Phi(z))``, ``dL/da_0 = sum g_m - dL/da_1``.
    """
    if g_out_mean is None and g_out_var is None:
        return None, None, None, None
    mean, var, values, thresholds, by_kernel = ctx.saved_tensors
    g_mean, g_var = _backward(mean, var, values, thresholds, by_kernel, g_out_mean, g_out_var)
    g_values = g_thresholds = None
    if ctx.needs_input_grad[2]:
        # Learnable levels (rare): recompute the probabilities with torch for the sums.
        z = standardize(thresholds[0], mean, safe_std(var))
        above, below = normal_cdf(-z), normal_cdf(z)
        step = values[1] - values[0]
        g_step = mean.new_zeros(())
        g_first = mean.new_zeros(())
        if g_out_mean is not None:
            g_step = g_step + (g_out_mean * above).sum()
            g_first = g_out_mean.sum()
        if g_out_var is not None:
            g_step = g_step + 2 * step * (g_out_var * above * below).sum()
        g_values = torch.stack([g_first - g_step, g_step])
    if ctx.needs_input_grad[3]:
        g_thresholds = -g_mean.sum().reshape(1)
    return g_mean, g_var, g_values, g_thresholds


_forward.register_autograd(_gradient, setup_context=_setup_context)


def quantized_activation_moments(
    mean: torch.Tensor, var: torch.Tensor, values: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of the step function ``a(h)`` for ``h ~ N(mean, var)``.

    ``a(h) = a_j`` for ``t_{j-1} <= h < t_j`` (with ``t_0 = -inf``, ``t_M = +inf``), so
    ``P(a_j) = Phi((t_j - mu)/s) - Phi((t_{j-1} - mu)/s)``. Writing the step function as
    ``a_1 + sum_j d_j 1[h >= t_j]`` with ``d_j = a_{j+1} - a_j`` and ``p_j = P(h >= t_j)``:

    .. math::

        E[a] = a_1 + \sum_j d_j p_j,\qquad
        \mathrm{Var}[a] = \sum_j d_j p_j \Big(d_j (1 - p_j) + 2 \sum_{i<j} d_i (1 - p_i)\Big),

    using ``Cov(1[h >= t_i], 1[h >= t_j]) = p_j (1 - p_i)`` for ``t_i < t_j``. For increasing
    values every term is non-negative, so the variance needs no cancelling subtraction.

    :param mean: ``mu``, any shape ``S``.
    :param var: ``s^2``, shape ``S``.
    :param values: ``(a_1, ..., a_M)``, shape ``(M,)``, increasing.
    :param thresholds: ``(t_1, ..., t_{M-1})``, shape ``(M - 1,)``, increasing.
    :returns: ``(mean, var)`` of ``a(h)``, each of shape ``S``.

    For ``M = 2``, contiguous float32/float64 CPU inputs (``mean`` and ``var`` of one shape)
    go through a C kernel, one pass in each direction (the operator
    ``torch.ops.pyro_bqn.two_valued_moments``; other inputs use the same formulas in torch
    inside it). It gives
    the values of the torch formulas and the gradients autograd gives for them, to rounding,
    except that tail probabilities (and densities) below ``1e-37`` in float32 and ``1e-295``
    in float64 count as 0 (the vector ``erfc`` and ``exp`` are slow where they underflow).
    """
    if values.shape[0] == 2:
        # One threshold (binary networks, e.g. Sign: the common case): one kernel pass in
        # each direction where it applies, else the torch formulas.
        mean, var = torch.broadcast_tensors(mean, var)
        values, thresholds = values.to(mean.dtype), thresholds.to(mean.dtype)
        out_mean, out_var, _ = _forward(mean, var, values, thresholds)
        return out_mean, out_var
    std = safe_std(var).unsqueeze(-1)
    z = standardize(thresholds, mean.unsqueeze(-1), std)
    above, below = normal_cdf(-z), normal_cdf(z)
    steps = values[1:] - values[:-1]
    out_mean = values[0] + (steps * above).sum(-1)
    weighted_below = steps * below
    below_before = torch.cumsum(weighted_below, dim=-1) - weighted_below
    out_var = (steps * above * (weighted_below + 2.0 * below_before)).sum(-1)
    return out_mean, out_var.clamp_min(0.0)


def _check_thresholds(thresholds: torch.Tensor) -> torch.Tensor:
    if thresholds.dim() != 1 or thresholds.numel() < 1:
        raise ValueError(
            f"thresholds must have shape (M - 1,) with M >= 2, got shape {tuple(thresholds.shape)}"
        )
    if not torch.isfinite(thresholds).all():
        raise ValueError(f"thresholds must be finite, got {thresholds.tolist()}")
    if (thresholds[1:] <= thresholds[:-1]).any():
        raise ValueError(
            f"thresholds must be sorted in strictly increasing order, got {thresholds.tolist()}"
        )
    return thresholds


def _constant_second_moment(values: torch.Tensor) -> torch.Tensor | None:
    """``E[a^2] = a_2^2`` as a 0-dim tensor when the output values are ``(-a_2, a_2)`` (then
    it is the same for every input distribution), else ``None``.

    Values that require grad (learnable levels) get ``None`` even when symmetric: the
    derivative of ``E[a^2] = a_1^2 P(a_1) + a_2^2 P(a_2)`` with respect to each value depends
    on the entry's probabilities, which a constant cannot carry, so a layer that used it would
    get the wrong gradient for the levels (and learnable levels drift from symmetry anyway).
    """
    if values.shape[0] != 2 or values.requires_grad:
        return None
    # One cheap read of two numbers (no tensor operations); exact equality, since a
    # constant that is only close would be wrong.
    low, high = values.tolist()
    return values[1].square() if low * low == high * high else None


class QuantizedActivation(PyroModule):
    r"""An activation with ``M`` output values ``a_1 < ... < a_M`` switched at thresholds
    ``t_1 < ... < t_{M-1}``: ``a(h) = a_j`` for ``t_{j-1} <= h < t_j`` (a point on a
    threshold goes up).

    * **Tensor in** (a sampled or most-probable network): the step function, elementwise,
      with the straight-through gradient of ``clamp(h, a_1, a_M)`` (for :class:`Sign`,
      hardtanh's: pass the gradient where ``|h| <= 1``, as in Binarized Neural Networks).
      Learnable output values receive their ordinary gradient; thresholds receive none (a
      step has no derivative in its threshold).
    * **Moments in** (``h ~ N(mu, s^2)``, independent entries): the mean and variance of
      ``a(h)``; see :func:`quantized_activation_moments`. For two values ``(-c, c)`` that
      are not learnable (e.g. :class:`Sign`) the result also carries the constant second
      moment ``E[a^2] = c^2`` (a 0-dim tensor), which saves a product in the next layer.

    **Learned partitions.** With ``learn_thresholds=True`` the thresholds are parameters of
    the model (a :class:`~pyro_bqn.levels.LearnableThresholds`, in Pyro's param store once
    the model runs), learned with the moment rule's analytic gradients
    ``dE[a]/dt_j = -(a_{j+1} - a_j) phi((t_j - mu)/s) / s`` (and those of the variance): the
    asymmetric partitions of M-ary quantization (Chien & Chang, *Pattern Recognition* 139,
    2023), with learnable levels the representation values.

    Input and output have the same shape (any shape).

    Usage::

        >>> import torch
        >>> from pyro_bqn import levels
        >>> from pyro_bqn.moments import Moments
        >>> act = QuantizedActivation(levels.learnable([-1.0, 0.0, 0.5, 2.0]),
        ...                           learn_thresholds=True)
        >>> out = act(Moments(torch.zeros(3), torch.ones(3)))
        >>> out.mean.sum().backward()  # gradients reach the levels and the thresholds

    :param levels: the output values as a :class:`~pyro_bqn.levels.LevelSet` (a learnable
        one is learned with the model).
    :param thresholds: ``(M - 1,)`` strictly increasing thresholds (the initial ones, when
        learned); default: the midpoints between neighbouring output values.
    :param values: the output values as a strictly increasing ``(M,)`` tensor or sequence,
        instead of ``levels``.
    :param learn_thresholds: learn the thresholds (see above).
    """

    def __init__(
        self,
        levels: LevelSet | None = None,
        thresholds: torch.Tensor | Sequence[float] | None = None,
        values: torch.Tensor | Sequence[float] | None = None,
        learn_thresholds: bool = False,
    ) -> None:
        super().__init__()
        if (levels is None) == (values is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of levels or values")
        if levels is None:
            dtype = torch.get_default_dtype()
            levels = LevelSet(check_levels(torch.as_tensor(values, dtype=dtype), "values"))
        elif not isinstance(levels, LevelSet):
            raise ValueError(
                f"levels must be a pyro_bqn.levels.LevelSet, got {type(levels).__name__}; "
                "pass a tensor of output values as values=..."
            )
        self.levels = levels
        if thresholds is not None:
            thresholds = torch.as_tensor(thresholds, dtype=torch.get_default_dtype())
            _check_thresholds(thresholds)
            if thresholds.numel() != levels.num_levels - 1:
                raise ValueError(
                    "len(values) must equal len(thresholds) + 1, got "
                    f"{levels.num_levels} values and {thresholds.numel()} thresholds"
                )
            thresholds = thresholds.clone()
        if learn_thresholds:
            initial = levels.thresholds.detach() if thresholds is None else thresholds
            self.learned_thresholds = LearnableThresholds(initial)
            thresholds = None
        else:
            self.learned_thresholds = None
        self.register_buffer("_thresholds", thresholds)

    @property
    def values(self) -> torch.Tensor:
        """The output values ``(a_1, ..., a_M)``, shape ``(M,)``."""
        return self.levels.values

    @property
    def thresholds(self) -> torch.Tensor:
        """The thresholds ``(t_1, ..., t_{M-1})``, shape ``(M - 1,)``: learned, fixed, or the
        midpoints between the current output values."""
        if self.learned_thresholds is not None:
            return self.learned_thresholds.values
        return self.levels.thresholds if self._thresholds is None else self._thresholds

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        """:param x: a tensor, or :class:`~pyro_bqn.moments.Moments`, of any shape.
        :returns: the same kind and shape as ``x``."""
        mean, var = split_moments(x)
        values = self.values.to(mean.dtype)
        thresholds = self.thresholds.to(mean.dtype)
        if var is not None:
            out_mean, out_var = quantized_activation_moments(mean, var, values, thresholds)
            return Moments(out_mean, out_var, _constant_second_moment(values))
        index = torch.bucketize(x.detach(), thresholds.detach(), right=True)
        surrogate = x.clamp(values[0].detach(), values[-1].detach())
        # Forward value: the step function; gradient wrt x: the surrogate's (the STE).
        return values[index] + (surrogate - surrogate.detach())

    def extra_repr(self) -> str:
        if self._thresholds is None:
            return ""
        return f"thresholds={[round(t, 4) for t in self._thresholds.tolist()]}"


class Sign(QuantizedActivation):
    r"""``sign(h)`` with ``sign(0) = +1``: the :class:`QuantizedActivation` with values
    ``(-1, 1)`` and threshold ``0``.

    * **Tensor in**: ``+1`` where ``h >= 0``, else ``-1``; straight-through gradient of
      hardtanh (the incoming gradient where ``|h| <= 1``, zero elsewhere).
    * **Moments in** (``h ~ N(mu, s^2)``): mean ``a = erf(mu / sqrt(2 s^2)) = 2 Phi(mu/s) - 1``,
      variance ``1 - a^2 = 4 Phi(mu/s) Phi(-mu/s)`` (the latter form is used: it does not
      cancel when ``|a|`` is close to 1).

    Input and output have the same shape (any shape).
    """

    def __init__(self) -> None:
        super().__init__(values=(-1.0, 1.0))
