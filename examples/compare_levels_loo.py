"""Compare binary, ternary and 2-bit quantized classifiers by PSIS-LOO with ArviZ.

Each network is a single quantized linear layer (multinomial logistic regression with
discrete weights) trained with the sampling-free DeterministicELBO. Discrete networks are
then drawn from each variational posterior, and `az.compare` ranks the three by their
PSIS-LOO expected log predictive density (elpd) on the training data.

Read the result with care:

* The draws come from the variational posterior q, not from the true posterior. PSIS-LOO
  assumes posterior draws, so its elpd is an approximation whose quality is unknown
  a priori; the Pareto k values are the warning light. k > 0.7 means the importance
  weights of that observation are too heavy-tailed for the estimate to be trusted.
* A point that every drawn network predicts with float-saturated confidence has the same
  log-likelihood in every draw; ArviZ then reports k = inf although its LOO term is exact.
  They are counted separately below (share of points with k = inf).
* As a check that needs no importance sampling, the held-out log predictive density
  (log of the draws' mean p(y | x, network)) on the test split is printed next to it.

Run: `python examples/compare_levels_loo.py [--dataset digits] [--steps 300] [--figures DIR]`.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import torch
from matplotlib.figure import Figure
from pyro.infer import SVI
from pyro.nn import PyroModule
from scipy.special import logsumexp

from pyro_bqn import levels
from pyro_bqn.data import load_dataset
from pyro_bqn.diagnostics import save_figure, to_inference_data
from pyro_bqn.distributions.moment_likelihoods import MomentCategorical
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO
from pyro_bqn.levels import LevelSet
from pyro_bqn.nn.quantized_linear import QuantizedLinear

LEVEL_SETS = {
    "binary": levels.binary,
    "ternary": levels.ternary,
    "2-bit": lambda: levels.uniform(2),
}


class QuantizedLogisticRegression(PyroModule):
    def __init__(self, in_features: int, num_classes: int, level_set: LevelSet) -> None:
        super().__init__()
        self.fc = QuantizedLinear(in_features, num_classes, levels=level_set)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.fc(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


def held_out_lpd(idata: az.InferenceData) -> float:
    """Mean over test points of `log mean_s p(y_n | network_s)`, in nats."""
    log_lik = idata.log_likelihood["obs"].values.reshape(-1, idata.log_likelihood.sizes["data"])
    return float(np.mean(logsumexp(log_lik, axis=0) - math.log(log_lik.shape[0])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="breast-cancer", choices=["breast-cancer", "digits"])
    parser.add_argument("--steps", type=int, default=300, help="full-batch SVI steps")
    parser.add_argument("--samples", type=int, default=200, help="networks drawn per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figures", type=Path, help="directory for the PNG figure")
    args = parser.parse_args()
    # ArviZ warns about large Pareto k once per call; the table below reports k itself.
    warnings.filterwarnings("ignore", message="Estimated shape parameter of Pareto")

    data = load_dataset(args.dataset)
    print(f"{data.name}: {len(data.y_train)} training and {len(data.y_test)} test points\n")
    train, test = {}, {}
    for name, make_levels in LEVEL_SETS.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        model = QuantizedLogisticRegression(data.num_features, data.num_classes, make_levels())
        guide = AutoQuantizedGuide(model)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), DeterministicELBO())
        for _ in range(args.steps):
            loss = svi.step(data.x_train, data.y_train)
        print(f"{name:>8}: final -ELBO {loss:.1f}")
        # LOO needs the data the posterior was fitted to; the test draws reuse the seed, so
        # both sets of draws are the same networks.
        train[name] = to_inference_data(
            model, guide, data.x_train, data.y_train, num_samples=args.samples, seed=args.seed
        )
        test[name] = to_inference_data(
            model,
            guide,
            data.x_test,
            data.y_test,
            num_samples=args.samples,
            seed=args.seed,
            sites=[],
        )

    print("\naz.compare (PSIS-LOO on the training data, log scale: higher is better)")
    comparison = az.compare(train, ic="loo")
    print(comparison.round(2).to_string())
    if args.figures:
        ax = Figure(figsize=(6, 2.6), layout="constrained").add_subplot()
        az.plot_compare(comparison, ax=ax, insample_dev=False)
        ax.set_title(f"PSIS-LOO on {data.name}: elpd by bit width")
        save_figure(ax.figure, args.figures / "compare_levels_loo.png")

    print("\nPareto k and a held-out check (per data point, nats)")
    print(f"{'model':>8}  {'0.7<k<inf':>9}  {'k = inf':>8}  {'elpd_loo/n':>10}  {'test lpd/n':>10}")
    for name, idata in train.items():
        loo = az.loo(idata, pointwise=True)
        k = loo.pareto_k.values
        print(
            f"{name:>8}  {np.mean((k > 0.7) & np.isfinite(k)):9.1%}  {np.mean(np.isinf(k)):8.1%}  "
            f"{loo.elpd_loo / k.size:10.3f}  {held_out_lpd(test[name]):10.3f}"
        )
    print(
        "\nPSIS-LOO on draws from a variational posterior is an approximation: trust the "
        "ranking only where few k exceed 0.7 and the held-out density agrees."
    )


if __name__ == "__main__":
    main()
