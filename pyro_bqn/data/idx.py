"""MNIST, Fashion-MNIST and KMNIST from the user's IDX files (the format MNIST ships in)."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

from pyro_bqn.data.dataset import DIGIT_NAMES, Dataset, build_dataset, carve_validation

__all__ = ["IDX_KINDS", "load_idx", "read_idx"]

#: The ``kind`` values :func:`load_idx` accepts; all share MNIST's file names and format.
IDX_KINDS: tuple[str, ...] = ("mnist", "fashion-mnist", "kmnist")

_IDX_CLASS_NAMES = {
    "mnist": DIGIT_NAMES,
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
    train_idx, val_idx = carve_validation(
        y_train, np.arange(len(y_train)), val_fraction, np.random.default_rng(seed)
    )
    return build_dataset(
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
