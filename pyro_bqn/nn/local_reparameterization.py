r"""Local reparameterization for discrete weights: the training method of Roth, Schindler,
Fröning & Pernkopf, "Training Discrete-Valued Neural Networks with Sign Activations Using
Weight Distributions" (ECML PKDD 2019), which builds on Shayer, Levi & Fetaya, "Learning
Discrete Weights Using the Local Reparameterization Trick" (ICLR 2018).

With independent categorical weights, a unit's pre-activation ``h = sum_i w_i x_i`` is, by
the central limit theorem, approximately Gaussian with the moments that
:func:`~pyro_bqn.nn.quantized_layer.propagate` computes (``mean = x E[W]^T``,
``var = x^2 Var[W]^T`` for fixed inputs ``x``). Instead of propagating those moments
through the whole network (the probabilistic forward pass of
:class:`~pyro_bqn.infer.DeterministicELBO`), the method *samples* at every layer:

* a sign unit is a Bernoulli variable with ``P(sign h = +1) = Phi(mu / sigma)``; it is
  drawn through its Gumbel-softmax (binary Concrete) relaxation (:class:`RelaxedSign`), and
  the next layer receives that sample as a fixed input;
* the output logits are drawn from their Gaussian, ``z = mu + sigma * eps``
  (:class:`LocalReparameterization`), so the likelihood sees one sample of the logits:
  ``log softmax(z)_y`` is a one-sample Monte Carlo estimate of ``E[log p(y | z)]``.

Both layers sample only when they receive :class:`~pyro_bqn.Moments` in training mode. In
evaluation mode they pass moments on as :class:`~pyro_bqn.nn.Sign` and the identity do (so
:func:`~pyro_bqn.infer.predict` is the sampling-free predictive of the trained posterior),
and a plain tensor — a sampled or most probable network, the network the paper deploys —
gets the plain sign and the identity.
"""

from __future__ import annotations

import math

import torch
from pyro.nn import PyroModule

from pyro_bqn.moments import Moments, split_moments
from pyro_bqn.nn.gaussian import safe_std, standardize
from pyro_bqn.nn.quantized_activation import Sign

__all__ = ["LocalReparameterization", "RelaxedSign", "relaxed_sign_sample", "sign_logit"]


