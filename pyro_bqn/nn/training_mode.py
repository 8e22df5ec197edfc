"""Training or evaluation mode for the duration of a block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["training_mode"]


@contextmanager
def training_mode(module: Any, mode: bool) -> Iterator[None]:
    """Put ``module`` in training (``True``) or evaluation mode for the duration, then give
    every submodule back its own flag (a model may deliberately mix modes)."""
    if not isinstance(module, torch.nn.Module):
        yield
        return
    flags = [(submodule, submodule.training) for submodule in module.modules()]
    module.train(mode)
    try:
        yield
    finally:
        for submodule, flag in flags:
            submodule.training = flag
