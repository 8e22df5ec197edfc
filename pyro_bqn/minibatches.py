"""Shuffled minibatches, shared by :func:`pyro_bqn.infer.fit` and every baseline's loop.

A minibatch of one example cannot be trained on by a network with batch norm in training
mode (the batch variance of one value is undefined, and torch raises "Expected more than 1
value per channel"). So when ``N mod B == 1`` (with ``N, B > 1``) the last example is *folded
into the minibatch before it*, which then holds ``B + 1`` examples: every example is still
used once per epoch, and no run dies at the end of its first epoch.

Usage::

    >>> import torch
    >>> [len(batch) for batch in minibatches(torch.arange(7), 3)]
    [3, 4]
    >>> num_minibatches(7, 3)
    2
"""

from __future__ import annotations

import torch

__all__ = ["minibatches", "num_minibatches"]


def num_minibatches(num_data: int, batch_size: int) -> int:
    """How many minibatches :func:`minibatches` makes of ``num_data`` examples:
    ``ceil(N / B)``, one fewer when a last minibatch of one example is folded."""
    count = -(-num_data // batch_size)
    return count - 1 if count > 1 and num_data % batch_size == 1 else count


def minibatches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split ``order`` (``(N,)``, e.g. a permutation of ``0..N-1``) into consecutive
    minibatches of ``batch_size`` indices; a last minibatch of one index is folded into the
    one before it (see the module docstring).

    :returns: :func:`num_minibatches` index tensors, together ``order`` exactly.
    """
    batches = list(order.split(batch_size))
    # With batch_size 1 every minibatch has one example: the caller asked for that.
    if len(batches) > 1 and len(batches[-1]) == 1 and batch_size > 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches
