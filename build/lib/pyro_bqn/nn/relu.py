"""The rectified linear unit, for tensors and for means and variances."""

from __future__ import annotations

import torch
from pyro.nn import PyroModule

from pyro_bqn.moments import Moments, split_moments
from pyro_bqn.nn.gaussian import gaussian_max

__all__ = ["ReLU"]


class ReLU(PyroModule):
    r"""``relu(h) = max(h, 0)``.

    * **Tensor in**: :func:`torch.relu`.
    * **Moments in** (``h ~ N(mu, s^2)``, independent entries), with ``a = mu / s``:

      .. math::

          E = \mu\Phi(a) + s\phi(a),\qquad E[\mathrm{relu}^2] = (\mu^2 + s^2)\Phi(a)
          + \mu s\phi(a),

      the maximum of ``h`` and the constant 0 (:func:`~pyro_bqn.nn.gaussian.gaussian_max`),
      whose variance is computed in a centred form that never cancels to a negative number
      and whose gradients stay finite for ``a << 0`` and for ``s -> 0``.

    Input and output have the same shape (any shape).
    """

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        """:param x: a tensor, or :class:`~pyro_bqn.moments.Moments`, of any shape.
        :returns: the same kind and shape as ``x``."""
        mean, var = split_moments(x)
        if var is None:
            return torch.relu(x)
        zero = mean.new_zeros(())
        return Moments(*gaussian_max(mean, var, zero, zero))
