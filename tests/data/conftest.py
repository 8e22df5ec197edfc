"""Fixtures shared by the data tests."""

from __future__ import annotations

import pytest

from pyro_bqn.data import Dataset, load_mnist_subset


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_mnist_subset()
