"""Means and variances flowing through a network instead of samples.

Two carriers exist because two different things flow:

* :class:`Moments` — the mean and variance of an activation, passed from layer to layer.
  It is deliberately *not* a tensor: any torch operation that receives it without an
  analytic rule raises :class:`MomentRuleError` instead of silently using the mean.
* :class:`SiteMoments` — the value :class:`~pyro_bqn.infer.DeterministicELBO` puts at a
  latent sample site (a weight). It *is* a ``torch.Tensor`` (Pyro stores and replays site
  values as tensors) whose data is the posterior mean, so it has the right shape, dtype and
  device; the differentiable mean and variance live in :attr:`SiteMoments.moments`. Any
  torch operation on it raises :class:`MomentRuleError` too, for the same reason.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "Moments",
    "SiteMoments",
    "MomentRuleError",
    "as_moments",
    "moments_of",
    "split_moments",
]

_HINT = (
    "pyro_bqn propagates means and variances here, and this operation has no analytic "
    "moment rule. Use the moment-aware pieces instead: pyro_bqn.QuantizedLinear / "
    "QuantizedConv2d for weights; pyro_bqn.nn.Sign, QuantizedActivation, ReLU, BatchNorm1d, "
    "BatchNorm2d, AvgPool2d, MaxPool2d, Flatten, Temperature between layers; and "
    "pyro_bqn.distributions.MomentCategorical, MomentBernoulli or MomentNormal as the "
    "likelihood of an observed site."
)


class MomentRuleError(NotImplementedError):
    """Raised when a mean/variance pair reaches an operation with no analytic rule.

    Not a ``TypeError``: torch turns those into ``NotImplemented`` inside arithmetic
    operators, which would replace this message with a generic one.
    """


def _op_name(func: Any) -> str:
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    module = getattr(func, "__module__", None) or ""
    return f"{module}.{qualname}".lstrip(".") if qualname else repr(func)


class Moments:
    """The mean and variance of a tensor-valued random quantity, treated as independent
    across its entries (mean-field).

    :param mean: tensor of any shape ``S``.
    :param var: tensor broadcastable to ``S``; non-negative.
    :param second_moment: ``E[x^2]`` when the caller has it already (it saves recomputing
        ``var + mean^2`` on large weight tensors); shape ``S``, or a 0-dim tensor when it
        is the same everywhere (e.g. ``1`` for the outputs of :class:`~pyro_bqn.nn.Sign`,
        which lets :func:`~pyro_bqn.nn.quantized_layer.propagate` save a product).
    """

    __slots__ = ("mean", "var", "_second_moment")

    def __init__(
        self, mean: torch.Tensor, var: torch.Tensor, second_moment: torch.Tensor | None = None
    ) -> None:
        if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
            raise TypeError(
                "Moments(mean, var) needs two tensors, got "
                f"{type(mean).__name__} and {type(var).__name__}"
            )
        if var.shape != mean.shape:
            var = var.expand(mean.shape)
        self.mean = mean
        self.var = var
        self._second_moment = second_moment

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def dim(self) -> int:
        return self.mean.dim()

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.mean.size(dim)  # torch.Size for dim=None, as Tensor.size

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x^2] = var + mean^2``, same shape as :attr:`mean`."""
        if self._second_moment is None:
            return self.var + self.mean.square()
        return self._second_moment.expand(self.mean.shape)

    @property
    def constant_second_moment(self) -> torch.Tensor | None:
        """``E[x^2]`` as a 0-dim tensor when it is the same for every entry, else ``None``."""
        second = self._second_moment
        return second if second is not None and second.dim() == 0 else None

    def expand(self, shape: torch.Size | tuple[int, ...]) -> Moments:
        """Broadcast mean, variance and (when given) second moment to ``shape``, as views."""
        if self.mean.shape == shape:
            return self
        second = self._second_moment
        if second is not None and second.dim():
            second = second.expand(shape)
        return Moments(self.mean.expand(shape), self.var.expand(shape), second)

    def reshape(self, *shape: int) -> Moments:
        """Reshape mean and variance alike (a reshape moves entries, it mixes none)."""
        return Moments(
            self.mean.reshape(*shape), self.var.reshape(*shape), self.constant_second_moment
        )

    def __getitem__(self, index: Any) -> Moments:
        return Moments(self.mean[index], self.var[index], self.constant_second_moment)

    def __repr__(self) -> str:
        return f"Moments(shape={tuple(self.shape)})"

    def __getattr__(self, name: str) -> Any:
        # Reached only for names Moments lacks; a tensor method there means tensor code.
        if not name.startswith("_") and hasattr(torch.Tensor, name):
            raise MomentRuleError(f"Moments has no tensor method .{name}(). {_HINT}")
        raise AttributeError(f"'Moments' object has no attribute '{name}'")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise MomentRuleError(f"Moments reached {_op_name(func)}. {_HINT}")


# Operations that only read metadata: safe on a SiteMoments because they cannot turn the
# posterior's moments into a number that pretends to be a weight.
_METADATA_OPS = {
    torch.Tensor.shape.__get__,
    torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__,
    torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_leaf.__get__,
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
}


class SiteMoments(torch.Tensor):
    """A latent site's value in moment mode: the posterior's mean and variance.

    ``SiteMoments(mean, var)`` has the shape, dtype and device of ``mean``; read
    :attr:`moments` for the differentiable pair.
    """

    moments: Moments

    @staticmethod
    def __new__(
        cls, mean: torch.Tensor, var: torch.Tensor, second_moment: torch.Tensor | None = None
    ) -> SiteMoments:
        obj = torch.Tensor._make_subclass(cls, mean.detach(), False)
        obj.moments = Moments(mean, var, second_moment)
        return obj

    def __init__(
        self, mean: torch.Tensor, var: torch.Tensor, second_moment: torch.Tensor | None = None
    ) -> None:
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA_OPS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise MomentRuleError(
            f"A weight's posterior moments (SiteMoments) reached {_op_name(func)}. {_HINT}"
        )

    def __reduce_ex__(self, protocol):
        raise MomentRuleError(
            "SiteMoments is a transient value of DeterministicELBO; "
            "it cannot be pickled or deep-copied"
        )


def moments_of(x: torch.Tensor | Moments | SiteMoments) -> Moments | None:
    """The :class:`Moments` ``x`` carries, or ``None`` for a fixed tensor."""
    if isinstance(x, SiteMoments):
        return x.moments
    return x if isinstance(x, Moments) else None


def split_moments(
    x: torch.Tensor | Moments | SiteMoments,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(mean, var)`` of ``x``; ``var`` is ``None`` for a fixed tensor."""
    if isinstance(x, SiteMoments):
        return x.moments.mean, x.moments.var
    if isinstance(x, Moments):
        return x.mean, x.var
    return x, None


def as_moments(x: torch.Tensor | Moments | SiteMoments) -> Moments:
    """View ``x`` as :class:`Moments`; a fixed tensor has zero variance."""
    mean, var = split_moments(x)
    return Moments(mean, torch.zeros_like(mean) if var is None else var)
