"""The README's example: a ternary Bayesian network on scikit-learn's 8x8 digits.

    python examples/quickstart.py [--figures DIR]
"""

import argparse
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from pyro.nn import PyroModule

import pyro_bqn
from pyro_bqn import levels
from pyro_bqn import nn as qnn
from pyro_bqn.data import load_digits
from pyro_bqn.distributions import MomentCategorical


class Classifier(PyroModule):
    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = pyro_bqn.QuantizedLinear(num_features, 128, levels=levels.ternary(), bias=False)
        self.bn1 = qnn.BatchNorm1d(128)
        self.act = qnn.Sign()
        self.fc2 = pyro_bqn.QuantizedLinear(128, num_classes, levels=levels.ternary())
        self.temperature = qnn.Temperature(128**0.5)

    def forward(self, x, y=None):
        # Layers run outside the data plate: the weights are global.
        logits = self.temperature(self.fc2(self.act(self.bn1(self.fc1(x)))))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


def main(figures: Path | None = None) -> None:
    pyro.set_rng_seed(0)
    data = load_digits()
    model = Classifier(data.num_features, data.num_classes)
    guide = pyro_bqn.AutoQuantizedGuide(model)
    elbo = pyro_bqn.DeterministicELBO(kl_weight=0.01)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    for step in range(300):
        loss = svi.step(data.x_train, data.y_train)
        if step % 100 == 0:
            print(f"step {step:3d}  loss {loss:9.2f}  terms {elbo.last_terms}")
    probs = pyro_bqn.predict(model, guide, data.x_test)  # sampling-free predictive
    accuracy = (probs.argmax(-1) == data.y_test).float().mean().item()
    print(f"test accuracy {accuracy:.3f}")
    report = pyro_bqn.diagnostics.calibration_report(probs, data.y_test)
    print({key: round(value, 4) for key, value in report.items()})
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)))
    if figures:  # a reliability diagram and each layer's posterior over the levels
        from pyro_bqn.diagnostics import (
            plot_posterior_summary,
            posterior_summary,
            reliability_diagram,
            save_figure,
        )

        save_figure(reliability_diagram(probs, data.y_test), figures / "quickstart_reliability.png")
        summary = plot_posterior_summary(posterior_summary(guide))
        save_figure(summary, figures / "quickstart_posterior.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figures", type=Path, help="directory for the PNG figures")
    main(parser.parse_args().figures)
