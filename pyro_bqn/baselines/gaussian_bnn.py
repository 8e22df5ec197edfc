"""A Gaussian mean-field Bayesian neural network with real-valued weights, written in Pyro.

The continuous counterpart of the Bayesian quantized network: the same MLP or CNN shape,
every weight and bias a latent variable with a Normal prior, a fully factorised Normal
posterior learned by stochastic variational inference, and a Monte Carlo predictive.

* Model (:class:`GaussianBNN`): ``flatten → [Linear → ReLU] × (L − 1) → Linear`` (the CNN
  with convolutions and max pooling in front, :mod:`pyro_bqn.architectures`), priors
  ``W_l ~ N(0, (prior_scale / sqrt(fan_in_l))²)`` element-wise and ``b_l ~ N(0, prior_scale²)``,
  likelihood ``y_n ~ Categorical(logits = f(x_n; W, b))``.
* Guide (:class:`AutoNormalAnalyticKL`): ``q(w) = N(μ_w, σ_w²)`` independently per weight.
* Objective (:func:`train_gaussian_bnn`), with ``N`` examples, minibatch ``B`` and KL weight
  ``β``::

      −ELBO ≈ −(N / B) Σ_{n ∈ B} log p(y_n | x_n, w),  w ~ q      (Monte Carlo, reparameterized)
              + β Σ_sites KL(q ‖ p)                              (closed form)

  estimated by :class:`pyro.infer.TraceMeanField_ELBO` and minimised with Adam.

There is no batch norm, unlike the other baselines' ``Linear → BatchNorm1d → activation``:
batch norm's running statistics would belong to no single weight sample, its batch
statistics would make one example's prediction depend on the others in its minibatch, and
its affine parameters would be point estimates in an otherwise Bayesian network. The
``1 / sqrt(fan_in)`` prior scaling (LeCun-style; ``prior_scale = sqrt(2)`` gives He-style)
keeps pre-activations of order one without it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_sample
from pyro.nn import PyroModule, PyroSample
from torch import nn
from tqdm.auto import tqdm

from pyro_bqn.architectures import TORCH_LAYERS, Architecture
from pyro_bqn.baselines._checks import check_data, check_positive_int
from pyro_bqn.baselines.mlp import mlp_architecture
from pyro_bqn.devices import module_device, resolve_device
from pyro_bqn.infer.scale_latents import ScaleLatentsMessenger
from pyro_bqn.minibatches import minibatches, num_minibatches

__all__ = [
    "AutoNormalAnalyticKL",
    "GaussianBNN",
    "gaussian_bnn_predict_proba",
    "train_gaussian_bnn",
]


def _bayesian(module_type: type[nn.Module], prior_scale: float):
    """A factory of ``module_type`` layers (always with a bias: there is no batch norm to
    shift the pre-activations) whose weight and bias are latent sites with the priors of
    :class:`GaussianBNN`."""

    def build(*args, bias: bool = True, **kwargs) -> nn.Module:
        layer = PyroModule[module_type](*args, bias=True, **kwargs)
        fan_in = layer.weight[0].numel()  # in_features, or in_channels * kH * kW
        scales = {"weight": prior_scale / math.sqrt(fan_in), "bias": prior_scale}
        for name, prior in (("weight", _weight_prior), ("bias", _bias_prior)):
            # The scales are a buffer, so the prior built from them follows layer.to(device).
            scale = torch.full_like(getattr(layer, name).detach(), float(scales[name]))
            setattr(layer, name, PyroSample(prior))
            layer.register_buffer(f"{name}_prior_scale", scale)
        return layer

    return build


def _normal_prior(scale: torch.Tensor) -> dist.Distribution:
    """``Normal(0, scale)`` over a whole tensor of ``scale``'s shape, on its device."""
    return dist.Normal(torch.zeros_like(scale), scale).to_event(scale.dim())


# Module-level functions (not lambdas) bound by PyroSample, so that a network pickles.
def _weight_prior(layer: nn.Module) -> dist.Distribution:
    return _normal_prior(layer.weight_prior_scale)


def _bias_prior(layer: nn.Module) -> dist.Distribution:
    return _normal_prior(layer.bias_prior_scale)


