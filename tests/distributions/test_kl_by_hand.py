"""KL(q || p) of categoricals over levels against sum_k q_k log(q_k / p_k) by hand, on the
paths the fused statistics do not take: a prior that differs per weight, zeros in q and p,
and a one-hot posterior."""

import math

import pytest
import torch
from pyro.distributions.kl import kl_divergence

from pyro_bqn.distributions import QuantizedCategorical

LEVELS = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)


def _by_hand(q_rows, p_rows):
    def kl(q, p):
        if any(qk > 0 and pk == 0 for qk, pk in zip(q, p, strict=True)):
            return math.inf
        return sum(qk * math.log(qk / pk) for qk, pk in zip(q, p, strict=True) if qk > 0)

    return torch.tensor(
        [kl(q, p) for q, p in zip(q_rows, p_rows, strict=True)], dtype=torch.float64
    )


@pytest.mark.parametrize(
    "q_rows",
    [
        [[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]],
        [[0.0, 1.0, 0.0], [0.0, 0.4, 0.6]],  # one-hot and a zero
    ],
)
def test_a_prior_that_differs_per_weight(q_rows):
    # Two weights, so a batch dimension of size 2 with distinct prior rows.
    p_rows = [[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]
    q = QuantizedCategorical(LEVELS, probs=torch.tensor(q_rows, dtype=torch.float64))
    p = QuantizedCategorical(LEVELS, probs=torch.tensor(p_rows, dtype=torch.float64))
    torch.testing.assert_close(kl_divergence(q, p), _by_hand(q_rows, p_rows))


def test_zeros_in_the_prior_where_q_has_no_mass_or_some():
    p_rows = [[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]
    q_rows = [[0.0, 0.2, 0.8], [0.1, 0.1, 0.8]]
    q = QuantizedCategorical(LEVELS, probs=torch.tensor(q_rows, dtype=torch.float64))
    p = QuantizedCategorical(LEVELS, probs=torch.tensor(p_rows, dtype=torch.float64))
    kl = kl_divergence(q, p)
    expected = _by_hand(q_rows, p_rows)
    torch.testing.assert_close(kl[0], expected[0])
    assert kl[1] == math.inf
