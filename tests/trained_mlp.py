"""A small QuantizedMLP trained for a few SVI steps, shared by the export, checkpoint and
batch-norm re-estimation tests."""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
from pyro.infer import SVI

from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO
from pyro_bqn.levels import LevelSet
from pyro_bqn.models import QuantizedMLP
from tests.infer.models import linear_classes

SIZES = (16, 8, 3)


@dataclass
class Trained:
    model: QuantizedMLP
    guide: AutoQuantizedGuide
    optimizer: pyro.optim.PyroOptim
    svi: SVI
    x: torch.Tensor
    y: torch.Tensor


def new_optimizer() -> pyro.optim.PyroOptim:
    # ClippedAdam's learning-rate decay lives in the optimiser state, so checkpoints must keep it.
    return pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})


def trained_mlp(
    levels: LevelSet | None = None, sizes=SIZES, steps: int = 3, seed: int = 0, n: int = 48
) -> Trained:
    """Seeded model, guide and optimiser after ``steps`` DeterministicELBO steps on ``n``
    synthetic points."""
    pyro.set_rng_seed(seed)
    x, y = linear_classes(n, sizes[0], sizes[-1], seed=1)
    model = QuantizedMLP(sizes, levels=levels)
    guide = AutoQuantizedGuide(model)
    optimizer = new_optimizer()
    svi = SVI(model, guide, optimizer, DeterministicELBO())
    for _ in range(steps):
        svi.step(x, y)
    return Trained(model, guide, optimizer, svi, x, y)
