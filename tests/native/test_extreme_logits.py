"""The level-statistics kernel on finite logits near the ends of the float range: its
result (or its refusal, which hands the input to torch) must equal the torch path's."""

import os

import pytest
import torch

import pyro_bqn.distributions.level_statistics as level_module
from pyro_bqn.distributions.level_statistics import level_statistics

pytestmark = pytest.mark.skipif(
    os.environ.get("PYRO_BQN_NATIVE") == "0", reason="native kernels turned off"
)


def _statistics_and_gradient(logits: torch.Tensor, levels: torch.Tensor, weights: torch.Tensor):
    """The four statistics and d(sum_j weights_j . statistic_j)/dlogits."""
    logits = logits.detach().clone().requires_grad_()
    stats = level_statistics(logits, levels)
    loss = sum((w * s).sum() for w, s in zip(weights, stats, strict=True))
    (gradient,) = torch.autograd.grad(loss, logits)
    return [s.detach() for s in stats], gradient


def _extreme_logits(dtype: torch.dtype) -> torch.Tensor:
    """Levels-first logits, one column per case: both ends of the range in either order,
    one huge negative logit beside ordinary ones, and an ordinary column."""
    big = torch.finfo(dtype).max * 0.9  # about 3e38 for float32
    columns = [
        [big, -big, 0.0],
        [-big, big, 0.0],
        [0.0, -big, 1.0],
        [-0.45 * big, 2.0, -1.0],  # less than half the range apart: computed natively
        [0.5, -0.25, 1.5],
    ]
    return torch.tensor(columns, dtype=dtype).T.contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_matches_torch_on_logits_near_the_ends_of_the_range(monkeypatch, dtype):
    assert level_module.native.load("level_statistics") is not None
    logits = _extreme_logits(dtype)
    levels = torch.tensor([-1.0, 0.25, 1.0], dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    # Weights of 3 or more make h log q overflow where q is 0 (log q = -0.405 max or less).
    weights = [torch.rand(logits.shape[1], dtype=dtype, generator=generator) + 3]
    weights = weights * 4
    native_stats, native_grad = _statistics_and_gradient(logits, levels, weights)
    monkeypatch.setattr(level_module, "_native_library", lambda *args: None)
    torch_stats, torch_grad = _statistics_and_gradient(logits, levels, weights)
    for got, expected in [*zip(native_stats, torch_stats, strict=True), (native_grad, torch_grad)]:
        assert torch.isfinite(got).all() and torch.isfinite(expected).all()
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_computes_logits_less_than_half_the_range_apart_itself(dtype):
    # The kernel refuses only logits more than half the range apart; closer ones it computes,
    # including the gradient where a probability underflows to 0.
    library = level_module.native.load("level_statistics")
    assert library is not None
    logits = _extreme_logits(dtype)[:, 3:].contiguous()
    levels = torch.tensor([-1.0, 0.25, 1.0], dtype=dtype)
    assert level_module._kernel_forward(library, logits, levels) is not None
