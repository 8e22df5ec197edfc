"""Batch-norm running statistics for one fixed network."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from pyro import poutine
from torch.nn.modules.batchnorm import _BatchNorm

from pyro_bqn.checked_condition import CheckedConditionMessenger
from pyro_bqn.live_tensors import buffers_of, copy_into
from pyro_bqn.nn.training_mode import training_mode

__all__ = ["reestimate_batch_norm"]


@torch.no_grad()
def reestimate_batch_norm(
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    batch_size: int = 256,
) -> None:
    """Replace every batch norm's running statistics in ``model`` by those of the network
    ``weights`` on the inputs ``x``.

    Running statistics gathered while training in moment mode describe the moment network;
    a sampled or most-probable network has different activations and needs its own. This
    resets the running statistics of every batch norm (``torch.nn`` ``_BatchNorm`` subclass
    with ``track_running_stats``), sets ``momentum=None`` (a cumulative average), runs
    ``model(batch)`` conditioned on ``weights`` in training mode without gradients over
    ``x`` split into ``ceil(N / batch_size)`` batches whose sizes differ by at most one
    (fewer, if that would leave a batch of one example, which training-mode batch norm
    refuses), and then gives every module back its momentum and training flag.

    The result, as with :func:`torch.optim.swa_utils.update_bn`: ``running_mean`` is the
    mean over the batches of the batch means and ``running_var`` that of the unbiased batch
    variances (with one batch, ``batch_size >= N``, exactly the mean and unbiased variance
    of the batch norm's inputs over ``x``). A later batch norm sees an earlier one's output
    normalised by the batch's statistics, as in training.

    The model's other state (parameters, other buffers, the caller's random stream) is
    untouched; on error the running statistics are restored as they were.

    :param model: a model called as ``model(x_batch)``, e.g. a
        :class:`~pyro_bqn.models.QuantizedMLP`.
    :param weights: a value for every latent site, ``{site name: tensor}`` (e.g.
        ``guide.median()`` or one network drawn from the guide).
    :param x: inputs, ``(N, ...)`` with ``N >= 2``.
    :param batch_size: examples per pass (one more where that avoids a batch of one).
    :raises ValueError: if ``weights`` does not fit the model (naming the site), or for
        ``N < 2`` or ``batch_size < 2`` (training-mode batch norm needs two values per
        channel).
    """
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    if x.dim() == 0 or x.shape[0] < 2:
        raise ValueError(f"x must hold at least two examples, got shape {tuple(x.shape)}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return
    conditioned = CheckedConditionMessenger(weights)(model)
    buffers = buffers_of(model)
    backup = {name: buffer.clone() for name, buffer in buffers.items()}
    momenta = [norm.momentum for norm in norms]
    num_batches = min(math.ceil(x.shape[0] / batch_size), x.shape[0] // 2)
    # The unobserved likelihood site draws a sample each pass: fork the generator so the
    # caller's random stream does not depend on whether statistics were re-estimated.
    with training_mode(model, True), poutine.block(), torch.random.fork_rng(devices=[]):
        try:
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None
            for batch in x.tensor_split(num_batches):
                conditioned(batch)
        except BaseException:
            copy_into(buffers, backup)
            raise
        finally:
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
