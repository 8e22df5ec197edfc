"""E-QNN: a bootstrap ensemble of straight-through-estimator quantized networks, of any
:class:`~pyro_bqn.architectures.Architecture` (the BQN paper's ensemble-of-QNNs baseline).

Usage::

    >>> import torch
    >>> from pyro_bqn.architectures import Architecture
    >>> x, y = torch.randn(40, 784), torch.randint(10, (40,))
    >>> arch = Architecture("cnn", (1, 28, 28), 10, (4, 8, 16))
    >>> ensemble = fit_ensemble(x, y, arch, num_members=2, epochs=1, batch_size=20,
    ...                         progress=False)
    >>> ensemble(x).shape
    torch.Size([40, 10])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pyro_bqn.architectures import Architecture
from pyro_bqn.baselines._checks import check_data, check_positive_int
from pyro_bqn.baselines.mlp import mlp_architecture
from pyro_bqn.baselines.ste import LevelsLike, ste_network, train_ste
from pyro_bqn.baselines.training import predict_proba

__all__ = ["QuantizedEnsemble", "fit_ensemble"]


class QuantizedEnsemble(nn.Module):
    """An ensemble whose predictive is the average of its members' probabilities.

    ``forward(x)`` returns ``log( (1/M) Σ_m softmax(f_m(x)) )``, shape ``(N, C)``: these are
    valid logits, because ``softmax`` of the log of a probability vector is that vector, so
    :func:`~pyro_bqn.baselines.predict_proba` of the ensemble is the probability average.

    :param members: the ``M >= 1`` member networks, each mapping ``(N, ...)`` to ``(N, C)``.

    Usage::

        >>> import torch
        >>> from pyro_bqn.baselines.ste import ste_mlp
        >>> ensemble = QuantizedEnsemble([ste_mlp([4, 8, 3]).eval() for _ in range(3)])
        >>> ensemble(torch.randn(5, 4)).exp().sum(-1).allclose(torch.ones(5))
        True
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("members must hold at least one network")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([member(x).log_softmax(dim=-1) for member in self.members])
        # log-mean-exp over members, stable where some member is very confident.
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))

    def member_proba(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Every member's probabilities in eval mode, shape ``(M, N, C)``."""
        return torch.stack([predict_proba(m, x, batch_size) for m in self.members])


def fit_ensemble(
    x: torch.Tensor,
    y: torch.Tensor,
    architecture: Architecture | Sequence[int],
    levels: LevelsLike | None = None,
    *,
    num_members: int = 5,
    seed: int = 0,
    bootstrap: bool = True,
    learn_output_scale: bool = True,
    **train_kwargs: Any,
) -> QuantizedEnsemble:
    """Train E-QNN: ``num_members`` STE networks, each on its own bootstrap resample.

    Member ``m`` uses seed ``seed + m`` for its initial weights, its resample (``N`` indices
    drawn with replacement) and its training run, so members differ in all three.

    :param x: inputs ``(N, ...)``; ``y``: labels ``(N,)``.
    :param architecture: the members' shape, an
        :class:`~pyro_bqn.architectures.Architecture` or the widths of an MLP
        ``(d_in, h_1, ..., d_out)``; each member is
        :func:`~pyro_bqn.baselines.ste_network` of it.
    :param levels: weight levels, see :func:`~pyro_bqn.baselines.ste_network`.
    :param num_members: ensemble size ``M``.
    :param bootstrap: resample the training set per member (``False``: every member sees
        all the data and differs only by seed).
    :param learn_output_scale: each member learns its logit scale (default) or keeps the
        initial ``1 / sqrt(fan_in)`` (see :func:`~pyro_bqn.baselines.ste_network`).
    :param train_kwargs: passed to :func:`~pyro_bqn.baselines.train_ste` (``epochs``,
        ``batch_size``, ``lr``, ``lr_schedule``, ``progress``, ...).
    """
    check_data(x, y)
    check_positive_int(num_members, "num_members")
    if not isinstance(architecture, Architecture):
        architecture = mlp_architecture(architecture)
    members = []
    for m in range(num_members):
        member_seed = seed + m
        generator = torch.Generator().manual_seed(member_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed)
            member = ste_network(architecture, levels, learn_output_scale=learn_output_scale)
        if bootstrap:
            index = torch.randint(x.shape[0], (x.shape[0],), generator=generator)
            xm, ym = x[index], y[index]
        else:
            xm, ym = x, y
        kwargs = {"desc": f"E-QNN member {m + 1}/{num_members}", **train_kwargs}
        train_ste(member, xm, ym, seed=member_seed, **kwargs)
        members.append(member)
    return QuantizedEnsemble(members)
