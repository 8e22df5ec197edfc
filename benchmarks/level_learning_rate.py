"""Does a faster learning rate for the learned levels make them beat uniform ones?

Trains the 2-bit 784-512-256-10 sign network of docs/quantization.md (``pyro-bqn fit
--epochs 12 --mc-samples 0 --levels learnable:2bit``, plus any ``--fit`` options) on the
embedded MNIST subset, once per seed, with every level parameter (each layer's
``levels.first`` and ``levels.raw_gaps``) at ``--scale`` times the learning rate of the
rest. ``fit`` gives every parameter one learning rate, so this script hands it Pyro's
per-parameter form of the same optimiser (``optim_args`` as a function of the parameter's
name) for the duration of the run. Prints each seed's test error, NLL and learned levels,
and their mean and standard deviation; each run's files land in
``runs/level-lr/scale-<s>-seed-<seed>/``.

    python benchmarks/level_learning_rate.py [--scale 5] [--seeds 0,1,2] [--fit "--prior ..."]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
from pathlib import Path
from unittest import mock

import pyro.optim
import torch

from pyro_bqn.cli import main as pyro_bqn_main


def level_scaled_exponential_lr(scale: float):
    """``pyro.optim.ExponentialLR`` whose parameters named ``...levels...`` get ``scale``
    times the learning rate."""

    def build(args: dict, clip_args: dict | None = None) -> pyro.optim.PyroLRScheduler:
        base = dict(args["optim_args"])

        def per_parameter(module_name: str, param_name: str) -> dict:
            is_level = "levels" in f"{module_name}.{param_name}"
            return {**base, "lr": base["lr"] * (scale if is_level else 1.0)}

        return pyro.optim.PyroLRScheduler(
            torch.optim.lr_scheduler.ExponentialLR,
            {**args, "optim_args": per_parameter},
            clip_args,
        )

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--seeds", default="0,1,2", help="two or more, comma-separated")
    parser.add_argument("--fit", default="", help="more pyro-bqn fit options, quoted")
    parser.add_argument("--output", type=Path, default=Path("runs/level-lr"))
    args = parser.parse_args()
    errors, nlls = [], []
    for seed in args.seeds.split(","):
        out = args.output / f"scale-{args.scale:g}-seed-{seed}"
        command = ["fit", "--epochs", "12", "--mc-samples", "0", "--levels", "learnable:2bit"]
        command += ["--seed", seed, "--output", str(out), "--overwrite", "--no-progress"]
        optimiser = level_scaled_exponential_lr(args.scale)
        with mock.patch.object(pyro.optim, "ExponentialLR", optimiser):
            if pyro_bqn_main(command + shlex.split(args.fit)) != 0:
                raise SystemExit(f"pyro-bqn fit failed for seed {seed}")
        metrics = json.loads((out / "metrics.json").read_text())
        errors.append(metrics["test"]["error"])
        nlls.append(metrics["test"]["nll"])
        levels = metrics["learned_levels"]
        print(f"seed {seed}: error {errors[-1]:.4f}, NLL {nlls[-1]:.4f}, levels {levels}")
    print(
        f"level lr x{args.scale:g} over seeds {args.seeds}: "
        f"error {statistics.mean(errors):.4f} ± {statistics.stdev(errors):.4f}, "
        f"NLL {statistics.mean(nlls):.4f} ± {statistics.stdev(nlls):.4f}"
    )


if __name__ == "__main__":
    main()
