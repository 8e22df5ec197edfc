"""The one minibatch training loop and the predictive helper every baseline uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pyro_bqn.baselines._checks import check_data, check_positive_int
from pyro_bqn.devices import module_device, resolve_device
from pyro_bqn.minibatches import minibatches, num_minibatches

__all__ = ["train", "predict_proba"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _step(
    model: nn.Module,
    xb: torch.Tensor,
    yb: torch.Tensor,
    optimizers: list[torch.optim.Optimizer],
    loss_fn: LossFn,
) -> float:
    """One minibatch update (see :func:`train`); returns the loss the first optimizer reports."""

    def closure() -> torch.Tensor:
        model.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        return loss

    loss = optimizers[0].step(closure)
    for other in optimizers[1:]:
        other.step()
    return loss.item()


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
    after_step: Callable[[], None] | None = None,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
    desc: str | None = None,
    device: str | torch.device | None = None,
) -> list[float]:
    """Train ``model`` on ``(x, y)`` with shuffled minibatches; return the mean loss per epoch.

    Each minibatch builds a closure ``zero_grad → loss_fn(model(xb), yb) → backward`` and
    calls ``optimizers[0].step(closure)``: the first optimizer evaluates the closure as often
    as it needs (once for Adam, once per Monte Carlo sample for
    :class:`~pyro_bqn.baselines.BayesBiNN`). The other optimizers then step on the
    gradients the last evaluation left. ``after_step`` runs after every minibatch (the
    straight-through estimator clips its latent weights there).

    Shuffling and any randomness inside the optimizers draw from torch's global generator,
    seeded with ``seed`` inside :func:`torch.random.fork_rng`, so a run is reproducible and the
    caller's random state is left untouched. A final minibatch of one example is folded into
    the one before, because batch norm cannot normalise a single example
    (:mod:`pyro_bqn.minibatches`).

    :param model: network mapping ``x`` of shape ``(B, ...)`` to logits ``(B, C)``.
    :param x: inputs, shape ``(N, ...)``.
    :param y: class labels in ``[0, C)``, shape ``(N,)``, dtype ``torch.long``.
    :param epochs: passes over the data.
    :param batch_size: minibatch size ``B``.
    :param optimizer: an optimizer or a sequence of them; default Adam over all of
        ``model.parameters()`` with learning rate ``lr``.
    :param lr: learning rate of the default Adam (ignored when ``optimizer`` is given).
    :param seed: seed for shuffling and optimizer noise.
    :param loss_fn: mean minibatch loss ``loss_fn(logits, labels)``; default cross-entropy.
    :param after_step: called with no arguments after every optimizer step.
    :param callback: called as ``callback(epoch, mean_loss)`` after every epoch.
    :param progress: show a tqdm bar with the running mean loss of the epoch.
    :param desc: label of the progress bar.
    :param device: where to train (:func:`pyro_bqn.devices.resolve_device`): the model moves
        there (its parameters keep their identity, so optimizers built on them still hold
        them) and so does each minibatch; default: where the model is.
    :returns: the mean minibatch loss of every epoch, length ``epochs``.
    """
    check_data(x, y)
    if device is not None:
        model.to(resolve_device(device))
    target = module_device(model) or x.device
    check_positive_int(epochs, "epochs")
    check_positive_int(batch_size, "batch_size")
    if optimizer is None:
        optimizers = [torch.optim.Adam(model.parameters(), lr=lr)]
    elif isinstance(optimizer, torch.optim.Optimizer):
        optimizers = [optimizer]
    else:
        optimizers = list(optimizer)
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise ValueError("optimizer must be an Optimizer or a non-empty sequence of them")

    num_examples = x.shape[0]
    num_batches = num_minibatches(num_examples, batch_size)
    history: list[float] = []
    was_training = model.training
    model.train()
    try:
        with (
            torch.random.fork_rng(devices=[target] if target.type == "cuda" else []),
            tqdm(total=epochs * num_batches, desc=desc, disable=not progress, leave=False) as bar,
        ):
            torch.manual_seed(seed)
            for epoch in range(epochs):
                batches = minibatches(torch.randperm(num_examples), batch_size)
                total = 0.0
                for i, index in enumerate(batches, 1):
                    xb, yb = x[index].to(target), y[index].to(target)
                    total += _step(model, xb, yb, optimizers, loss_fn)
                    if after_step is not None:
                        after_step()
                    bar.update()
                    bar.set_postfix(epoch=epoch, loss=f"{total / i:.4f}", refresh=False)
                history.append(total / num_batches)
                if callback is not None:
                    callback(epoch, history[-1])
    finally:
        model.train(was_training)
    return history


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities ``softmax(model(x))`` in eval mode, shape ``(N, C)``.

    Runs in minibatches of ``batch_size`` without gradients, with batch norm using its
    running statistics; the model's train/eval mode is restored afterwards.

    :param x: inputs, shape ``(N, ...)``; each minibatch moves to the model's device, where
        the probabilities are returned.
    """
    check_positive_int(batch_size, "batch_size")
    target = module_device(model) or x.device
    was_training = model.training
    model.eval()
    try:
        probs = [F.softmax(model(xb.to(target)), dim=-1) for xb in x.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(probs)
