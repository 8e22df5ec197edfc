"""statistics_from_probs computes in the probabilities' dtype, whatever the levels' dtype."""

import torch

from pyro_bqn.distributions.level_statistics import statistics_from_probs


def test_float32_levels_with_float64_probabilities():
    probs = torch.tensor([[0.2, 0.5], [0.3, 0.25], [0.5, 0.25]], dtype=torch.float64)
    levels = torch.tensor([-1.0, 0.0, 1.0])  # float32
    stats = statistics_from_probs(probs, levels)
    assert all(value.dtype == torch.float64 for value in stats)
    torch.testing.assert_close(stats.mean, torch.tensor([0.3, -0.25], dtype=torch.float64))
    torch.testing.assert_close(stats.second_moment, torch.tensor([0.7, 0.75], dtype=torch.float64))
    torch.testing.assert_close(stats.var, stats.second_moment - stats.mean.square())
    torch.testing.assert_close(stats.neg_entropy, (probs * probs.log()).sum(0))