def sign_logit(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    r"""The log-odds of ``sign h = +1`` for ``h ~ N(mean, var)``, elementwise:

    .. math::
        \ell = \log \Phi(z) - \log \Phi(-z),\qquad z = \mu / \sigma,

    so ``P(sign h = +1) = sigmoid(l) = Phi(mu / sigma)``. Computed with
    :func:`torch.special.log_ndtr`, which keeps both tails (and their gradients) finite;
    ``z`` is clipped to ``[-40, 40]`` and ``var`` floored as in
    :mod:`pyro_bqn.nn.gaussian`.

    :param mean: ``mu``, any shape.
    :param var: ``sigma^2``, the same shape.
    :returns: ``l``, the same shape.
    """
    z = standardize(mean, 0.0, safe_std(var))
    return torch.special.log_ndtr(z) - torch.special.log_ndtr(-z)


def relaxed_sign_sample(
    mean: torch.Tensor, var: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    r"""A relaxed sample of ``sign h`` for ``h ~ N(mean, var)``: the binary Concrete
    (Gumbel-softmax) relaxation of the Bernoulli with ``P(+1) = Phi(mu / sigma)``, on
    ``(-1, 1)``:

    .. math::
        a = \tanh\big((\ell + L) / (2\tau)\big) = 2\,\mathrm{sigmoid}\big((\ell + L)/\tau\big) - 1,

    with ``l`` the log-odds of :func:`sign_logit` and ``L = log U - log(1 - U)``,
    ``U ~ Uniform(0, 1)``, a standard logistic variable (the difference of the two Gumbel
    variables of a two-class Gumbel-softmax). The sign of ``a`` is ``+1`` with probability
    exactly ``Phi(mu / sigma)`` at every temperature ``tau``; as ``tau -> 0``, ``a`` tends to
    that sign. ``a`` is differentiable in ``mean`` and ``var``.

    Draws from torch's global generator (seed it with :func:`pyro.set_rng_seed`), on the
    device and in the dtype of ``mean``.

    :param mean: ``mu``, any shape.
    :param var: ``sigma^2``, the same shape.
    :param temperature: ``tau > 0``, a float or a tensor broadcastable to ``mean``.
    :returns: ``a``, the shape of ``mean``.
    """
    logit = sign_logit(mean, var)
    uniform = torch.rand_like(logit)
    # logit(u) clamps u to [eps, 1 - eps]: the logistic noise stays finite (|L| <= 16 in
    # float32), which moves P(+1) by at most eps.
    noise = torch.logit(uniform, eps=torch.finfo(uniform.dtype).eps)
    return torch.tanh((logit + noise) / (2 * temperature))


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}")
    return float(temperature)


class RelaxedSign(Sign):
    r"""A sign activation trained by sampling, as in Roth et al. (ECML PKDD 2019): a
    :class:`~pyro_bqn.nn.Sign` whose moment input, in training mode, is turned into a relaxed
    sample of the sign instead of its moments.

    * **Moments in, training** (``h ~ N(mu, s^2)``, e.g. the output of a quantized layer and
      moment batch norm): a plain tensor ``a = tanh((l + L) / (2 tau))`` in ``(-1, 1)``, the
      Gumbel-softmax relaxation of ``sign h``, which is ``+1`` with probability
      ``Phi(mu / s)`` (:func:`relaxed_sign_sample`). The next quantized layer receives it as
      a fixed input, so its pre-activation moments are ``a E[W]^T`` and ``a^2 Var[W]^T``.
    * **Moments in, evaluation**: the moment rule of :class:`~pyro_bqn.nn.Sign` (mean
      ``2 Phi(mu/s) - 1``, variance ``1 - mean^2``): the probabilistic forward pass, so
      :func:`~pyro_bqn.infer.predict` gives the sampling-free predictive.
    * **Tensor in** (a sampled or the most probable network): ``sign``, with
      :class:`~pyro_bqn.nn.Sign`'s straight-through gradient.

    Input and output have the same shape (any shape).

    Usage (a training step's draw, then the plain sign of a fixed network)::

        >>> import torch
        >>> from pyro_bqn import Moments
        >>> act = RelaxedSign(temperature=1.0)
        >>> a = act(Moments(torch.zeros(3, 4), torch.ones(3, 4)))
        >>> type(a).__name__, tuple(a.shape), bool((a.abs() < 1).all())
        ('Tensor', (3, 4), True)
        >>> act(torch.tensor([-0.5, 0.0, 2.0]))
        tensor([-1.,  1.,  1.])

    :param temperature: ``tau > 0``, the relaxation temperature (Roth et al. use 1). The
        sign of the sample does not depend on it; lower values bring the sample closer to
        ``±1`` and make its gradient larger and noisier. May be changed between steps (e.g.
        annealed).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        """:param x: a tensor, or :class:`~pyro_bqn.moments.Moments`, of any shape.
        :returns: a tensor of the same shape (moments in evaluation mode)."""
        mean, var = split_moments(x)
        if var is None or not self.training:
            return super().forward(x)
        return relaxed_sign_sample(mean, var, _check_temperature(self.temperature))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class LocalReparameterization(PyroModule):
    r"""Draw a Gaussian whose moments flow in: the local reparameterization trick of
    Kingma, Salimans & Welling (2015) as Shayer et al. (ICLR 2018) apply it to discrete
    weights, and Roth et al. (ECML PKDD 2019) to the output logits of a sign network.

    * **Moments in, training** (``h ~ N(mu, s^2)``, independent entries): a plain tensor
      ``h = mu + s * eps``, ``eps ~ N(0, I)`` (torch's global generator, on ``mu``'s device),
      differentiable in ``mu`` and ``s^2``. Placed after the output layer of a
      :class:`~pyro_bqn.models.QuantizedClassifier`, the likelihood then scores sampled
      logits: :class:`~pyro_bqn.infer.DeterministicELBO`'s expected log-likelihood becomes
      the one-sample Monte Carlo estimate ``log softmax(z)_y`` of ``E[log p(y | z)]``, in
      place of its Jensen bound, while the KL stays analytic.
    * **Moments in, evaluation**: the moments, unchanged (the sampling-free predictive).
    * **Tensor in**: the tensor, unchanged (a fixed network has no weight noise to draw).

    Input and output have the same shape (any shape).

    Usage::

        >>> import torch
        >>> from pyro_bqn import Moments
        >>> sample = LocalReparameterization()
        >>> z = sample(Moments(torch.zeros(2, 10), torch.ones(2, 10)))
        >>> type(z).__name__, tuple(z.shape)
        ('Tensor', (2, 10))
        >>> x = torch.randn(2, 10)
        >>> bool(sample(x) is x)
        True

    A ReLU network trained as Shayer et al. train it samples every pre-activation:
    ``PyroModule[torch.nn.Sequential](LocalReparameterization(), pyro_bqn.nn.ReLU())`` as the
    activation.
    """

    def forward(self, x: torch.Tensor | Moments) -> torch.Tensor | Moments:
        """:param x: a tensor, or :class:`~pyro_bqn.moments.Moments`, of any shape.
        :returns: a tensor of the same shape (moments in evaluation mode)."""
        mean, var = split_moments(x)
        if var is None or not self.training:
            return x
        return mean + safe_std(var) * torch.randn_like(mean)
