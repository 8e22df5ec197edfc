"""Binarized Neural Networks (Hubara, Courbariaux, Soudry, El-Yaniv & Bengio, "Binarized
Neural Networks", NeurIPS 2016; the longer "Quantized Neural Networks", JMLR 2018).

Weights *and* hidden activations are ``±1`` in the forward pass, trained with the
straight-through estimator (:mod:`pyro_bqn.baselines.ste`). The paper's essentials, all
here:

* **binary weights** ``W_b = sign(W)`` of real latent weights ``W``, in every linear and
  convolution layer (the first and the last included), whose gradient passes straight
  through: ``∂ℓ/∂W = ∂ℓ/∂W_b`` (zeroed outside ``[-1, 1]``);
* **latent-weight clipping**: ``W ← clip(W − η ∂ℓ/∂W, −1, 1)`` after every step, so a latent
  weight never strays far from the threshold it must cross to flip;
* **binary activations** ``sign(a)`` after batch norm, with the hardtanh straight-through
  gradient ``1{|a| <= 1}`` (the input of the first layer stays real);
* **batch norm** before every activation;
* **Adam with an exponentially decaying learning rate**, ``η_e = η · f^(e / E)`` in epoch
  ``e`` of ``E`` (the paper's MNIST run decays ``3e-3`` to ``3e-7``), and BinaryConnect's
  per-layer Glorot learning-rate scale :func:`~pyro_bqn.baselines.ste.glorot_lr_scale`
  that the authors' code applies to every binary layer.

Where this departs from the paper: the loss is the cross-entropy rather than the squared
hinge loss (so that the row's NLL is that of a softmax predictive, as every other row's),
the logits go through the learned scalar :class:`~pyro_bqn.baselines.mlp.LogitScale` of the
other quantized networks rather than a last batch norm, and there is no dropout.

The network is :func:`~pyro_bqn.baselines.ste.ste_network` with binary levels; the
difference from the ``ste`` row (:func:`~pyro_bqn.baselines.train_ste`, ternary weights, a
constant learning rate) is the level set and this schedule.

Usage::

    >>> import torch
    >>> from pyro_bqn.architectures import Architecture
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(64, 784), torch.randint(10, (64,))
    >>> net = binarized_network(Architecture("cnn", (1, 28, 28), 10, (4, 8, 16)))
    >>> history = train_binarized(net, x, y, epochs=1, batch_size=32, progress=False)
    >>> net(x).shape
    torch.Size([64, 10])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pyro_bqn.architectures import Architecture
from pyro_bqn.baselines.mlp import Network, mlp_architecture
from pyro_bqn.baselines.ste import ste_network, train_ste

__all__ = ["binarized_mlp", "binarized_network", "train_binarized"]


def binarized_network(
    architecture: Architecture,
    *,
    output_scale: float | None = None,
    learn_output_scale: bool = True,
) -> Network:
    """The binarized network of ``architecture``: every linear and convolution layer binary
    (:class:`~pyro_bqn.baselines.STELinear`, :class:`~pyro_bqn.baselines.STEConv2d` on
    ``{-1, 1}``), batch norm and ``sign`` activations, then a logit scale (default
    ``1 / sqrt(fan_in)`` of the output layer). Input ``(N, ...)``, output logits
    ``(N, num_classes)``."""
    return ste_network(
        architecture, None, output_scale=output_scale, learn_output_scale=learn_output_scale
    )


def binarized_mlp(sizes: Sequence[int], **kwargs: Any) -> Network:
    """:func:`binarized_network` of the MLP of widths ``(d_in, h_1, ..., d_out)``."""
    return binarized_network(mlp_architecture(sizes), **kwargs)


def train_binarized(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float = 1e-2,
    final_lr_fraction: float = 1e-2,
    glorot_scale: bool = True,
    **train_kwargs: Any,
) -> list[float]:
    """Train a binarized network as the paper does: Adam with the latent weights clipped to
    ``[-1, 1]`` after every step, the learning rate decayed per epoch from ``lr`` to
    ``lr * final_lr_fraction`` (``"exponential"`` in
    :func:`~pyro_bqn.baselines.ste.train_with_lr_schedule`), and each binary layer's rate
    multiplied by its Glorot scale (``glorot_scale``).

    The defaults were chosen on a validation split of the MNIST subset (784-512-256-10,
    12 epochs, batch 100; ``docs/benchmarks.md``): ``lr = 1e-2`` decayed to ``1e-4``. The
    paper's MNIST run starts at ``3e-3`` and decays to ``3e-7`` over 1,000 epochs.

    :param train_kwargs: passed on to :func:`~pyro_bqn.baselines.train` (``epochs``,
        ``batch_size``, ``seed``, ``callback``, ...).
    :returns: the mean loss of every epoch.
    """
    return train_ste(
        model,
        x,
        y,
        lr=lr,
        lr_schedule="exponential",
        final_lr_fraction=final_lr_fraction,
        glorot_scale=glorot_scale,
        **train_kwargs,
    )
