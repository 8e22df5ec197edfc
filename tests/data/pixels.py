"""Pixel-level views of a dataset's images, for exact comparisons."""

from __future__ import annotations

import numpy as np
import torch

from pyro_bqn.data import Dataset


def raw_pixels(ds: Dataset, x: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of 8-bit images, back to exact uint8 pixel values."""
    return np.rint(ds.denormalize(x).numpy() / ds.raw_scale).astype(np.uint8)


def row_set(rows: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in rows}
