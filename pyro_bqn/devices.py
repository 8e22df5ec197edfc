"""Devices by name: ``"cpu"``, ``"cuda"`` (or ``"cuda:<i>"``), ``"mps"`` or ``"auto"``, checked
before any work, and moving a model, its guide and its inputs there.

Everything a :mod:`pyro_bqn` model holds is a parameter or a buffer of its modules (level sets,
batch-norm statistics, thresholds, the guide's logits), and priors are rebuilt at every call
from the current levels, so ``model.to(device)`` moves a model whole; :func:`move_to` does the
same for a guide and the inputs.

Usage::

    >>> import torch
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("auto").type in {"cpu", "cuda", "mps"}
    True
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DEVICE_CHOICES", "module_device", "move_to", "resolve_device"]

#: The names ``--device`` accepts (``"cuda:<i>"`` picks one GPU).
DEVICE_CHOICES: tuple[str, ...] = ("cpu", "cuda", "mps", "auto")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The :class:`torch.device` that ``device`` names, refused unless it can run here.

    :param device: ``"cpu"``; ``"cuda"`` or ``"cuda:<i>"``; ``"mps"`` (Apple GPUs); ``"auto"``
        or ``None``: CUDA if available, else MPS if available, else the CPU; or a
        :class:`torch.device`.
    :raises ValueError: naming the device, if it is unknown or not available here (e.g.
        CUDA on a machine without a GPU or with a CPU-only build of torch).
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be one of {', '.join(DEVICE_CHOICES)} or cuda:<index>, got {device!r}"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} requested, but CUDA is not available here (no GPU, or a "
                f"CPU-only build of torch {torch.__version__}); use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r} requested, but there are {count} CUDA devices")
    elif resolved.type == "mps":
        if not _mps_available():
            raise ValueError(f"device {device!r} requested, but MPS is not available here")
    elif resolved.type != "cpu":
        raise ValueError(
            f"device must be one of {', '.join(DEVICE_CHOICES)} or cuda:<index>, got {device!r}"
        )
    return resolved


def module_device(module: Any) -> torch.device | None:
    """The device of a module's first parameter or buffer (``None`` for a module without
    any, or for a plain function)."""
    if not isinstance(module, torch.nn.Module):
        return None
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return None if tensor is None else tensor.device


def move_to(device: torch.device, *values: Any) -> list[Any]:
    """``values`` with every module and tensor on ``device``: modules in place
    (``module.to(device)``, which keeps the parameters' identity, so Pyro's param store
    follows), tensors as copies, anything else unchanged."""
    return [
        value.to(device) if isinstance(value, torch.nn.Module | torch.Tensor) else value
        for value in values
    ]
