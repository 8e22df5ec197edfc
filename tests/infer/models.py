"""Small models shared by the inference tests."""

from __future__ import annotations

import pyro
import torch
from pyro.nn import PyroModule

from pyro_bqn import levels as qlevels
from pyro_bqn import nn as qnn
from pyro_bqn.distributions.moment_likelihoods import MomentCategorical, MomentNormal
from pyro_bqn.nn.quantized_linear import QuantizedLinear


class Classifier(PyroModule):
    """``sizes[0] -> ... -> sizes[-1]`` with batch norm and sign between quantized layers."""

    def __init__(self, sizes, levels=None, temperature=None):
        super().__init__()
        levels = levels or qlevels.ternary()
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            last = i == len(sizes) - 2
            layers.append(QuantizedLinear(fan_in, fan_out, levels=levels, bias=last))
            if not last:
                layers += [qnn.BatchNorm1d(fan_out), qnn.Sign()]
        self.body = PyroModule[torch.nn.Sequential](*layers)
        self.temperature = qnn.Temperature(temperature or sizes[-2] ** 0.5)

    def forward(self, x, y=None):
        logits = self.temperature(self.body(x))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


class Regressor(PyroModule):
    def __init__(self, fan_in, hidden, levels=None):
        super().__init__()
        levels = levels or qlevels.ternary()
        self.fc1 = QuantizedLinear(fan_in, hidden, levels=levels, bias=False)
        self.bn = qnn.BatchNorm1d(hidden)
        self.act = qnn.ReLU()
        self.fc2 = QuantizedLinear(hidden, 1, levels=levels)
        self.scale = qnn.Temperature(hidden**0.5)
        self.noise = pyro.nn.PyroParam(
            torch.tensor(1.0), constraint=torch.distributions.constraints.positive
        )

    def forward(self, x, y=None):
        loc = self.scale(self.fc2(self.act(self.bn(self.fc1(x)))))[..., 0]
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentNormal(loc, self.noise), obs=y)


def linear_classes(n, d, c, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(c, d, generator=gen)
    x = torch.randn(n, d, generator=gen)
    return x, (x @ w.T).argmax(-1)
