"""PackedSite.from_indices stores the indices at the fewest bits and gives them back."""

import pytest
import torch

from pyro_bqn.export import PackedSite, index_bits


@pytest.mark.parametrize("num_levels", [2, 3, 4, 5, 16])
def test_from_indices_round_trips_at_the_fewest_bits(num_levels):
    gen = torch.Generator().manual_seed(num_levels)
    levels = torch.linspace(-1.0, 1.0, num_levels)
    indices = torch.randint(0, num_levels, (3, 7), generator=gen)
    site = PackedSite.from_indices(indices, levels)
    assert torch.equal(site.indices(), indices)
    assert torch.equal(site.values(), levels[indices])
    assert site.shape == (3, 7)
    assert site.packed.dtype == torch.uint8
    assert site.packed.shape == (-(-21 * index_bits(num_levels) // 8),)  # ceil(numel bits / 8)
