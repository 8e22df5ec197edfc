import pytest
import torch

from pyro_bqn.nn.recalibrate import reestimate_batch_norm
from tests.trained_mlp import trained_mlp


@pytest.fixture
def run():
    return trained_mlp(steps=2, n=40)


def _hidden(run, weights):
    """The input of the batch norm ``body.2`` under the network ``weights``, ``(N, 8)``."""
    return run.x @ weights["body.1.weight"].T


def test_one_batch_gives_the_mean_and_unbiased_variance_and_restores_momentum_and_modes(run):
    norm = run.model.body[2]
    norm.momentum = 0.3
    run.model.eval()
    run.model.body[3].train()  # mixed flags must come back as they were
    weights = run.guide.median()
    rng = torch.get_rng_state()

    assert reestimate_batch_norm(run.model, weights, run.x, batch_size=len(run.x)) is None

    hidden = _hidden(run, weights)
    assert torch.allclose(norm.running_mean, hidden.mean(0), atol=1e-6)
    assert torch.allclose(norm.running_var, hidden.var(0), rtol=1e-5)
    assert norm.num_batches_tracked == 1
    assert norm.momentum == 0.3
    in_training = list(run.model.body[3].modules())
    assert [m.training for m in run.model.modules()] == [
        any(m is t for t in in_training) for m in run.model.modules()
    ]
    assert torch.equal(torch.get_rng_state(), rng)


def test_batches_are_averaged_and_never_hold_a_single_example(run):
    weights = run.guide.median()
    norm = run.model.body[2]
    reestimate_batch_norm(run.model, weights, run.x, batch_size=10)
    batches = _hidden(run, weights).split(10)
    assert norm.num_batches_tracked == 4
    means = torch.stack([b.mean(0) for b in batches]).mean(0)
    variances = torch.stack([b.var(0) for b in batches]).mean(0)
    assert torch.allclose(norm.running_mean, means, atol=1e-6)
    assert torch.allclose(norm.running_var, variances, rtol=1e-5)

    # 5 examples in batches of 2 would leave one alone: two batches (3 + 2) instead.
    reestimate_batch_norm(run.model, weights, run.x[:5], batch_size=2)
    assert norm.num_batches_tracked == 2


def test_a_network_that_does_not_fit_is_refused_naming_the_site_and_nothing_changes(run):
    weights = run.guide.median()
    before = {name: b.clone() for name, b in run.model.named_buffers()}
    cases = [
        ({**weights, "body.9.weight": weights["body.1.weight"]}, "no sample site named 'body.9"),
        ({k: v for k, v in weights.items() if k != "body.4.bias"}, "'body.4.bias' has no value"),
        ({**weights, "body.4.weight": weights["body.4.weight"].T}, "'body.4.weight' expects"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            reestimate_batch_norm(run.model, bad, run.x)
        for name, buffer in run.model.named_buffers():
            assert torch.equal(buffer, before[name]), name
        assert run.model.body[2].momentum == 0.1


def test_bad_sizes_are_refused(run):
    weights = run.guide.median()
    with pytest.raises(ValueError, match="at least two examples"):
        reestimate_batch_norm(run.model, weights, run.x[:1])
    with pytest.raises(ValueError, match="batch_size"):
        reestimate_batch_norm(run.model, weights, run.x, batch_size=1)
