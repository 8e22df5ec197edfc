"""Distribution shift: a split's images transformed, for out-of-distribution tests."""

from __future__ import annotations

import torch

from pyro_bqn.data.dataset import Dataset

__all__ = ["SHIFTS", "shifted_images"]

#: The distribution shifts :func:`shifted_images` applies.
SHIFTS: tuple[str, ...] = ("rotate90", "invert", "hflip", "vflip")


def shifted_images(
    dataset: Dataset, shift: str = "rotate90", split: str = "test"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-distribution inputs: one split's images transformed, in the dataset's space.

    The images are mapped back to ``[0, 1]`` pixels, transformed, and normalised again with
    the dataset's own statistics, so they are directly comparable with in-distribution
    inputs. For the MNIST sets a 90° rotation or a colour inversion yields images no digit
    class describes well, which is what an OOD test wants.

    :param dataset: an image dataset (``input_shape`` of ``(C, H, W)``).
    :param shift: one of :data:`SHIFTS`: ``"rotate90"`` (a quarter turn counter-clockwise),
        ``"invert"`` (``1 - pixel``: white digits on black become black on white),
        ``"hflip"`` (mirror left-right) or ``"vflip"`` (mirror top-bottom).
    :returns: ``(x, y)``: float32 inputs of shape ``(N, D)`` and the original int64 labels
        ``(N,)`` (which no longer name the content for most shifts).
    """
    if len(dataset.input_shape) != 3:
        raise ValueError(
            f"shifted_images needs an image dataset, {dataset.name!r} has input_shape "
            f"{dataset.input_shape}"
        )
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; expected one of {SHIFTS}")
    if shift == "rotate90" and dataset.input_shape[1] != dataset.input_shape[2]:
        raise ValueError(f"rotate90 needs square images, got {dataset.input_shape}")
    x, y = dataset.split(split)
    pixels = dataset.denormalize(x).view(-1, *dataset.input_shape)
    if shift == "rotate90":
        pixels = torch.rot90(pixels, 1, dims=(-2, -1))
    elif shift == "invert":
        pixels = 1.0 - pixels
    elif shift == "hflip":
        pixels = torch.flip(pixels, dims=(-1,))
    else:
        pixels = torch.flip(pixels, dims=(-2,))
    x_shifted = (pixels.reshape(len(x), -1) - dataset.mean) / dataset.std
    return x_shifted.contiguous(), y.clone()
