"""Input checks shared by the diagnostics: every public function validates what it is given
and raises :class:`ValueError` naming the offending argument, because a metric computed on
logits or on misaligned labels is a plausible-looking wrong number, not a crash.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import torch

__all__ = ["PROB_SUM_ATOL", "TensorLike", "as_probs", "as_labels", "as_scores", "check_num_bins"]

TensorLike: TypeAlias = torch.Tensor | np.ndarray

#: How far a row of ``probs`` may sum from one (absolute). Loose enough for float32
#: predictives averaged over many samples, tight enough to reject logits or unnormalised
#: scores, which is the mistake this check exists to catch.
PROB_SUM_ATOL = 1e-3

# How each supported ``ndim`` of a probability tensor is named in error messages.
_SHAPE_NAMES = {2: "(N, C)", 3: "(S, N, C)", None: "(..., C)"}


def _as_tensor(value: TensorLike, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}"
        ) from err


def as_probs(probs: TensorLike, name: str = "probs", ndim: int | None = 2) -> torch.Tensor:
    """Return ``probs`` as a floating tensor of probability vectors along its last dimension.

    :param probs: tensor of shape ``(N, C)`` (``ndim=2``), ``(S, N, C)`` (``ndim=3``) or
        ``(..., C)`` with at least one dimension (``ndim=None``).
    :raises ValueError: on a wrong number of dimensions, fewer than two classes, no rows,
        non-finite entries, entries outside ``[0, 1]`` or rows not summing to one, each
        within :data:`PROB_SUM_ATOL`.
    """
    probs = _as_tensor(probs, name)
    if probs.dim() == 0 or (ndim is not None and probs.dim() != ndim):
        raise ValueError(
            f"{name} must have shape {_SHAPE_NAMES[ndim]}, got shape {tuple(probs.shape)}"
        )
    if probs.shape[-1] < 2:
        raise ValueError(
            f"{name} needs at least two classes in its last dimension, got shape "
            f"{tuple(probs.shape)}; for a binary model pass the (1 - p, p) pair per row"
        )
    if probs.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(probs.shape)})")
    if not probs.is_floating_point():
        # Integer or boolean one-hot rows are valid probabilities; compute in floats.
        probs = probs.to(torch.get_default_dtype())
    detached = probs.detach()
    if not torch.isfinite(detached).all():
        raise ValueError(f"{name} must be finite, got NaN or infinite entries")
    if (detached < -PROB_SUM_ATOL).any() or (detached > 1 + PROB_SUM_ATOL).any():
        raise ValueError(
            f"{name} must hold probabilities in [0, 1], got values in "
            f"[{detached.min().item():.4g}, {detached.max().item():.4g}]; softmax logits first"
        )
    error = (detached.sum(-1) - 1).abs()
    if (error > PROB_SUM_ATOL).any():
        worst = int(error.flatten().argmax())
        total = detached.sum(-1).flatten()[worst].item()
        raise ValueError(
            f"{name} must sum to one over its last dimension (within {PROB_SUM_ATOL}), but "
            f"row {worst} sums to {total:.6g}; pass probabilities, not logits or scores"
        )
    return probs


def as_labels(y: TensorLike, probs: torch.Tensor, name: str = "y") -> torch.Tensor:
    """Return ``y`` as an int64 tensor of shape ``(N,)`` on ``probs``' device.

    :param y: integer class labels, shape ``(N,)``, values in ``[0, C)``.
    :param probs: the validated ``(N, C)`` probabilities the labels belong to.
    :raises ValueError: on a wrong shape, a length different from ``probs``, a floating or
        complex dtype, or a label outside ``[0, C)``.
    """
    y = _as_tensor(y, name)
    if y.dim() != 1:
        raise ValueError(f"{name} must have shape (N,), got shape {tuple(y.shape)}")
    if y.shape[0] != probs.shape[0]:
        raise ValueError(
            f"probs and {name} disagree on the number of samples: probs has shape "
            f"{tuple(probs.shape)}, {name} has shape {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    y = y.to(device=probs.device, dtype=torch.long)
    num_classes = probs.shape[-1]
    if ((y < 0) | (y >= num_classes)).any():
        raise ValueError(
            f"{name} must hold labels in [0, {num_classes}) to match probs' {num_classes} "
            f"classes, got values in [{y.min().item()}, {y.max().item()}]"
        )
    return y


def as_scores(scores: TensorLike, name: str) -> np.ndarray:
    """Return ``scores`` as a finite, non-empty 1-D float64 numpy array.

    :raises ValueError: on another shape, no entries or non-finite entries.
    """
    scores = _as_tensor(scores, name)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    scores = scores.detach().cpu().to(torch.float64)
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} must be finite, got NaN or infinite entries")
    return scores.numpy()


def check_num_bins(num_bins: int) -> int:
    """Return ``num_bins`` if it is an integer ``>= 1``.

    :raises ValueError: otherwise (``bool`` is refused although it subclasses ``int``).
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int | np.integer) or num_bins < 1:
        raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")
    return int(num_bins)
