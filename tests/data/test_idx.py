"""Tests for pyro_bqn.data.idx: the IDX reader and load_idx."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_bqn.data import load_idx, read_idx
from tests.data.idx_files import idx_bytes, write_idx_dir
from tests.data.pixels import raw_pixels


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx(tmp_path: Path, compress: bool) -> None:
    arrays = write_idx_dir(tmp_path, compress=compress, size=(6, 5))
    ds = load_idx(tmp_path, kind="kmnist")
    assert ds.name == "kmnist" and ds.input_shape == (1, 6, 5) and ds.num_classes == 10
    assert ds.x_train.shape == (40, 30) and ds.x_test.shape == (20, 30)
    # The official split is kept in file order.
    assert np.array_equal(
        raw_pixels(ds, ds.x_train), arrays["train-images-idx3-ubyte"].reshape(40, -1)
    )
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    raw = arrays["train-images-idx3-ubyte"] / 255.0
    assert ds.mean.item() == pytest.approx(raw.mean(), rel=1e-5)
    assert ds.std.item() == pytest.approx(raw.std(), rel=1e-5)


def test_load_idx_validation_split(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    a = load_idx(tmp_path, val_fraction=0.5, seed=0)
    b = load_idx(tmp_path, val_fraction=0.5, seed=1)
    assert len(a.y_train) == len(a.y_val) == 20
    assert torch.bincount(a.y_val).tolist() == [2] * 10
    assert not torch.equal(a.y_val, b.y_val)


@pytest.mark.parametrize(
    ("dtype", "code"),
    [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)],
)
def test_read_idx_dtypes(tmp_path: Path, dtype: type, code: int) -> None:
    array = (np.arange(24) - 5).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(array, code))
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, array)


def test_load_idx_accepts_dotted_names(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    for path in tmp_path.iterdir():
        path.rename(tmp_path / path.name.replace("-idx", ".idx"))
    assert load_idx(tmp_path).x_train.shape == (40, 36)


def test_load_idx_missing_file(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    expected = re.escape(f"t10k-labels-idx1-ubyte[.gz] not found in {tmp_path}")
    with pytest.raises(FileNotFoundError, match=expected + ".*train-images-idx3-ubyte"):
        load_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_idx(tmp_path / "nowhere")


def test_load_idx_wrong_magic(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: bad IDX magic number 0x1234"):
        load_idx(tmp_path)


def test_load_idx_labels_file_in_place_of_images(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    labels = (tmp_path / "t10k-labels-idx1-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(labels)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: expected unsigned-byte images"):
        load_idx(tmp_path)


def test_load_idx_truncated(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated or corrupted.*1433"):
        load_idx(tmp_path)
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="truncated IDX header"):
        load_idx(tmp_path)


def test_load_idx_corrupted_gzip(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, compress=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: corrupted or truncated"):
        load_idx(tmp_path)


def test_load_idx_count_mismatch(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(39, np.uint8), 0x08))
    with pytest.raises(ValueError, match="holds 40 images but .*train-labels-idx1-ubyte 39 labels"):
        load_idx(tmp_path)


def test_load_idx_labels_out_of_range(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    bad = np.full(20, 10, np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(bad, 0x08))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: labels must lie in 0..9"):
        load_idx(tmp_path)


def test_load_idx_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown IDX kind 'cifar'"):
        load_idx(tmp_path, kind="cifar")
