import math

import pytest
import torch

from pyro_bqn.architectures import Architecture
from pyro_bqn.baselines import QuantizedEnsemble, fit_ensemble, predict_proba, ste_mlp
from pyro_bqn.baselines.ste import STEConv2d
from tests.baselines.conftest import accuracy


@pytest.fixture(scope="module")
def ensemble(digits) -> QuantizedEnsemble:
    return fit_ensemble(
        digits["x"],
        digits["y"],
        [64, 64, 10],
        num_members=3,
        seed=1,
        epochs=6,
        batch_size=64,
        progress=False,
    )


def test_ensemble_learns_digits(ensemble, digits):
    assert len(ensemble.members) == 3
    assert accuracy(predict_proba(ensemble, digits["x_test"]), digits["y_test"]) > 0.75


def test_prediction_is_the_mean_of_member_probabilities(ensemble, digits):
    members = ensemble.member_proba(digits["x_test"], batch_size=128)
    assert members.shape == (3, 400, 10)
    torch.testing.assert_close(predict_proba(ensemble, digits["x_test"]), members.mean(0))


def test_members_differ(ensemble):
    first, second = (m.fc1.weight for m in list(ensemble.members)[:2])
    assert not torch.equal(first, second)


def test_fit_is_reproducible():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=gen), torch.randint(2, (40,), generator=gen)
    kwargs = dict(num_members=2, seed=3, epochs=1, batch_size=16, progress=False)
    a, b = fit_ensemble(x, y, [3, 4, 2], **kwargs), fit_ensemble(x, y, [3, 4, 2], **kwargs)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_forward_is_log_mean_probability():
    torch.manual_seed(0)
    members = [ste_mlp([3, 4, 2]).eval() for _ in range(4)]
    x = torch.randn(5, 3)
    expected = torch.stack([m(x).softmax(-1) for m in members]).mean(0).log()
    torch.testing.assert_close(QuantizedEnsemble(members)(x), expected)


def test_members_of_a_cnn_architecture():
    torch.manual_seed(0)
    x, y = torch.randn(24, 784), torch.randint(10, (24,))
    arch = Architecture("cnn", (1, 28, 28), 10, (4, 8, 16))
    ensemble = fit_ensemble(x, y, arch, num_members=2, epochs=1, batch_size=12, progress=False)
    for member in ensemble.members:
        assert member.architecture == arch and isinstance(member.conv1, STEConv2d)
    logits = ensemble(x)
    assert logits.shape == (24, 10)
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in ensemble.parameters())


def test_bad_arguments():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="num_members"):
        fit_ensemble(x, y, [3, 2], num_members=0)
    with pytest.raises(ValueError, match="members"):
        QuantizedEnsemble([])
    with pytest.raises(ValueError, match="sizes"):
        fit_ensemble(x, y, [3])


@pytest.mark.parametrize("bootstrap", [True, False])
def test_members_train_on_bootstrap_resamples(monkeypatch, bootstrap):
    seen = []
    monkeypatch.setattr(
        "pyro_bqn.baselines.ensemble.train_ste",
        lambda model, x, y, seed, **kw: seen.append((x, y, seed)),
    )
    x = torch.arange(50.0)[:, None]
    y = torch.arange(50) % 2
    fit_ensemble(x, y, [1, 2], num_members=3, seed=10, bootstrap=bootstrap)
    assert [s for *_, s in seen] == [10, 11, 12]
    for xm, ym, _ in seen:
        assert xm.shape == x.shape and torch.equal(ym, y[xm[:, 0].long()])
        assert (xm.unique().numel() < 50) == bootstrap
    assert torch.equal(seen[0][0], seen[1][0]) != bootstrap


@pytest.mark.parametrize("learn", [True, False])
def test_members_learn_their_logit_scale_or_keep_it(learn):
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(3, (40,))
    ensemble = fit_ensemble(
        x,
        y,
        [6, 8, 3],
        num_members=2,
        epochs=2,
        batch_size=10,
        progress=False,
        learn_output_scale=learn,
    )
    for member in ensemble.members:
        log_scale = member.scale.log_scale
        assert isinstance(log_scale, torch.nn.Parameter) is learn
        # the initial scale is 1 / sqrt(fan_in) of the output layer (8 inputs)
        moved = not torch.isclose(log_scale, torch.tensor(-0.5 * math.log(8)))
        assert moved is learn
