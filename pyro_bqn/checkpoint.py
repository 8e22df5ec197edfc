"""Training checkpoints: save and restore a model, its guide and the optimiser exactly.

**File format** (:func:`save_checkpoint`): a checked payload file
(:mod:`pyro_bqn.payload_files`: ``torch.save`` of a plain dictionary, written atomically,
read back with ``torch.load(..., weights_only=True)`` and its checksum verified)::

    {
        "format": "pyro_bqn.checkpoint",
        "version": 2,
        "params": {name: tensor},           # the whole Pyro param store, unconstrained values
        "model_buffers": {name: tensor},    # e.g. batch-norm running statistics, fixed levels
        "guide_buffers": {name: tensor},
        "optimizer": {param name: optimiser state} or None,   # PyroOptim.get_state()
        "extra": {str: plain value},        # the caller's state, e.g. fit's epoch and history
        "checksum": "sha256:<hex>",         # of everything above
    }

Version 1 (pyro_bqn before checksums) had neither ``"extra"`` nor ``"checksum"``; it is
refused with an error that says so. Constraints are not stored: the model and guide declare
them again when they run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.optim import PyroOptim

from pyro_bqn.atomic_files import PathLike
from pyro_bqn.devices import module_device
from pyro_bqn.live_tensors import buffers_of, copy_into, live_params, preserved
from pyro_bqn.payload_files import check_storable, load_payload, save_payload
from pyro_bqn.state_checks import check_fixed_levels, check_matching

__all__ = ["load_checkpoint", "save_checkpoint"]

FILE_FORMAT = "pyro_bqn.checkpoint"
FILE_VERSION = 2


def save_checkpoint(
    path: PathLike,
    model: Callable[..., Any],
    guide: Callable[..., Any],
    optimizer: PyroOptim | None = None,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save everything needed to resume training or predicting: the Pyro param store (the
    model's and the guide's parameters), the buffers of ``model`` and ``guide`` (if they are
    modules) and, optionally, the state of ``optimizer`` and the caller's ``extra`` state.

    The file is replaced atomically: a save that is interrupted (an exception, a crash)
    leaves the previous file at ``path`` as it was.

    :param optimizer: any :class:`~pyro.optim.PyroOptim`, also a learning-rate scheduler
        such as :class:`pyro.optim.ExponentialLR` (both the scheduler's and the torch
        optimiser's state are kept).
    :param extra: state of the caller to restore with the checkpoint (returned by
        :func:`load_checkpoint`), e.g. ``{"epoch": 3, "generator": generator.get_state(),
        "history": [{"loss": 0.5}, ...]}``: a dict with str keys of plain values (None,
        bool, int, float, str, lists, tuples, dicts and tensors), which load without
        running code and are covered by the checksum. Tensors are saved with their whole
        storage, so pass clones of small views of big tensors.
    :raises ValueError: if ``extra`` holds something else (naming it), or the param store is
        empty (run the guide, e.g. one SVI step, first); nothing is written then.
    """
    if extra is None:
        extra = {}
    if not isinstance(extra, dict) or not all(isinstance(key, str) for key in extra):
        raise ValueError(
            f"extra must be a dict with str keys, got {type(extra).__name__}"
            + (f" with keys {list(extra)}" if isinstance(extra, dict) else "")
        )
    check_storable(extra, "extra")
    params = pyro.get_param_store().get_state()["params"]
    if not params:
        raise ValueError(
            "the Pyro param store is empty: run the guide (e.g. one SVI step) before saving"
        )

    def clones(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in tensors.items()}

    payload = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "params": clones(params),
        "model_buffers": clones(buffers_of(model)),
        "guide_buffers": clones(buffers_of(guide)),
        "optimizer": None if optimizer is None else optimizer.get_state(),
        "extra": extra,
    }
    save_payload(path, payload)


