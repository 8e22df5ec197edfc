"""IDX files written by hand, independently of the reader under test."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """Encode ``array`` in IDX by hand, independently of the reader under test."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx_dir(
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
        payload = idx_bytes(array, 0x08)
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)
    return arrays


#: The size of MNIST, Fashion-MNIST and KMNIST: 60,000 training and 10,000 test images.
FULL_SIZE = {"n_train": 60_000, "n_test": 10_000, "size": (28, 28)}


def write_full_size_idx_dir(directory: Path) -> dict[str, np.ndarray]:
    """Write an IDX set the size of MNIST (60,000 + 10,000 random 28 x 28 images, 55 MB)."""
    return write_idx_dir(directory, **FULL_SIZE)
