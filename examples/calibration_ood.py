"""Calibration and out-of-distribution detection with a ternary network on 8x8 digits.

A Bayesian quantized MLP is trained on scikit-learn's digits; its sampling-free predictive
is scored on the test images (accuracy, NLL, Brier score, expected calibration error), and
its predictive entropy is compared between the test images and the same images rotated by
a quarter turn or with inverted colours, which no digit class describes. The area under
the ROC curve of entropy as an OOD score says how well the two are told apart (0.5: not
at all, 1: perfectly).

Run: `python examples/calibration_ood.py [--epochs 20] [--figures DIR]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyro

import pyro_bqn
from pyro_bqn.data import load_digits, shifted_images
from pyro_bqn.diagnostics import (
    calibration_report,
    entropy_histogram,
    ood_auroc,
    predictive_entropy,
    reliability_diagram,
    save_figure,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--figures", type=Path, help="directory for the PNG figures")
    args = parser.parse_args()

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = load_digits()
    model = pyro_bqn.QuantizedMLP([data.num_features, 128, data.num_classes])
    guide = pyro_bqn.AutoQuantizedGuide(model)
    pyro_bqn.fit(
        model, guide, data.x_train, data.y_train, epochs=args.epochs, kl_weight=1e-2, progress=False
    )

    probs = pyro_bqn.predict(model, guide, data.x_test)
    report = calibration_report(probs, data.y_test)
    print("test set: " + ", ".join(f"{k} {v:.3f}" for k, v in report.items()))

    entropies = {"test images": predictive_entropy(probs)}
    for shift in ("rotate90", "invert"):
        x_shifted, _ = shifted_images(data, shift)
        entropies[shift] = predictive_entropy(pyro_bqn.predict(model, guide, x_shifted))
    print("\npredictive entropy (nats; uniform over 10 classes: 2.303)")
    for name, entropy in entropies.items():
        print(f"{name:>12}: median {entropy.median():.3f}, mean {entropy.mean():.3f}")
    for shift in ("rotate90", "invert"):
        auroc = ood_auroc(entropies["test images"], entropies[shift])
        print(f"OOD AUROC, test images vs {shift}: {auroc:.3f}")

    if args.figures:
        save_figure(
            reliability_diagram(probs, data.y_test), args.figures / "calibration_reliability.png"
        )
        histogram = entropy_histogram(entropies, num_classes=data.num_classes)
        save_figure(histogram, args.figures / "calibration_entropy.png")


if __name__ == "__main__":
    main()
