"""A minibatch SVI loop with progress and per-epoch metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pyro
import torch
from pyro.infer import ELBO, SVI
from tqdm.auto import tqdm

from pyro_bqn.infer.deterministic_elbo import DeterministicELBO

__all__ = ["fit"]


def _current_lr(optim: pyro.optim.PyroLRScheduler, initial: float) -> float:
    """The learning rate the schedulers hold now (``initial`` before any parameter exists)."""
    for scheduler in optim.optim_objs.values():
        return scheduler.get_last_lr()[0]
    return initial


def fit(
    model,
    guide,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 0.1,
    final_lr_fraction: float = 0.1,
    elbo: ELBO | None = None,
    kl_weight: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train ``model``/``guide`` with :class:`pyro.infer.SVI` on minibatches of ``(x, y)``.

    The model is called as ``model(x_batch, y_batch, num_data=N)`` so its likelihood is
    scaled to the whole data set. The optimiser is torch's fused Adam with gradients clipped
    elementwise to ``[-10, 10]`` (what :class:`pyro.optim.ClippedAdam` does, several times
    faster on the guide's millions of logits) and the learning rate decayed geometrically,
    step by step, from ``lr`` to ``lr * final_lr_fraction`` over the run.
    The default ``lr = 0.1`` suits the guide's logits: on the MNIST subset a 784-512-256-10
    ternary network reached test NLL 0.19 with it against 0.33 with ``1e-2`` (12 epochs).

    :param x: inputs, ``(N, ...)``.
    :param y: labels, ``(N,)``.
    :param elbo: the objective; default ``DeterministicELBO(kl_weight)`` (sampling-free).
        Pass e.g. ``pyro.infer.Trace_ELBO(num_particles=S)`` for the sampling baseline.
    :param callback: called after each epoch with ``(epoch, metrics)``.
    :return: per-epoch metrics: ``loss`` (per data point), ``seconds``, ``lr`` (the learning
        rate at the end of the epoch) and, with :class:`DeterministicELBO`,
        ``expected_log_likelihood`` and ``kl`` per data point.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0 or not 0 < final_lr_fraction <= 1:
        raise ValueError(
            f"need lr > 0 and 0 < final_lr_fraction <= 1, got lr={lr}, "
            f"final_lr_fraction={final_lr_fraction}"
        )
    elbo = elbo if elbo is not None else DeterministicELBO(kl_weight=kl_weight)
    num_data = x.shape[0]
    steps_per_epoch = math.ceil(num_data / batch_size)
    decay = final_lr_fraction ** (1.0 / max(1, epochs * steps_per_epoch))
    optim = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": lr, "fused": True}, "gamma": decay},
        clip_args={"clip_value": 10.0},
    )
    svi = SVI(model, guide, optim, elbo)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc="fit", disable=not progress, unit="epoch")
    for epoch in bar:
        start = time.perf_counter()
        totals: dict[str, float] = {}
        order = torch.randperm(num_data, generator=generator)
        for begin in range(0, num_data, batch_size):
            idx = order[begin : begin + batch_size]
            loss = svi.step(x[idx], y[idx], num_data=num_data)
            optim.step()
            totals["loss"] = totals.get("loss", 0.0) + loss
            for key in ("expected_log_likelihood", "kl"):
                if key in getattr(elbo, "last_terms", {}):
                    totals[key] = totals.get(key, 0.0) + elbo.last_terms[key]
        metrics = {key: value / (steps_per_epoch * num_data) for key, value in totals.items()}
        metrics["epoch"] = epoch + 1
        metrics["seconds"] = time.perf_counter() - start
        metrics["lr"] = _current_lr(optim, lr)
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if callback is not None:
            callback(epoch + 1, metrics)
    return history
