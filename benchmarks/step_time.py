"""Median SVI step time of a ternary BQN against a float MLP of the same shape.

A 784-512-512-10 network (batch norm + sign activations, ternary weights) trained with
``DeterministicELBO`` against a float PyTorch MLP (Linear/BatchNorm/ReLU, Adam), both on
batches of 100, measured in the same run. Prints the medians and their ratio (target <= 4:
three matrix products per layer make about 3 the floor).

    python benchmarks/step_time.py [--steps 50] [--threads 2]

Both optimisers are torch's fused Adam, so the comparison is of the networks, not of
optimiser implementations. The two steps are timed in alternation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI

from pyro_bqn.baselines import float_mlp
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO
from pyro_bqn.models import QuantizedMLP

SIZES = (784, 512, 512, 10)
BATCH = 100


def interleaved_medians(
    steps: dict[str, Callable[[], object]], rounds: int, warmup: int = 5
) -> dict[str, float]:
    """Median seconds per step of each function, timed in alternation so that both see the
    same machine conditions (on a shared 2-core VM, speed drifts by 30% between runs)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bqn_step(x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    pyro.clear_param_store()
    model = QuantizedMLP(SIZES)
    guide = AutoQuantizedGuide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2, "fused": True}), DeterministicELBO())
    return lambda: svi.step(x, y, num_data=60_000)


def float_step(x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    model = float_mlp(SIZES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def step() -> float:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    x, y = torch.randn(BATCH, SIZES[0]), torch.randint(0, SIZES[-1], (BATCH,))
    medians = interleaved_medians({"bqn": bqn_step(x, y), "float": float_step(x, y)}, args.steps)
    bqn, base = medians["bqn"], medians["float"]
    print(f"network {'-'.join(map(str, SIZES))}, batch {BATCH}, threads {args.threads}")
    print(f"float MLP (Adam)          median step {base * 1e3:8.2f} ms")
    print(f"ternary BQN (Det. ELBO)   median step {bqn * 1e3:8.2f} ms")
    print(f"ratio BQN / float         {bqn / base:8.2f}  (target <= 4.0)")


if __name__ == "__main__":
    main()
