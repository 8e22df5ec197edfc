"""MaxPool2d's moment rule takes exactly torch's windows, for every stride."""

import pytest
import torch
import torch.nn.functional as F

from pyro_bqn.moments import Moments
from pyro_bqn.nn import AvgPool2d, MaxPool2d


@pytest.mark.parametrize(
    ("kernel", "stride", "size"),
    [(2, 1, (5, 6)), ((2, 3), (1, 2), (6, 7)), (3, 2, (7, 8)), ((1, 2), 1, (3, 4))],
)
def test_nearly_certain_inputs_pool_to_torchs_maximum(kernel, stride, size):
    # With variances of 1e-12 Clark's rule is the maximum of the means: any window shifted,
    # added or dropped shows up as a different value or shape.
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    out = MaxPool2d(kernel, stride)(Moments(mean, torch.full_like(mean, 1e-12)))
    expected = F.max_pool2d(mean, kernel, stride)
    assert out.mean.shape == expected.shape
    torch.testing.assert_close(out.mean, expected, atol=1e-5, rtol=0)


def test_a_dilation_of_one_may_be_given_as_a_pair():
    assert MaxPool2d(2, dilation=(1, 1)).kernel_size == (2, 2)
    with pytest.raises(ValueError, match="dilation=1 only"):
        MaxPool2d(2, dilation=(1, 2))


@pytest.mark.parametrize("pool", [MaxPool2d, AvgPool2d])
def test_a_padding_of_zero_may_be_given_as_a_pair(pool):
    assert pool(2, padding=(0, 0)).kernel_size == (2, 2)
    for padding in [(1, 0), (0, 1)]:
        with pytest.raises(ValueError, match="padding=0 only"):
            pool(2, padding=padding)
