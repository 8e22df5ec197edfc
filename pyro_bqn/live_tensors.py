"""The live tensors a model and its guide read, and checked in-place copies into them.

Shared by :mod:`pyro_bqn.checkpoint`, :mod:`pyro_bqn.export` and
:func:`pyro_bqn.nn.reestimate_batch_norm`. (Reading and writing files is
:mod:`pyro_bqn.payload_files`; checking saved values against a model is
:mod:`pyro_bqn.state_checks`.)

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

__all__ = ["buffers_of", "copy_into", "live_params", "preserved"]


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
