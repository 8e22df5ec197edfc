"""The value a relaxed categorical over levels draws: a level value plus its soft one-hot."""

from __future__ import annotations

import torch

__all__ = ["RelaxedLevelValue", "soft_onehot_of"]


class RelaxedLevelValue(torch.Tensor):
    """A tensor of (possibly relaxed) level values that remembers the one-hot it came from.

    The tensor itself is ``sum_k y_k v_k`` for a point ``y`` of the probability simplex and
    stays attached to the autograd graph; :attr:`soft_onehot` holds ``y`` with shape
    ``value.shape + (K,)``. Categorical log-probabilities of such a value are evaluated as
    ``sum_k y_k log p_k`` — exactly ``log p_k`` when ``y`` is one-hot, and a smooth
    interpolation otherwise, which is what makes relaxed samples usable with ``Trace_ELBO``
    against a :class:`~pyro_bqn.distributions.QuantizedCategorical` prior.

    Torch operations on it return plain tensors: the one-hot belongs to the sample site,
    not to anything computed from it.
    """

    soft_onehot: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def wrap(value: torch.Tensor, soft_onehot: torch.Tensor) -> RelaxedLevelValue:
        if soft_onehot.shape[:-1] != value.shape:
            raise ValueError(
                f"soft_onehot must have shape value.shape + (K,) = {tuple(value.shape)} + (K,), "
                f"got {tuple(soft_onehot.shape)}"
            )
        out = value.as_subclass(RelaxedLevelValue)
        out.soft_onehot = soft_onehot
        return out


def soft_onehot_of(value: torch.Tensor) -> torch.Tensor | None:
    """The soft one-hot a :class:`RelaxedLevelValue` carries, or ``None`` for other tensors."""
    return getattr(value, "soft_onehot", None) if isinstance(value, RelaxedLevelValue) else None
