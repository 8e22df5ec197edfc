"""Minibatches of in-memory tensors through a :class:`~torch.utils.data.DataLoader`, with
optional worker processes, without copying the data set.

:class:`TensorBatches` hands out a whole minibatch per fetch (``x[idx], y[idx]``, one
indexing operation, not ``B`` single examples stacked), and :func:`batch_loader` serves the
minibatches a caller chooses (e.g. :func:`pyro_bqn.infer.fit`'s seeded, sharded epochs)
in that order. Workers index the parent's tensors: forked workers share their memory
copy-on-write, and spawned ones receive them through shared memory
(:mod:`torch.multiprocessing`), so no process holds a second float copy of the data.
Workers help when the main process is busy with the model and the batches must also be
pinned for a GPU (``pin_memory``); for the CPU the default ``num_workers=0`` is fastest.

Usage::

    >>> import torch
    >>> x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    >>> batches = EpochBatches()
    >>> loader = batch_loader(x, y, batches)
    >>> batches.set([torch.tensor([4, 1]), torch.tensor([0, 5, 2])])
    >>> [yb.tolist() for _, yb in loader]
    [[4, 1], [0, 5, 2]]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader

__all__ = ["EpochBatches", "TensorBatches", "batch_loader"]


class TensorBatches(torch.utils.data.Dataset):
    """A map-style dataset of ``(x, y)`` whose fetch takes a whole minibatch of indices.

    :param x: inputs ``(N, ...)``.
    :param y: labels ``(N, ...)``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}"
            )
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    def __getitems__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x[indices], y[indices])``: ``(B, ...)`` and ``(B, ...)``."""
        index = torch.as_tensor(indices, device=self.x.device)
        return self.x[index], self.y[index]


class EpochBatches:
    """The batch sampler of :func:`batch_loader`: it yields the minibatches (index tensors)
    last given to :meth:`set`, so the caller draws each epoch's order itself."""

    def __init__(self) -> None:
        self._batches: list[torch.Tensor] = []

    def set(self, batches: Sequence[torch.Tensor]) -> None:
        """The minibatches of the next pass over the loader."""
        self._batches = list(batches)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def _whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # TensorBatches.__getitems__ already returns the batch: nothing to collate.
    return batch


def batch_loader(
    x: torch.Tensor,
    y: torch.Tensor,
    batches: EpochBatches,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over ``(x, y)`` that yields ``(x[idx],
    y[idx])`` for each ``idx`` of ``batches``, in order.

    :param num_workers: worker processes that index the batches ahead of the training loop
        (``0``: the calling process); they persist across epochs. Tensors on a GPU need
        ``num_workers=0``.
    :param pin_memory: pin the batches in page-locked memory for fast copies to a GPU.
    :raises ValueError: for a negative ``num_workers``, or workers over tensors that are not
        on the CPU.
    """
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if num_workers and (x.device.type != "cpu" or y.device.type != "cpu"):
        raise ValueError(
            f"num_workers={num_workers} needs x and y on the CPU, got {x.device} and {y.device}: "
            "keep the data set on the CPU (batches move to the device), or use num_workers=0"
        )
    return DataLoader(
        TensorBatches(x, y),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_whole_batch,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # Its own generator: a loader without one draws its workers' base seed from torch's
        # global generator at every epoch, which would shift the caller's random stream.
        generator=torch.Generator(),
    )
