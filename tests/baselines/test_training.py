import pytest
import torch
from torch import nn

from pyro_bqn.baselines import float_mlp, predict_proba, train


def _blobs(n: int = 65, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well separated 2-D Gaussian blobs."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n,), generator=gen)
    x = torch.randn(n, 2, generator=gen) + 3.0 * (2.0 * y[:, None] - 1.0)
    return x, y


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return float_mlp([2, 8, 2])


def test_same_seed_same_run_and_global_rng_untouched():
    x, y = _blobs()
    a, b = _model(), _model()
    rng_before = torch.get_rng_state()
    hist_a = train(a, x, y, epochs=3, batch_size=16, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    hist_b = train(b, x, y, epochs=3, batch_size=16, seed=7, progress=False)
    assert hist_a == hist_b and len(hist_a) == 3
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = _model()
    assert train(c, x, y, epochs=3, batch_size=16, seed=8, progress=False) != hist_a


def test_callback_after_step_and_singleton_batch():
    x, y = _blobs(n=65)  # 65 = 64 + 1: the last example is folded into the first minibatch
    epochs_seen, steps = [], []
    history = train(
        _model(),
        x,
        y,
        epochs=2,
        batch_size=64,
        lr=1e-2,
        progress=True,
        callback=lambda epoch, loss: epochs_seen.append((epoch, loss)),
        after_step=lambda: steps.append(1),
    )
    assert epochs_seen == list(enumerate(history))
    assert len(steps) == 2


def test_loss_decreases_and_model_mode_is_restored():
    x, y = _blobs(n=200)
    model = _model().eval()
    history = train(model, x, y, epochs=5, batch_size=32, lr=1e-2, progress=False)
    assert history[-1] < history[0]
    assert not model.training


def test_several_optimizers_step_on_the_same_gradients():
    x, y = _blobs()
    model = _model()
    first, rest = model.fc1.weight, [p for n, p in model.named_parameters() if n != "fc1.weight"]
    before = [p.detach().clone() for p in model.parameters()]
    opts = [torch.optim.SGD([first], lr=0.1), torch.optim.Adam(rest, lr=0.1)]
    train(model, x, y, epochs=1, batch_size=64, optimizer=opts, progress=False)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_predict_proba():
    x, _ = _blobs()
    model = _model().train()
    probs = predict_proba(model, x, batch_size=10)
    assert probs.shape == (65, 2)
    assert torch.allclose(probs.sum(-1), torch.ones(65))
    assert model.training
    model.eval()
    assert torch.allclose(probs, torch.softmax(model(x), -1))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"optimizer": []}, "optimizer"),
        ({"y": torch.zeros(3, dtype=torch.long)}, "y"),
        ({"y": torch.zeros(65)}, "y"),
        ({"x": torch.zeros(65)}, "x"),
    ],
)
def test_bad_arguments(kwargs, name):
    x, y = _blobs()
    data = {"x": x, "y": y}
    data.update({k: kwargs.pop(k) for k in ("x", "y") if k in kwargs})
    with pytest.raises(ValueError, match=name):
        train(_model(), data["x"], data["y"], progress=False, **kwargs)
    with pytest.raises(ValueError, match="batch_size"):
        predict_proba(_model(), x, batch_size=0)