class GaussianBNN(PyroModule[nn.Sequential]):
    """A network of any :class:`~pyro_bqn.architectures.Architecture` (an MLP, or the
    LeNet-style CNN) whose weights and biases are ``PyroSample`` latent sites with Normal
    priors, and no batch norm (see the module docstring).

    Children are named as the architecture names them, without the batch norms: for an MLP
    ``flatten``, ``fc1``, ``act1``, ..., ``out`` (the names of
    :class:`~pyro_bqn.baselines.MLP` without the batch norms), so the latent sites are
    ``fc1.weight``, ``fc1.bias``, ..., ``out.weight``, ``out.bias``. Priors: weights of a
    layer with fan-in ``d`` are ``N(0, (prior_scale / sqrt(d))²)``, biases ``N(0, prior_scale²)``.

    :param sizes: layer widths ``(d_in, h_1, ..., d_out)`` of an MLP, or an
        :class:`~pyro_bqn.architectures.Architecture`.
    :param prior_scale: ``> 0``; see above.
    """

    def __init__(self, sizes: Sequence[int] | Architecture, *, prior_scale: float = 1.0) -> None:
        architecture = sizes if isinstance(sizes, Architecture) else mlp_architecture(sizes)
        ok = isinstance(prior_scale, int | float) and math.isfinite(prior_scale)
        if not (ok and prior_scale > 0):
            raise ValueError(f"prior_scale must be a positive finite number, got {prior_scale!r}")
        layers = TORCH_LAYERS.replace(
            linear=_bayesian(nn.Linear, prior_scale),
            conv=_bayesian(nn.Conv2d, prior_scale),
            batch_norm1d=lambda channels: None,
            batch_norm2d=lambda channels: None,
        )
        modules = [(n, m) for n, m in architecture.layers(layers) if m is not None]
        super().__init__(OrderedDict(modules))
        self.architecture = architecture
        self.sizes = list(architecture.sizes)
        self.prior_scale = float(prior_scale)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None
    ) -> torch.Tensor:
        """Sample the weights, compute the logits and score (or sample) the labels.

        :param x: a minibatch of inputs, shape ``(B, ...)`` (flattened to ``(B, d_in)``).
        :param y: its labels, shape ``(B,)`` (long), or ``None`` to sample them.
        :param num_data: ``N``, the size of the dataset the minibatch is drawn from; the
            likelihood is scaled by ``N / B`` so one minibatch estimates the full-data ELBO.
            Default ``B`` (the minibatch is the whole dataset).
        :returns: the logits, shape ``(B, d_out)``.
        """
        # The layers run outside the data plate: inside it, PyroSample would draw one set of
        # weights per example instead of one set shared by the whole dataset.
        logits = super().forward(x)
        batch = x.shape[0]
        if num_data is not None and num_data < batch:
            raise ValueError(f"num_data ({num_data}) is smaller than the minibatch ({batch})")
        # A user-supplied subsample of length B makes the plate scale the site by N / B; only
        # its length matters, because the model has no per-example latent variables.
        subsample = torch.arange(batch, device=x.device)
        with pyro.plate("data", size=num_data or batch, subsample=subsample):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        return logits


