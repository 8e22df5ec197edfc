"""The full-precision baseline: the same MLP shape with float weights and ReLU."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pyro_bqn.baselines.mlp import MLP

__all__ = ["float_mlp"]


def float_mlp(sizes: Sequence[int]) -> MLP:
    """A float network ``Linear → BatchNorm1d → ReLU`` per hidden layer, then ``Linear``.

    :param sizes: layer widths ``(d_in, h_1, ..., d_out)``; input ``(N, d_in)``, output
        logits ``(N, d_out)``. Float weights can scale the logits themselves, so there is
        no output scale.
    """
    return MLP(sizes, linear=nn.Linear, activation=nn.ReLU, output_scale=None)
