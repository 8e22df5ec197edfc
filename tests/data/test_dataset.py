"""Tests for pyro_bqn.data.dataset: the Dataset type, stratified splits, the loader."""

from __future__ import annotations

import pytest
import torch

from pyro_bqn import data
from pyro_bqn.data import Dataset


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_bad_fractions(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"fractions must lie in \[0, 1\)"):
        data.load_wine(val_fraction=fraction)


def test_loader_is_seeded() -> None:
    ds = data.load_wine()

    def labels(loader: torch.utils.data.DataLoader) -> list[int]:
        return torch.cat([y for _, y in loader]).tolist()

    first, same = labels(ds.loader("train", 16, seed=5)), labels(ds.loader("train", 16, seed=5))
    assert first == same and first != labels(ds.loader("train", 16, seed=6))
    assert sorted(first) == sorted(ds.y_train.tolist())
    # Evaluation splits keep their order unless asked.
    assert labels(ds.loader("test", 10)) == ds.y_test.tolist()
    x, y = next(iter(ds.loader("val", batch_size=8)))
    assert x.shape == (8, 13) and x.dtype == torch.float32 and y.dtype == torch.int64
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ds.loader("dev")


def test_dataset_validates_its_fields() -> None:
    ds = data.load_wine()
    fields = {f: getattr(ds, f) for f in ds.__dataclass_fields__}
    with pytest.raises(ValueError, match=r"x_val must be float32 of shape \(N, 13\)"):
        Dataset(**{**fields, "x_val": ds.x_val.double()})
    with pytest.raises(ValueError, match=r"y_test has labels outside \[0, 3\)"):
        Dataset(**{**fields, "y_test": ds.y_test + 1})
