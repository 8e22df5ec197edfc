import torch
from torch import nn

from pyro_bqn.baselines import float_mlp, predict_proba, train
from tests.baselines.conftest import accuracy


def test_float_mlp_layers():
    model = float_mlp([64, 32, 16, 10])
    kinds = [type(m) for m in model.children()]
    assert kinds == [nn.Flatten] + [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]


def test_float_mlp_learns_digits(digits):
    torch.manual_seed(0)
    model = float_mlp([64, 64, 10])
    history = train(
        model, digits["x"], digits["y"], epochs=8, batch_size=64, lr=1e-2, progress=False
    )
    assert history[-1] < history[0]
    assert accuracy(predict_proba(model, digits["x_test"]), digits["y_test"]) > 0.85
