"""BayesBiNN: the Bayesian learning rule for binary weights (Meng, Bachmann & Khan, ICML 2020).

Every binary weight ``w ∈ {-1, +1}`` has a mean-field posterior
``q(w) ∝ exp(λ w)`` with natural parameter ``λ``: ``P(w = +1) = sigmoid(2λ)``, mean
``μ = tanh(λ)`` and variance ``1 − μ²``. The prior has natural parameter ``λ₀`` (``0``: a fair
coin). One step, with learning rate ``α``, temperature ``τ``, ``M`` Monte Carlo samples and
``N`` training examples:

1. For ``m = 1..M`` draw the Gumbel-softmax (concrete) relaxation of every weight,
   ``u ~ U(0, 1)``, ``δ = ½ log(u / (1 − u))``, ``w_m = tanh((λ + δ) / τ)``, run the closure
   (the mean minibatch loss ``ℓ`` and its backward pass) to get ``g_m = ∂ℓ/∂w`` at ``w_m``.
2. ``ĝ = (N / M) Σ_m s_m · g_m`` with ``s_m = (1 − w_m²) / (τ (1 − μ²))``: the chain rule
   through the relaxation, ``∂w_m/∂λ = (1 − w_m²)/τ``, turned into a gradient with respect
   to the mean parameter by ``∂μ/∂λ = 1 − μ²``.
3. ``λ ← (1 − α) λ − α (ĝ − λ₀)``; with KL weight ``β`` and momentum ``ρ``:
   ``m ← ρ m + (1 − ρ)(ĝ + β (λ − λ₀))``, ``λ ← λ − α m / (1 − ρᵗ)`` (``β = 1``, ``ρ = 0`` gives
   the plain rule).

Differences from the reference implementation (team-approx-bayes/BayesBiNN), on purpose:

* ``s_m`` is computed as ``cosh²(λ) / (τ cosh²((λ + δ)/τ))`` in log space, so it is exact
  where ``tanh`` rounds to ``±1`` (``|λ| ≳ 9`` in float32). The reference adds ``1e-10`` to
  numerator and denominator instead, which, at its MNIST setting ``τ = 1e-10``, turns ``s_m``
  into ``≈ 1/(1 − μ² + 1e-10)``; with the exact ``s_m`` a tiny ``τ`` makes the likelihood
  gradient vanish, so use ``τ`` of order one here.
* The mean after a step is computed from the *updated* ``λ`` (the reference keeps the
  previous one), and the variance is ``1 − μ²`` (the reference's
  ``get_distribution_params`` returns ``μ (1 − μ)``).
* ``λ`` starts at ``init_lamda · sign(p)`` of the parameter's current values (sign ``0`` is
  ``+1``), so the model's own random initialisation picks the initial signs; the reference
  draws fresh random signs.

Parameters that are not binary (batch-norm affine parameters, the output bias and logit
scale) are not this optimizer's business: :func:`train_bayesbinn` trains them with Adam
alongside, on the gradients of the last Monte Carlo sample of every step, as the reference
does with its separate ``bn_optimizer``. Batch-norm running statistics are those of the
relaxed networks seen in training; the most probable and the sampled ``±1`` networks use
them as they are, as in the reference.

Outside :meth:`BayesBiNN.step` the binary parameters hold the most probable network
``sign(μ)``, so ``model(x)`` is always a valid binary network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pyro_bqn.baselines._checks import check_positive_int
from pyro_bqn.baselines.mlp import MLP, check_sizes
from pyro_bqn.baselines.ste import SignSTE
from pyro_bqn.baselines.training import predict_proba, train

__all__ = [
    "BayesBiNN",
    "bayesbinn_mlp",
    "bayesbinn_predict_proba",
    "split_binary_parameters",
    "train_bayesbinn",
]


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


class BayesBiNN(torch.optim.Optimizer):
    """The BayesBiNN optimizer over binary ``±1`` parameters; see the module docstring.

    Per-parameter state: ``lamda`` (natural parameters ``λ``, the parameter's shape),
    ``momentum_buffer`` and ``step``. Per-group options: ``lr``, ``temperature``,
    ``prior_lamda``, ``init_lamda``, ``momentum``, ``kl_weight``. ``train_set_size`` and
    ``num_samples`` are shared by all groups, because one closure evaluates the whole model.

    :param params: the binary parameters (iterable of tensors or of parameter-group dicts).
    :param train_set_size: ``N``, the number of training examples the mean loss is over.
    :param lr: learning rate ``α`` in ``(0, 1]``.
    :param temperature: relaxation temperature ``τ > 0``.
    :param num_samples: Monte Carlo samples ``M >= 1`` per step.
    :param prior_lamda: prior natural parameter ``λ₀`` (``0``: ``P(w = +1) = ½``).
    :param init_lamda: ``|λ|`` at the start, ``>= 0``; signs from the parameters' values.
    :param momentum: ``ρ`` in ``[0, 1)``, an Adam-style bias-corrected running average.
    :param kl_weight: ``β >= 0`` on the prior term (``1``: the Bayesian learning rule).

    The defaults ``lr = 1e-4``, ``init_lamda = 10``, ``num_samples = 1`` are the reference's
    MNIST setting (``N ≈ 54,000``, hundreds of epochs); a short run on little data wants a
    larger ``lr`` and a smaller ``init_lamda`` (e.g. ``1e-2`` and ``1``). Keep ``τ <= 1``:
    for ``τ > 1`` the scale ``s`` grows like ``exp(2|λ|(1 − 1/τ))`` and ``λ`` diverges.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        train_set_size: int,
        *,
        lr: float = 1e-4,
        temperature: float = 1.0,
        num_samples: int = 1,
        prior_lamda: float = 0.0,
        init_lamda: float = 10.0,
        momentum: float = 0.0,
        kl_weight: float = 1.0,
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
    def load_map_(self) -> None:
        """Write the most probable network ``sign(μ)`` (``+1`` where ``μ = 0``) into the params."""
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
                # s = (1 - tanh²z) / (τ (1 - tanh²λ)) = cosh²λ / (τ cosh²z), in log space.
                scales.append(torch.exp(2.0 * (_log_cosh(lamda) - _log_cosh(z))) / tau)
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
            direction = grad_hat + group["kl_weight"] * (lamda - group["prior_lamda"])
            state["step"] += 1
            state["momentum_buffer"].mul_(rho).add_(direction, alpha=1.0 - rho)
            lamda.sub_(state["momentum_buffer"], alpha=group["lr"] / (1.0 - rho ** state["step"]))
            p.copy_(_sign(lamda))
        return torch.stack(losses).mean()


def bayesbinn_mlp(
    sizes: Sequence[int],
    *,
    output_scale: float | None = None,
    learn_output_scale: bool = True,
) -> MLP:
    """The binary network for BayesBiNN: ``[Linear → BatchNorm1d → SignSTE] × (L − 1) →
    Linear → scale``, the shape of :func:`~pyro_bqn.baselines.ste_mlp`.

    The linear weights are used as they are: :class:`BayesBiNN` writes relaxed samples into
    them during a step and ``±1`` values otherwise. Input ``(N, sizes[0])``, output logits
    ``(N, sizes[-1])``; the output scale defaults to ``1 / sqrt(sizes[-2])``.
    """
    sizes = check_sizes(sizes)
    return MLP(
        sizes,
        linear=nn.Linear,
        activation=SignSTE,
        output_scale=sizes[-2] ** -0.5 if output_scale is None else output_scale,
        learn_output_scale=learn_output_scale,
    )


def split_binary_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split ``model``'s parameters into binary ones (the weight of every
    :class:`torch.nn.Linear`) and the rest (biases, batch norm, logit scale), in order."""
    binary_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
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
    temperature: float = 1.0,
    num_samples: int = 1,
    prior_lamda: float = 0.0,
    init_lamda: float = 10.0,
    momentum: float = 0.0,
    kl_weight: float = 1.0,
    other_lr: float = 1e-2,
    **train_kwargs: Any,
) -> BayesBiNN:
    """Train ``model``'s linear weights with :class:`BayesBiNN` and its other parameters with
    Adam (learning rate ``other_lr``) through :func:`~pyro_bqn.baselines.train`.

    ``N = x.shape[0]``; the BayesBiNN options are documented on :class:`BayesBiNN`, and
    ``train_kwargs`` (``epochs``, ``batch_size``, ``seed``, ...) go to
    :func:`~pyro_bqn.baselines.train`. Returns the optimizer, which holds the posterior
    (for :func:`bayesbinn_predict_proba`).
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
    )
    optimizers: list[torch.optim.Optimizer] = [optimizer]
    if other:
        optimizers.append(torch.optim.Adam(other, lr=other_lr))
    train(model, x, y, optimizer=optimizers, **train_kwargs)
    return optimizer


def bayesbinn_predict_proba(
    model: nn.Module,
    optimizer: BayesBiNN,
    x: torch.Tensor,
    *,
    num_samples: int | None = None,
    batch_size: int = 1024,
    seed: int = 0,
) -> torch.Tensor:
    """Predictive probabilities of the BayesBiNN posterior, shape ``(N, C)``.

    ``num_samples=None``: the most probable binary network ``sign(μ)``. Otherwise the
    average of ``softmax`` over ``num_samples`` exact ``±1`` weight samples (drawn with a
    generator seeded by ``seed``). Either way the parameters hold ``sign(μ)`` afterwards.
    """
    if num_samples is not None:
        check_positive_int(num_samples, "num_samples")
    if num_samples is None:
        optimizer.load_map_()
        return predict_proba(model, x, batch_size)
    generator = torch.Generator().manual_seed(seed)
    try:
        probs = []
        for _ in range(num_samples):
            optimizer.sample_(generator)
            probs.append(predict_proba(model, x, batch_size))
    finally:
        optimizer.load_map_()
    return torch.stack(probs).mean(0)