def _is_real(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class AutoNormalAnalyticKL(AutoNormal):
    """:class:`~pyro.infer.autoguide.AutoNormal` for real-valued global latent sites, with the
    Normal posterior at the site itself so that :class:`~pyro.infer.TraceMeanField_ELBO` uses
    the closed-form KL.

    ``AutoNormal`` samples an auxiliary ``<name>_unconstrained`` Normal and puts a ``Delta``
    at ``<name>``. Pyro's ``KL(Delta(w) ‖ p)`` is ``−log p(w)``, and the auxiliary site adds
    ``log q(w)``, so ``TraceMeanField_ELBO`` ends up with the one-sample Monte Carlo estimate
    ``log q(w) − log p(w)`` of the KL. On the real line the transform to the
    unconstrained space is the identity, so this guide samples
    ``Normal(loc, scale).to_event(event_dim)`` at ``<name>`` directly: the same
    distribution, parameters (``locs.<name>``, ``scales.<name>``), ``median`` and
    ``quantiles``, and ``KL(Normal ‖ Normal)`` is exact.

    :raises ValueError: (on first call) if a latent site has a constrained support or lies
        inside a plate; use ``AutoNormal`` for those.
    """

    def _setup_prototype(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if not _is_real(site["fn"].support):
                raise ValueError(f"site {name!r} is not real-valued; use AutoNormal")
            if site["cond_indep_stack"]:
                raise ValueError(f"site {name!r} is inside a plate; use AutoNormal")

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample every latent site from its Normal posterior; return ``{name: value}``.

        The arguments are the model's; they are used only to trace it on the first call.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result = {}
        for name, _ in self.prototype_trace.iter_stochastic_nodes():
            loc, scale = self._get_loc_and_scale(name)
            posterior = dist.Normal(loc, scale).to_event(self._event_dims[name])
            result[name] = pyro.sample(name, posterior)
        return result


def train_gaussian_bnn(
    x: torch.Tensor,
    y: torch.Tensor,
    sizes: Sequence[int] | Architecture,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-2,
    seed: int = 0,
    prior_scale: float = 1.0,
    init_scale: float = 1e-2,
    num_particles: int = 1,
    kl_weight: float = 1.0,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
    desc: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[GaussianBNN, AutoNormalAnalyticKL]:
    """Fit a :class:`GaussianBNN` to ``(x, y)`` by SVI; return ``(model, guide)``.

    Minimises ``−ELBO = −E_q[log p(y | x, w)] + β KL(q ‖ p)`` with
    :class:`~pyro.infer.TraceMeanField_ELBO` (reparameterized likelihood samples, closed-form
    KL) and ``pyro.optim.Adam``, over shuffled minibatches whose likelihood is scaled by
    ``N / B``. The guide's means start at a draw from the prior (so the network starts like a
    fan-in-scaled random initialisation rather than at the symmetric all-zero point) and its
    standard deviations at ``init_scale``, small, so the first steps see nearly deterministic
    networks and the likelihood shapes the means before the KL widens the posterior.

    Shuffling, initialisation and the ELBO's samples draw from torch's global generator,
    seeded with ``seed`` inside :func:`torch.random.fork_rng`, so a run is reproducible and
    the caller's random state is left untouched. Training runs inside
    ``pyro.get_param_store().scope()``: it neither reads nor clobbers the global param store,
    and the variational parameters stay on the returned guide (a ``PyroModule``).

    :param x: inputs, shape ``(N, ...)`` with ``prod(...) == sizes[0]``.
    :param y: class labels in ``[0, sizes[-1])``, shape ``(N,)``, dtype ``torch.long``.
    :param sizes: layer widths ``(d_in, h_1, ..., d_out)``, or an
        :class:`~pyro_bqn.architectures.Architecture` (e.g. the CNN).
    :param epochs: passes over the data.
    :param batch_size: minibatch size ``B``; the last minibatch may be smaller (one of a
        single example is folded into the one before, see :mod:`pyro_bqn.minibatches`).
    :param lr: Adam's learning rate.
    :param seed: seed for initialisation, shuffling and the ELBO's samples.
    :param prior_scale: see :class:`GaussianBNN`.
    :param init_scale: initial posterior standard deviation of every weight and bias.
    :param num_particles: weight samples per ELBO estimate (drawn one after another).
    :param kl_weight: ``β >= 0`` on the KL term; ``1`` is the true ELBO, ``β < 1`` a
        tempered posterior.
    :param callback: called as ``callback(epoch, mean_loss)`` after every epoch, where
        ``mean_loss`` is the mean over the epoch's minibatches of the ``−ELBO`` estimate
        divided by ``N`` (nats per training example).
    :param progress: show a tqdm bar with the running mean loss of the epoch.
    :param desc: label of the progress bar.
    :param device: where to train (:func:`pyro_bqn.devices.resolve_device`); minibatches
        move there; default: the device of ``x``.
    """
    check_data(x, y)
    target = x.device if device is None else resolve_device(device)
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    check_positive_int(num_particles, "num_particles")
    if not (isinstance(kl_weight, int | float) and math.isfinite(kl_weight) and kl_weight >= 0):
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")

    num_data = x.shape[0]
    num_batches = num_minibatches(num_data, batch_size)
    with (
        torch.random.fork_rng(devices=[target] if target.type == "cuda" else []),
        pyro.get_param_store().scope(),
        tqdm(total=epochs * num_batches, desc=desc, disable=not progress, leave=False) as bar,
    ):
        torch.manual_seed(seed)
        model = GaussianBNN(sizes, prior_scale=prior_scale).to(target)
        guide = AutoNormalAnalyticKL(model, init_loc_fn=init_to_sample, init_scale=init_scale)
        scale_kl = ScaleLatentsMessenger(kl_weight)
        svi = SVI(
            scale_kl(model),
            scale_kl(guide),
            pyro.optim.Adam({"lr": lr}),
            TraceMeanField_ELBO(num_particles=num_particles, max_plate_nesting=1),
        )
        for epoch in range(epochs):
            total = 0.0
            for i, index in enumerate(minibatches(torch.randperm(num_data), batch_size), 1):
                xb, yb = x[index].to(target), y[index].to(target)
                total += svi.step(xb, yb, num_data=num_data) / num_data
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{total / i:.4f}", refresh=False)
            if callback is not None:
                callback(epoch, total / num_batches)
    return model, guide


@torch.no_grad()
def gaussian_bnn_predict_proba(
    model: GaussianBNN,
    guide: AutoNormalAnalyticKL,
    x: torch.Tensor,
    *,
    num_samples: int = 50,
    batch_size: int = 1024,
    seed: int = 0,
) -> torch.Tensor:
    """Monte Carlo predictive ``p(y | x) ≈ (1/S) Σ_s softmax(f(x; w_s))``, ``w_s ~ q``, shape
    ``(N, C)``.

    Probabilities (not logits) are averaged. Each weight sample is drawn once and applied to
    every minibatch of ``batch_size`` inputs, so the result does not depend on
    ``batch_size``. Samples come from a generator seeded with ``seed`` inside
    :func:`torch.random.fork_rng`, and the guide runs inside a fresh
    ``pyro.get_param_store().scope()``, so it uses its own parameters whatever the global
    param store holds, and leaves both untouched.

    :param x: inputs, shape ``(N, ...)``.
    :param num_samples: ``S``, weight samples from the guide.
    """
    check_positive_int(num_samples, "num_samples")
    check_positive_int(batch_size, "batch_size")
    device = module_device(guide) or x.device
    x = x.to(device)
    total = torch.zeros((), device=device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        for _ in range(num_samples):
            weights = poutine.trace(guide).get_trace(x)
            network = poutine.replay(model, trace=weights)
            total = total + torch.cat(
                [F.softmax(network(xb), dim=-1) for xb in x.split(batch_size)]
            )
    return total / num_samples
