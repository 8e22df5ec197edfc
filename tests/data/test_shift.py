"""Tests for pyro_bqn.data.shift: out-of-distribution images."""

from __future__ import annotations

import pytest
import torch

from pyro_bqn.data import SHIFTS, Dataset, load_dataset, shifted_images


@pytest.mark.parametrize("shift", SHIFTS)
def test_shifted_images(mnist: Dataset, shift: str) -> None:
    x, y = shifted_images(mnist, shift)
    assert x.shape == mnist.x_test.shape and x.dtype == torch.float32
    assert torch.equal(y, mnist.y_test)
    before = mnist.denormalize(mnist.x_test).view(-1, 28, 28)
    after = mnist.denormalize(x).view(-1, 28, 28)
    expected = {
        "rotate90": torch.rot90(before, 1, dims=(1, 2)),
        "invert": 1 - before,
        "hflip": before.flip(2),
        "vflip": before.flip(1),
    }[shift]
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)


def test_shifted_images_rejects_bad_input() -> None:
    digits, wine = load_dataset("digits"), load_dataset("wine")
    assert shifted_images(digits, "rotate90", split="val")[0].shape == digits.x_val.shape
    with pytest.raises(ValueError, match="needs an image dataset"):
        shifted_images(wine)
    with pytest.raises(ValueError, match="unknown shift 'blur'"):
        shifted_images(digits, "blur")