def load_checkpoint(
    path: PathLike,
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    optimizer: PyroOptim | None = None,
    map_location: str | torch.device | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model`` and ``guide``
    (and ``optimizer``), exactly: losses, predictions and further training steps are
    bitwise those of the saved run. Return the ``extra`` state saved with it (``{}`` if
    none was).

    The guide creates its parameters only when it first runs, so ``load_checkpoint`` runs
    the guide and then the model once on the example inputs ``*args, **kwargs`` (e.g. one
    small batch, ``(x, y)``), without gradients and hiding the run from any handler and
    from the caller's random stream. Then it copies the saved values into the parameters
    and buffers those runs use, in place. Parameters in the file that neither reads (other
    entries of the saved param store) are left out.

    Build ``model`` and ``guide`` after :func:`pyro.clear_param_store` (or in the store they
    were trained in): a stale param-store entry with a module parameter's name would shadow
    the module's own tensor, in Pyro generally. Build them with the same fixed levels: those
    are part of the model's declaration, so a checkpoint with other ones is refused (learnable
    levels are parameters and are restored).

    A file that cannot be read or verified changes nothing; one that does not fit the model
    and guide changes none of their existing values (the run may have created the guide's
    parameters).

    :param optimizer: a new :class:`~pyro.optim.PyroOptim` of the saved kind (with the same
        arguments), which takes the saved state at its first step. It must not have taken a
        step: PyroOptim applies a loaded state only to parameters it has not seen yet.
    :param map_location: the device the file's tensors are read onto; default: the model's
        (:func:`pyro_bqn.devices.module_device`, else the CPU). A checkpoint saved on any
        device loads into a model on any other: the values are copied into the model's own
        tensors, where they are.
    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: naming ``path`` if the file cannot be read, is not a checkpoint, is
        corrupt (its checksum does not match: damaged or truncated) or of another version;
        naming the parameter or buffer if the checkpoint does not fit the model and guide
        (also fixed levels that differ, naming both level sets); or if ``optimizer`` has
        already stepped or the checkpoint holds no optimiser state.
    """
    if map_location is None:
        map_location = module_device(model) or "cpu"
    payload = load_payload(
        path,
        FILE_FORMAT,
        FILE_VERSION,
        tensor_groups=("params", "model_buffers", "guide_buffers"),
        map_location=map_location,
    )
    source = f"checkpoint {os.fspath(path)!r}"
    extra = payload.get("extra")
    if not isinstance(extra, dict):
        raise ValueError(f"{source} is damaged: its 'extra' entry is not a dictionary")
    if optimizer is not None:
        if not isinstance(payload.get("optimizer"), dict):
            raise ValueError(f"{source} holds no optimizer state (saved with optimizer=None)")
        if optimizer.optim_objs:
            raise ValueError(
                "optimizer has already taken a step; PyroOptim applies a loaded state only to "
                "parameters it has not seen, so pass a new one"
            )

    def model_and_guide(*args: Any, **kwargs: Any) -> Any:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        return poutine.replay(model, trace=guide_trace)(*args, **kwargs)

    # The run is only there to create the parameters: keep it from moving running statistics,
    # so that a checkpoint that does not fit leaves model and guide as they were.
    with preserved(buffers_of(model)), preserved(buffers_of(guide)):
        params = live_params(model_and_guide, *args, **kwargs)
    # Read after the run, which may have built the guide's submodules.
    model_buffers, guide_buffers = buffers_of(model), buffers_of(guide)
    check_matching(params, payload["params"], "parameter", source, allow_extra=True)
    check_matching(model_buffers, payload["model_buffers"], "model buffer", source)
    check_matching(guide_buffers, payload["guide_buffers"], "guide buffer", source)
    check_fixed_levels(model, payload["model_buffers"], "model buffer", source)
    check_fixed_levels(guide, payload["guide_buffers"], "guide buffer", source)
    # copy_into copies the entries the model and guide read; other saved params are left out.
    copy_into(params, payload["params"])
    copy_into(model_buffers, payload["model_buffers"])
    copy_into(guide_buffers, payload["guide_buffers"])
    if optimizer is not None:
        optimizer.set_state(payload["optimizer"])
    return extra
