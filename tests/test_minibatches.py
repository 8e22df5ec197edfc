import pytest
import torch

from pyro_bqn.minibatches import minibatches, num_minibatches


@pytest.mark.parametrize("num_data", [1, 2, 5, 20, 21, 22, 341, 1000])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 20, 1333])
def test_minibatches_cover_every_example_once_and_none_has_one_example(num_data, batch_size):
    order = torch.randperm(num_data, generator=torch.Generator().manual_seed(0))
    batches = minibatches(order, batch_size)
    assert len(batches) == num_minibatches(num_data, batch_size)
    assert torch.equal(torch.cat(batches), order)
    if num_data > 1 and batch_size > 1:
        assert min(len(b) for b in batches) >= 2
    assert max(len(b) for b in batches) <= batch_size + 1


def test_a_single_last_example_is_folded_into_the_batch_before():
    # breast-cancer's 341 training examples in minibatches of 20: 17 * 20 + 1.
    sizes = [len(b) for b in minibatches(torch.arange(341), 20)]
    assert sizes == [20] * 16 + [21]
