"""BayesBiNN: the Bayesian learning rule for binary weights (Meng, Bachmann & Khan, "Training
Binary Neural Networks using the Bayesian Learning Rule", ICML 2020).

Every binary weight ``w ∈ {-1, +1}`` has a mean-field posterior ``q(w) ∝ exp(λ w)`` with
natural parameter ``λ``: ``P(w = +1) = sigmoid(2λ)``, mean ``μ = tanh(λ)`` and variance
``1 − μ²``. The prior has natural parameter ``λ₀`` (``0``: a fair coin). One step, with
learning rate ``α``, temperature ``τ``, ``M`` Monte Carlo samples and ``N`` training
examples:

1. For ``m = 1..M`` draw the Gumbel-softmax (concrete) relaxation of every weight,
   ``u ~ U(0, 1)``, ``δ = ½ log(u / (1 − u))``, ``w_m = tanh((λ + δ) / τ)``, run the closure
   (the mean minibatch loss ``ℓ`` and its backward pass) to get ``g_m = ∂ℓ/∂w`` at ``w_m``.
2. ``ĝ = (N / M) Σ_m s_m · g_m`` with ``s_m = (1 − w_m²) / (τ (1 − μ²))``: the chain rule
   through the relaxation, ``∂w_m/∂λ = (1 − w_m²)/τ``, turned into a gradient with respect
   to the mean parameter by ``∂μ/∂λ = 1 − μ²``.
3. With KL weight ``β`` and momentum ``ρ``: ``m ← ρ m + (1 − ρ)(ĝ + β (λ − λ₀))``,
   ``λ ← λ − α m / (1 − ρᵗ)``; ``β = 1``, ``ρ = 0`` is the paper's rule
   ``λ ← (1 − α) λ − α (ĝ − λ₀)``.

**Tempering.** ``β`` (``kl_weight``, the reference's ``reweight``) weighs the KL term
exactly as the KL weight of the other Bayesian methods here (``DeterministicELBO``'s, the
Gaussian BNN's): the rule is natural-gradient descent on
``N · E_q[ℓ] + β · KL(q ‖ p)``, i.e. on ``−(E_q[log p(y | x, w)] − β · KL)``; ``β = 1`` is
the ELBO, ``β < 1`` a tempered (sharper) posterior. ``β`` and ``α`` together set how fast
the prior pulls ``λ`` back: by a factor ``1 − αβ`` per step.

**The gradient scale** ``s_m`` (``gradient_scale``):

* ``"authors"`` (the default): ``s = (1 − w² + ε) / τ / (1 − μ² + ε)`` with ``ε = 1e-10``,
  as the reference implementation (team-approx-bayes/BayesBiNN) computes it. This is what
  makes the paper's MNIST setting work: at ``τ = 1e-10`` and ``λ`` initialised at ``±10``,
  ``tanh`` rounds to exactly ``±1`` in float32, so both ``1 − w²`` and ``1 − μ²`` are 0 and
  ``s = ε / τ / ε = 1/τ = 1e10`` for every weight. The update then adds ``−α N g / τ`` to
  ``λ`` (a huge step; ``λ`` stays saturated) and decays it by ``1 − αβ``: ``λ`` is a
  decayed running sum of the gradients and the weight its sign, much like Bop (Helwegen
  et al. 2019), to which the paper relates its rule. Since ``λ`` only matters through its
  sign there, ``α`` matters only through the prior's pull ``αβ`` (and the schedule), and
  the initial ``|λ|`` not at all once the first step has swamped it. Away from
  saturation this scale equals the exact one.
* ``"exact"``: ``s = cosh²(λ) / (τ cosh²((λ + δ)/τ))``, the same quantity computed in log
  space, exact where ``tanh`` rounds to ``±1`` (``|λ| ≳ 9`` in float32). In the regime
  above the exact ``s`` is ``0`` (``(1 − w²)/τ`` underflows far faster than ``1 − μ²``),
  so the likelihood never reaches ``λ``: the weights never move. Use it only with ``τ`` of
  order one and a small ``|λ|`` at the start; keep ``τ <= 1`` then, because for ``τ > 1`` the
  scale grows like ``exp(2|λ|(1 − 1/τ))`` and ``λ`` diverges.

Other differences from the reference implementation, on purpose:

* The mean after a step is computed from the *updated* ``λ`` (the reference keeps the
  previous one, so its ``μ`` lags one step), and the variance is ``1 − μ²`` (the
  reference's ``get_distribution_params`` returns ``μ (1 − μ)``).
* ``λ`` starts at ``init_lamda · sign(p)`` of the parameter's current values (sign ``0`` is
  ``+1``), so the model's own random initialisation picks the initial signs; the reference
  draws fresh random signs.

Parameters that are not binary (batch-norm affine parameters, the output bias and logit
scale) are not this optimizer's business: :func:`train_bayesbinn` trains them with Adam
alongside, on the gradients of the last Monte Carlo sample of every step, as the reference
does with its separate ``bn_optimizer``. Batch-norm running statistics are those of the
relaxed networks seen in training; the sampled ``±1`` networks and the mean network use
them as they are, as in the reference.

**Continual learning** (the paper's Section 5.3, and ``main_permute_mnist_CL.py`` of the
reference code): after a task, the posterior's natural parameters become the prior's,
``λ₀ ← λ`` for every weight (:meth:`BayesBiNN.posterior_as_prior_`), and the next task
continues from the same ``λ`` with the learning rate reset
(:func:`continue_bayesbinn`). The prior's pull ``αβ(λ − λ₀)`` then holds each weight
towards what the earlier tasks learned. ``strength`` scales ``λ₀`` (``λ₀ ← strength · λ``,
the same tempering as :func:`pyro_bqn.infer.posterior_as_prior`); the reference uses
``1``. In the authors' saturated regime ``λ`` is a large running sum whose sign is the
weight, so ``λ₀`` holds that sum: the prior is as confident as the past gradients were.

**Devices.** Everything the optimizer creates (``λ``, its prior, the noise, the predictive's
generator) lives on the device of the parameters; build the network there with
``bayesbinn_network(..., device=...)``.

**Prediction** (:func:`bayesbinn_predict_proba`): the paper's Bayesian predictive averages
``softmax`` over binary networks sampled from ``q`` (``mode="sampled"``); the second mode
is the single mean network ``sign(μ) = sign(tanh(λ))`` (``mode="mean"``, also the most
probable network of ``q``, which the reference's MNIST script evaluates by default). The
two agree once ``λ`` has concentrated (as in the authors' saturated regime); where it has
not, the mean network can be far worse than the average of samples.

Outside :meth:`BayesBiNN.step` the binary parameters hold the mean network ``sign(μ)``, so
``model(x)`` is always a valid binary network.

Usage::

    >>> import torch
    >>> from pyro_bqn.baselines.mlp import mlp_architecture
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(64, 8), torch.randint(3, (64,))
    >>> model = bayesbinn_network(mlp_architecture([8, 16, 3]))
    >>> optimizer = train_bayesbinn(model, x, y, lr=1e-3, epochs=2, batch_size=16,
    ...                             kl_weight=1e-3, progress=False)
    >>> bayesbinn_predict_proba(model, optimizer, x, num_samples=5).shape
    torch.Size([64, 3])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pyro_bqn.architectures import TORCH_LAYERS, Architecture
from pyro_bqn.baselines._checks import check_positive_int
from pyro_bqn.baselines.mlp import Network, mlp_architecture
from pyro_bqn.baselines.ste import SignSTE, train_with_lr_schedule
from pyro_bqn.baselines.training import predict_proba

__all__ = [
    "AUTHORS_EPS",
    "BAYESBINN_ACTIVATIONS",
    "GRADIENT_SCALES",
    "PREDICTION_MODES",
    "BayesBiNN",
    "bayesbinn_mlp",
    "bayesbinn_network",
    "bayesbinn_predict_proba",
    "continue_bayesbinn",
    "split_binary_parameters",
    "train_bayesbinn",
]

#: The ``gradient_scale`` options of :class:`BayesBiNN` (see the module docstring).
GRADIENT_SCALES = ("authors", "exact")
#: The ``ε`` of the reference implementation's gradient scale.
AUTHORS_EPS = 1e-10
#: The ``mode`` options of :func:`bayesbinn_predict_proba`.
PREDICTION_MODES = ("sampled", "mean")
#: Hidden activations of :func:`bayesbinn_network`: ``"sign"`` (binary, with the hardtanh
#: straight-through gradient, as the other quantized rows) or ``"relu"`` (the reference's
#: MNIST network: binary weights, real activations).
BAYESBINN_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"sign": SignSTE, "relu": nn.ReLU}
_BINARY_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    # log cosh x = |x| + log(1 + exp(-2|x|)) - log 2, finite for every finite x.
    x = x.abs()
    return x + F.softplus(-2.0 * x) - math.log(2.0)


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _check_number(
    value: float,
    name: str,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


def _check_choice(value: str, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _gradient_scale(
    lamda: torch.Tensor, z: torch.Tensor, temperature: float, gradient_scale: str
) -> torch.Tensor:
    """The scale ``s`` turning ``∂ℓ/∂w`` at the relaxed sample ``w = tanh(z)``,
    ``z = (λ + δ)/τ``, into the gradient with respect to ``μ``; same shape as ``lamda``.

    ``"authors"``: ``(1 − w² + ε) / τ / (1 − tanh²λ + ε)`` with ``ε =`` :data:`AUTHORS_EPS`;
    ``"exact"``: ``cosh²λ / (τ cosh² z)``, in log space (see the module docstring).
    """
    if gradient_scale == "authors":
        w, mu = torch.tanh(z), torch.tanh(lamda)
        return (1.0 - w * w + AUTHORS_EPS) / temperature / (1.0 - mu * mu + AUTHORS_EPS)
    return torch.exp(2.0 * (_log_cosh(lamda) - _log_cosh(z))) / temperature


class BayesBiNN(torch.optim.Optimizer):
    """The BayesBiNN optimizer over binary ``±1`` parameters of any shape (linear weights,
    convolution kernels); see the module docstring for the rule, the gradient scale and the
    KL weight.

    Per-parameter state: ``lamda`` (natural parameters ``λ``, the parameter's shape),
    ``momentum_buffer``, ``step`` and, once :meth:`posterior_as_prior_` has run,
    ``prior_lamda`` (a prior natural parameter per weight, which replaces the group's).
    Per-group options: ``lr``, ``temperature``, ``prior_lamda``, ``init_lamda``,
    ``momentum``, ``kl_weight``, ``gradient_scale``.
    ``train_set_size`` and ``num_samples`` are shared by all groups, because one closure
    evaluates the whole model.

    The defaults are the reference's MNIST setting (``lr = 1e-4``, ``τ = 1e-10``,
    ``|λ| = 10`` at the start, one sample, the authors' scale, no momentum), which it runs
    for 500 epochs over 54,000 images with a cosine learning-rate decay.

    :param params: the binary parameters (iterable of tensors or of parameter-group dicts).
    :param train_set_size: ``N``, the number of training examples the mean loss is over.
    :param lr: learning rate ``α`` in ``(0, 1]``.
    :param temperature: relaxation temperature ``τ > 0``.
    :param num_samples: Monte Carlo samples ``M >= 1`` per step.
    :param prior_lamda: prior natural parameter ``λ₀`` of every weight (``0``:
        ``P(w = +1) = ½``); :meth:`posterior_as_prior_` sets one per weight instead.
    :param init_lamda: ``|λ|`` at the start, ``>= 0``; signs from the parameters' values.
    :param momentum: ``ρ`` in ``[0, 1)``, an Adam-style bias-corrected running average.
    :param kl_weight: ``β >= 0`` on the KL term (``1``: the Bayesian learning rule).
    :param gradient_scale: ``"authors"`` or ``"exact"`` (:data:`GRADIENT_SCALES`).

    Usage::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.randn(3, 4))
        >>> optimizer = BayesBiNN([w], train_set_size=100, lr=1e-3, kl_weight=1e-2)
        >>> def closure():
        ...     loss = (w.sum(0) - 1.0).pow(2).mean()
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
        >>> bool(torch.isin(w, torch.tensor([-1.0, 1.0])).all())
        True
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        train_set_size: int,
        *,
        lr: float = 1e-4,
        temperature: float = 1e-10,
        num_samples: int = 1,
        prior_lamda: float = 0.0,
        init_lamda: float = 10.0,
        momentum: float = 0.0,
        kl_weight: float = 1.0,
        gradient_scale: str = "authors",
    ) -> None:
        check_positive_int(train_set_size, "train_set_size")
        check_positive_int(num_samples, "num_samples")
        self.train_set_size = train_set_size
        self.num_samples = num_samples
        defaults = dict(
            lr=lr,
            temperature=temperature,
            prior_lamda=prior_lamda,
            init_lamda=init_lamda,
            momentum=momentum,
            kl_weight=kl_weight,
            gradient_scale=gradient_scale,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validate its options and initialise ``λ = init_lamda · sign(p)``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_number(group["lr"], "lr", 0.0, 1.0, low_open=True)
        _check_number(group["temperature"], "temperature", 0.0, low_open=True)
        _check_number(group["prior_lamda"], "prior_lamda", -math.inf)
        _check_number(group["init_lamda"], "init_lamda", 0.0)
        _check_number(group["momentum"], "momentum", 0.0, 1.0, high_open=True)
        _check_number(group["kl_weight"], "kl_weight", 0.0)
        _check_choice(group["gradient_scale"], "gradient_scale", GRADIENT_SCALES)
        for p in group["params"]:
            state = self.state[p]
            state["lamda"] = group["init_lamda"] * _sign(p.detach())
            state["momentum_buffer"] = torch.zeros_like(p)
            state["step"] = 0
            p.copy_(_sign(state["lamda"]))

    def _params(self) -> list[tuple[dict[str, Any], torch.Tensor]]:
        return [(group, p) for group in self.param_groups for p in group["params"]]

    def mean(self, p: torch.Tensor) -> torch.Tensor:
        """Posterior mean ``μ = tanh(λ)`` of parameter ``p``, same shape as ``p``."""
        return torch.tanh(self.state[p]["lamda"])

    def variance(self, p: torch.Tensor) -> torch.Tensor:
        """Posterior variance ``1 − μ²`` of parameter ``p``, same shape as ``p``.

        Computed as ``1 / cosh²(λ)``, which is ``1 − tanh²(λ)`` without the cancellation.
        """
        return torch.exp(-2.0 * _log_cosh(self.state[p]["lamda"]))

    @torch.no_grad()
    def posterior_as_prior_(self, strength: float = 1.0) -> None:
        """Continual learning: make the current posterior the prior of the next task,
        ``λ₀ ← strength · λ`` for every weight (a copy, so ``λ₀`` stays while ``λ`` learns).

        :param strength: multiplies the natural parameters, ``> 0`` (``1``: the posterior
            itself, as the paper and reference code do).
        :raises ValueError: for a bad ``strength``.
        """
        _check_number(strength, "strength", 0.0, low_open=True)
        for _, p in self._params():
            state = self.state[p]
            state["prior_lamda"] = strength * state["lamda"].clone()

    @torch.no_grad()
    def load_mean_(self) -> None:
        """Write the mean network ``sign(μ)`` (``+1`` where ``μ = 0``) into the parameters;
        it is also the most probable network of the posterior."""
        for _, p in self._params():
            p.copy_(_sign(self.state[p]["lamda"]))

    @torch.no_grad()
    def sample_(self, generator: torch.Generator | None = None) -> None:
        """Write one exact posterior sample: ``+1`` with probability ``sigmoid(2λ)``, else ``-1``.

        :param generator: source of the uniform draws; default torch's global generator.
        """
        for _, p in self._params():
            lamda = self.state[p]["lamda"]
            u = torch.rand(lamda.shape, generator=generator, dtype=lamda.dtype, device=lamda.device)
            p.copy_(torch.where(u < torch.sigmoid(2.0 * lamda), 1.0, -1.0).to(p.dtype))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One BayesBiNN update of every ``λ``; returns the loss averaged over the samples.

        :param closure: re-evaluates the model on the current minibatch with the weights this
            step has written into the parameters: computes the *mean* minibatch loss, calls
            ``backward()`` and returns the loss. It is called ``num_samples`` times, each
            with a fresh relaxed sample; gradients of the binary parameters are reset before
            each call.
        """
        if closure is None:
            raise ValueError("closure is required: BayesBiNN re-evaluates the loss per sample")
        params = self._params()
        grad_sums = [torch.zeros_like(p) for _, p in params]
        losses = []
        for _ in range(self.num_samples):
            scales = []
            for group, p in params:
                lamda, tau = self.state[p]["lamda"], group["temperature"]
                u = torch.rand_like(lamda)
                # logit(u)/2 is the logistic noise of the binary Gumbel-softmax trick;
                # eps keeps it finite when rand returns exactly 0.
                z = (lamda + 0.5 * torch.logit(u, eps=torch.finfo(u.dtype).eps)) / tau
                p.copy_(torch.tanh(z))
                p.grad = None
                scales.append(_gradient_scale(lamda, z, tau, group["gradient_scale"]))
            with torch.enable_grad():
                losses.append(closure().detach())
            if all(p.grad is None for _, p in params):
                raise ValueError("closure must call backward() on the loss it returns")
            for grad_sum, scale, (_, p) in zip(grad_sums, scales, params, strict=True):
                if p.grad is not None:  # a parameter the loss does not use has no gradient
                    grad_sum.add_(scale * p.grad)
        for grad_sum, (group, p) in zip(grad_sums, params, strict=True):
            state = self.state[p]
            lamda, rho = state["lamda"], group["momentum"]
            grad_hat = grad_sum * (self.train_set_size / self.num_samples)
            prior = state.get("prior_lamda", group["prior_lamda"])
            direction = grad_hat + group["kl_weight"] * (lamda - prior)
            state["step"] += 1
            state["momentum_buffer"].mul_(rho).add_(direction, alpha=1.0 - rho)
            lamda.sub_(state["momentum_buffer"], alpha=group["lr"] / (1.0 - rho ** state["step"]))
            p.copy_(_sign(lamda))
        return torch.stack(losses).mean()


def bayesbinn_network(
    architecture: Architecture,
    *,
    activation: str = "sign",
    output_scale: float | None = None,
    learn_output_scale: bool = True,
    device: torch.device | str | None = None,
) -> Network:
    """The binary network for BayesBiNN in ``architecture``: plain
    :class:`torch.nn.Linear` and :class:`torch.nn.Conv2d` layers whose weights
    :class:`BayesBiNN` owns, batch norm, the ``activation``, then a logit scale; the shape
    of :func:`~pyro_bqn.baselines.ste_network`.

    :class:`BayesBiNN` writes relaxed samples into the weights during a step and ``±1``
    values otherwise. Input ``(N, ...)`` (reshaped to the architecture's input shape),
    output logits ``(N, num_classes)``.

    :param activation: a key of :data:`BAYESBINN_ACTIVATIONS`: ``"sign"`` (default, binary
        activations like the other quantized networks here) or ``"relu"`` (the reference's
        MNIST network).
    :param output_scale: initial logit scale; default ``1 / sqrt(fan_in)`` of the output
        layer.
    :param learn_output_scale: learn the logit scale (default) or keep it fixed.
    :param device: where the parameters are created (default: torch's default device).
    """
    _check_choice(activation, "activation", tuple(BAYESBINN_ACTIVATIONS))
    if output_scale is None:
        output_scale = architecture.sizes[-2] ** -0.5
    # Created on the device itself, not on the CPU and copied over.
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return Network(
            architecture,
            TORCH_LAYERS.replace(activation=BAYESBINN_ACTIVATIONS[activation]),
            output_scale=output_scale,
            learn_output_scale=learn_output_scale,
        )


def bayesbinn_mlp(
    sizes: Sequence[int],
    *,
    activation: str = "sign",
    output_scale: float | None = None,
    learn_output_scale: bool = True,
    device: torch.device | str | None = None,
) -> Network:
    """:func:`bayesbinn_network` of the MLP of widths ``sizes = (d_in, h_1, ..., d_out)``:
    ``[Linear → BatchNorm1d → activation] × (L − 1) → Linear → scale``."""
    return bayesbinn_network(
        mlp_architecture(sizes),
        activation=activation,
        output_scale=output_scale,
        learn_output_scale=learn_output_scale,
        device=device,
    )


def split_binary_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split ``model``'s parameters into binary ones (the weight of every linear and
    convolution layer) and the rest (biases, batch norm, logit scale), in order."""
    binary_ids = {id(m.weight) for m in model.modules() if isinstance(m, _BINARY_LAYERS)}
    binary, other = [], []
    for p in model.parameters():
        (binary if id(p) in binary_ids else other).append(p)
    return binary, other


def train_bayesbinn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float = 1e-4,
    temperature: float = 1e-10,
    num_samples: int = 1,
    prior_lamda: float = 0.0,
    init_lamda: float = 10.0,
    momentum: float = 0.0,
    kl_weight: float = 1.0,
    gradient_scale: str = "authors",
    other_lr: float = 1e-2,
    lr_schedule: str = "cosine",
    final_lr_fraction: float = 0.0,
    **train_kwargs: Any,
) -> BayesBiNN:
    """Train ``model``'s linear and convolution weights with :class:`BayesBiNN` and its other
    parameters with Adam (learning rate ``other_lr``).

    ``N = x.shape[0]``; the BayesBiNN options are documented on :class:`BayesBiNN` (their
    defaults are the reference's MNIST setting; ``kl_weight`` is the KL weight ``β`` of the
    other Bayesian methods, see the module docstring). Both optimizers' learning rates
    follow ``lr_schedule`` down to ``final_lr_fraction`` of their start
    (:func:`~pyro_bqn.baselines.ste.train_with_lr_schedule`; the reference decays both with
    a cosine to zero). ``train_kwargs`` (``epochs``, ``batch_size``, ``seed``, ``callback``,
    ...) go to :func:`~pyro_bqn.baselines.train`. Returns the optimizer, which holds the
    posterior (for :func:`bayesbinn_predict_proba`).
    """
    if "optimizer" in train_kwargs:
        raise ValueError("train_bayesbinn builds its optimizers itself; do not pass optimizer")
    binary, other = split_binary_parameters(model)
    optimizer = BayesBiNN(
        binary,
        train_set_size=x.shape[0],
        lr=lr,
        temperature=temperature,
        num_samples=num_samples,
        prior_lamda=prior_lamda,
        init_lamda=init_lamda,
        momentum=momentum,
        kl_weight=kl_weight,
        gradient_scale=gradient_scale,
    )
    continue_bayesbinn(
        model,
        optimizer,
        x,
        y,
        other_lr=other_lr,
        lr_schedule=lr_schedule,
        final_lr_fraction=final_lr_fraction,
        **train_kwargs,
    )
    return optimizer


def continue_bayesbinn(
    model: nn.Module,
    optimizer: BayesBiNN,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    other_lr: float = 1e-2,
    lr_schedule: str = "cosine",
    final_lr_fraction: float = 0.0,
    **train_kwargs: Any,
) -> BayesBiNN:
    """Train ``model`` on ``(x, y)`` with an existing :class:`BayesBiNN` ``optimizer`` (its
    ``λ``, prior and options) and a fresh Adam for the other parameters: the next task of
    continual learning, after :meth:`BayesBiNN.posterior_as_prior_`.

    ``N`` becomes ``x.shape[0]``; the learning rates restart from their values and follow
    ``lr_schedule`` down to ``final_lr_fraction`` (the reference resets them every task).
    Other arguments as :func:`train_bayesbinn`. Returns ``optimizer``.

    Usage::

        >>> import torch
        >>> from pyro_bqn.baselines.mlp import mlp_architecture
        >>> x, y = torch.randn(32, 8), torch.randint(2, (32,))
        >>> model = bayesbinn_network(mlp_architecture([8, 16, 2]))
        >>> optimizer = train_bayesbinn(model, x, y, epochs=1, batch_size=16, progress=False)
        >>> optimizer.posterior_as_prior_()
        >>> optimizer = continue_bayesbinn(model, optimizer, x, 1 - y, epochs=1,
        ...                                batch_size=16, progress=False)
    """
    if not isinstance(optimizer, BayesBiNN):
        raise ValueError(f"optimizer must be a BayesBiNN, got {type(optimizer).__name__}")
    if "optimizer" in train_kwargs:
        raise ValueError("continue_bayesbinn builds the other optimizer itself; do not pass one")
    binary, other = split_binary_parameters(model)
    owned = {id(p) for _, p in optimizer._params()}
    if {id(p) for p in binary} != owned:
        raise ValueError("optimizer must own exactly the model's binary weights")
    optimizer.train_set_size = x.shape[0]
    optimizers: list[torch.optim.Optimizer] = [optimizer]
    if other:
        optimizers.append(torch.optim.Adam(other, lr=other_lr))
    train_with_lr_schedule(
        model,
        x,
        y,
        optimizers,
        lr_schedule=lr_schedule,
        final_lr_fraction=final_lr_fraction,
        **train_kwargs,
    )
    return optimizer


def bayesbinn_predict_proba(
    model: nn.Module,
    optimizer: BayesBiNN,
    x: torch.Tensor,
    *,
    mode: str = "sampled",
    num_samples: int = 10,
    batch_size: int = 1024,
    seed: int = 0,
) -> torch.Tensor:
    """Predictive probabilities of the BayesBiNN posterior, shape ``(N, C)``.

    :param mode: ``"sampled"`` (the paper's): the average of ``softmax`` over
        ``num_samples`` binary networks drawn exactly from ``q`` (each weight ``+1`` with
        probability ``sigmoid(2λ)``), with a generator seeded by ``seed``; ``"mean"``: the
        one network ``sign(μ)`` (``num_samples`` and ``seed`` unused).
    :param num_samples: networks averaged in ``"sampled"`` mode, ``>= 1``.
    :param batch_size: examples per forward pass.

    Either way the parameters hold ``sign(μ)`` afterwards.
    """
    _check_choice(mode, "mode", PREDICTION_MODES)
    check_positive_int(num_samples, "num_samples")
    if mode == "mean":
        optimizer.load_mean_()
        return predict_proba(model, x, batch_size)
    # The draws happen where λ lives: a generator of that device.
    device = optimizer._params()[0][1].device
    generator = torch.Generator(device=device).manual_seed(seed)
    probs = []
    try:
        for _ in range(num_samples):
            optimizer.sample_(generator)
            probs.append(predict_proba(model, x, batch_size))
    finally:
        optimizer.load_mean_()
    return torch.stack(probs).mean(0)
