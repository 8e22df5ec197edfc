"""PackedSite.from_indices stores the indices at the fewest bits and gives them back;
PackedSite.from_weights packs each weight as its nearest level, in the levels' dtype."""

import math

import numpy as np
import pytest
import torch

from pyro_bqn.export import PackedSite, _position_dtype, index_bits


@pytest.mark.parametrize("shape", [(3, 7), (0,), (2, 0, 3)], ids=["3x7", "empty", "2x0x3"])
@pytest.mark.parametrize("num_levels", [2, 3, 4, 5, 16])
def test_from_indices_round_trips_at_the_fewest_bits(num_levels, shape):
    gen = torch.Generator().manual_seed(num_levels)
    levels = torch.linspace(-1.0, 1.0, num_levels)
    indices = torch.randint(0, num_levels, shape, generator=gen)
    site = PackedSite.from_indices(indices, levels)
    assert torch.equal(site.indices(), indices)
    assert torch.equal(site.values(), levels[indices])
    assert site.shape == shape
    assert site.packed.dtype == torch.uint8
    numel = math.prod(shape)
    assert site.packed.shape == (-(-numel * index_bits(num_levels) // 8),)  # ceil(numel bits / 8)


def test_from_weights_packs_each_weight_as_its_nearest_level_with_ties_going_up():
    # Dyadic levels: the midpoints -0.625, 0.125, 1.0 and every distance below are exact.
    levels = torch.tensor([-1.0, -0.25, 0.5, 1.5])
    gen = torch.Generator().manual_seed(0)
    weights = torch.cat(
        [4 * torch.rand(300, generator=gen) - 2, torch.tensor([-0.625, 0.125, 1.0]), levels]
    )
    site = PackedSite.from_weights(weights, levels)
    # Nearest level by distance, a tie going to the upper level (LevelSet.nearest's rule):
    # argmin over the levels in reverse order finds the upper one of two equal distances.
    distance = np.abs(weights.numpy()[:, None] - levels.numpy())
    nearest = len(levels) - 1 - distance[:, ::-1].argmin(-1)
    assert site.indices().tolist() == nearest.tolist()
    assert site.indices()[300:303].tolist() == [1, 2, 3]
    assert torch.equal(site.values(), weights)
    assert site.outlier_index.tolist() == list(range(303))


def test_from_weights_stores_the_weights_in_the_levels_dtype():
    levels = torch.tensor([-1.0, 0.0, 1.0])
    weights = torch.tensor([[1.0, 0.1], [-1.0, 0.0]], dtype=torch.float64)
    site = PackedSite.from_weights(weights, levels)
    assert site.outlier_index.tolist() == [1]
    assert site.outlier_values.dtype == torch.float32
    assert torch.equal(site.values(), weights.to(torch.float32))


@pytest.mark.parametrize("numel", [0, 7, 2**31 - 1, 2**31, 2**40])
def test_outlier_positions_are_int32_where_the_weight_count_fits_it(numel):
    dtype = _position_dtype(numel)
    assert torch.iinfo(dtype).max >= numel - 1  # every position fits
    assert (dtype == torch.int32) == (numel <= torch.iinfo(torch.int32).max)
