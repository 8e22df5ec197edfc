"""A learnable temperature dividing the output logits."""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

from pyro_bqn.moments import Moments, split_moments

__all__ = ["Temperature"]


class Temperature(PyroModule):
    r"""Divide logits by a learnable positive temperature: ``z / T``.

    * **Tensor in**: ``z / T``.
    * **Moments in**: mean ``mu / T``, variance ``s^2 / T^2``.

    ``T`` is a :class:`~pyro.nn.PyroParam` constrained positive (Pyro optimises its log), so
    :class:`~pyro.infer.SVI` learns it with the rest of the model.

    **Choosing ``init``.** The logits of a quantized layer with ``±1``-scale weights and
    inputs have a standard deviation of about ``sqrt(fan_in)``, which saturates a softmax;
    initialise ``T`` near ``sqrt(fan_in)`` of the layer producing the logits (for example
    ``Temperature(512 ** 0.5)`` after a ``QuantizedLinear(512, 10)``) so training starts
    where the likelihood is sensitive.

    :param init: initial temperature, a positive float or a positive tensor broadcastable to
        the logits (e.g. shape ``(num_classes,)`` for one temperature per class).
    """

    def __init__(self, init: float | torch.Tensor = 1.0) -> None:
        super().__init__()
        init = torch.as_tensor(init, dtype=torch.get_default_dtype())
        if not (torch.isfinite(init) & (init > 0)).all():
            raise ValueError(f"Temperature init must be positive and finite, got {init.tolist()}")
        self.temperature = PyroParam(init.clone(), constraint=constraints.positive)

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        """:param x: logits, a tensor or :class:`~pyro_bqn.moments.Moments`, of shape
        ``(..., num_classes)``.
        :returns: the same kind and shape as ``x``."""
        temperature = self.temperature
        mean, var = split_moments(x)
        if var is None:
            return x / temperature
        return Moments(mean / temperature, var / temperature.square())
