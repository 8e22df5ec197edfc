"""Minibatches through a DataLoader: the caller's order, refusals, and fit unchanged by
worker processes."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_bqn.data.loading import EpochBatches, TensorBatches, batch_loader
from pyro_bqn.infer import AutoQuantizedGuide, fit
from pyro_bqn.models import QuantizedMLP
from tests.infer.models import linear_classes


def test_a_fetch_is_one_whole_minibatch() -> None:
    x, y = torch.randn(10, 3), torch.arange(10)
    data = TensorBatches(x, y)
    xb, yb = data.__getitems__(torch.tensor([7, 2]))
    assert torch.equal(xb, x[[7, 2]]) and yb.tolist() == [7, 2]
    assert len(data) == 10 and torch.equal(data[4][0], x[4])


def test_bad_loaders_are_refused() -> None:
    x, y = torch.randn(4, 2), torch.arange(4)
    with pytest.raises(ValueError, match="same length"):
        TensorBatches(x, y[:3])
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        batch_loader(x, y, EpochBatches(), num_workers=-1)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        batch_loader(x, y, EpochBatches(), num_workers=True)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs x and y on the CPU"):
            batch_loader(x.cuda(), y, EpochBatches(), num_workers=1)


def test_the_loader_leaves_the_global_generator_alone() -> None:
    x, y = torch.randn(6, 2), torch.arange(6)
    batches = EpochBatches()
    batches.set([torch.tensor([0, 1])])
    torch.manual_seed(5)
    list(batch_loader(x, y, batches))
    drawn = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), drawn)


def test_fit_with_workers_trains_as_without() -> None:
    x, y = linear_classes(120, 6, 3, seed=4)
    histories, params = [], []
    for workers in (0, 1):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = QuantizedMLP((6, 10, 3))
        guide = AutoQuantizedGuide(model)
        history = fit(
            model, guide, x, y, epochs=2, batch_size=30, progress=False, num_workers=workers
        )
        histories.append([{k: v for k, v in h.items() if k != "seconds"} for h in history])
        params.append({k: v.detach().clone() for k, v in guide.named_parameters()})
    assert histories[0] == histories[1]
    for name, value in params[0].items():
        assert torch.equal(value, params[1][name]), name
