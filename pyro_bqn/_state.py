"""The live state of a model and its guide, shared by :mod:`pyro_bqn.export` and
:mod:`pyro_bqn.checkpoint`: which tensors a run reads, and checked in-place copies into them
that can be undone. (Reading and writing the files is :mod:`pyro_bqn.payload_files`.)

Values are copied *into* the live tensors rather than swapped for new ones: a
:class:`~pyro.nn.PyroModule` reads an ordinary ``nn.Parameter`` (e.g. a batch norm's
``weight``) from the module and a :class:`~pyro.nn.PyroParam` from the param store, and the
two are the same tensor object only as long as nobody replaces either. An in-place copy keeps
that sharing, so the model, the param store and an optimiser keyed on the tensors agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from pyro import poutine

from pyro_bqn.levels import LearnableLevels, LevelSet

__all__ = [
    "buffers_of",
    "check_fixed_levels",
    "check_matching",
    "copy_into",
    "fixed_levels",
    "live_params",
    "preserved",
    "training_mode",
]


def live_params(fn: Callable, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Run ``fn(*args, **kwargs)`` once and return ``{name: tensor}`` of the Pyro params it
    reads, each the *unconstrained* tensor held by the param store (created there if this
    is the first run).

    The run is hidden from enclosing handlers, takes no gradients, and draws its random
    numbers (a guide's samples, an unobserved likelihood site) from a forked generator, so
    the caller's random stream is untouched.
    """
    with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=[]):
        trace = poutine.trace(fn, param_only=True).get_trace(*args, **kwargs)
    return {
        name: site["value"].unconstrained()
        for name, site in trace.nodes.items()
        if site["type"] == "param"
    }


def buffers_of(module: Any) -> dict[str, torch.Tensor]:
    """``{name: buffer}`` of a module (every name, also of buffers shared between
    submodules, so the names match ``state_dict``); ``{}`` for a plain callable."""
    if not isinstance(module, torch.nn.Module):
        return {}
    return dict(module.named_buffers(remove_duplicate=False))


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
    shared level set, as in :func:`buffers_of`); ``{}`` for a plain callable.

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
        if not torch.equal(saved[name], values):
            raise ValueError(
                f"{kind} '{name}' holds the fixed levels {values.tolist()} of the model's "
                f"declaration, but {source} holds {saved[name].tolist()}: fixed levels are "
                "part of the model, so build it with the levels it was trained with"
            )


def copy_into(live: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    """Copy ``values[name]`` into each tensor of ``live`` in place (checked beforehand with
    :func:`check_matching`)."""
    with torch.no_grad():
        for name, tensor in live.items():
            tensor.copy_(values[name])


@contextmanager
def preserved(live: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Restore the tensors of ``live`` to their current values on exit, even on error."""
    saved = {name: tensor.detach().clone() for name, tensor in live.items()}
    try:
        yield
    finally:
        copy_into(live, saved)


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
