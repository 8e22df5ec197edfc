"""Checks that saved values (a checkpoint, an exported network) fit a live model before
anything is copied into it: same entries, shapes and dtypes, and the same fixed levels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pyro_bqn.levels import LearnableLevels, LevelSet

__all__ = ["check_fixed_levels", "check_matching", "fixed_levels"]


def check_matching(
    live: Mapping[str, torch.Tensor],
    saved: Mapping[str, torch.Tensor],
    kind: str,
    source: str,
    allow_extra: bool = False,
) -> None:
    """Refuse ``saved`` unless it has every entry of ``live`` with the same shape and dtype
    (and, unless ``allow_extra``, no other entry).

    :param kind: what the entries are (``"parameter"``, ``"buffer"``), for the message.
    :param source: where ``saved`` comes from (a path, ``"the network"``), for the message.
    :raises ValueError: naming the first entry that differs.
    """
    missing = [name for name in live if name not in saved]
    if missing:
        raise ValueError(f"{kind} '{missing[0]}' of the model or guide is missing from {source}")
    extra = [name for name in saved if name not in live]
    if extra and not allow_extra:
        raise ValueError(f"{kind} '{extra[0]}' of {source} is not in the model or guide")
    for name, tensor in live.items():
        value = saved[name]
        if value.shape != tensor.shape or value.dtype != tensor.dtype:
            raise ValueError(
                f"{kind} '{name}' is {tuple(tensor.shape)} {tensor.dtype}, but {source} "
                f"holds {tuple(value.shape)} {value.dtype}"
            )


def fixed_levels(module: Any) -> dict[str, torch.Tensor]:
    """``{buffer name: values}`` of the fixed level sets of ``module`` (every name of a
    shared level set, as in :func:`~pyro_bqn.live_tensors.buffers_of`); ``{}`` for a plain callable.

    A fixed :class:`~pyro_bqn.levels.LevelSet` keeps its values in the buffer ``_values``.
    A :class:`~pyro_bqn.levels.LearnableLevels` is left out: its values come from Pyro
    params (its ``_values`` buffer only records the initial levels).
    """
    if not isinstance(module, torch.nn.Module):
        return {}
    return {
        f"{name}._values" if name else "_values": submodule._values
        for name, submodule in module.named_modules(remove_duplicate=False)
        if isinstance(submodule, LevelSet) and not isinstance(submodule, LearnableLevels)
    }


def check_fixed_levels(
    module: Any, saved: Mapping[str, torch.Tensor], kind: str, source: str
) -> None:
    """Refuse ``saved`` buffers whose fixed level sets differ from those of ``module``.

    Fixed levels are a constant of the model's declaration (``levels=ternary()``), not
    trained state: copying other ones in would silently turn the model into another one.
    Learnable levels are trained values and are restored like any parameter.

    :param saved: ``{buffer name: tensor}``, already checked with :func:`check_matching`.
    :param kind: what the buffers are (``"model buffer"``), for the message.
    :param source: where ``saved`` comes from, for the message.
    :raises ValueError: naming the buffer and both level sets.
    """
    for name, values in fixed_levels(module).items():
        if not torch.equal(saved[name].to(values.device), values):
            raise ValueError(
                f"{kind} '{name}' holds the fixed levels {values.tolist()} of the model's "
                f"declaration, but {source} holds {saved[name].tolist()}: fixed levels are "
                "part of the model, so build it with the levels it was trained with"
            )
