"""Median SVI step time of Bayesian quantized networks against float networks of the same
shape, measured in the same run.

* MLP: a 784-512-512-10 network (batch norm + sign activations, ternary weights) trained
  with ``SVI(model, guide, optim, DeterministicELBO())``, with the optimiser a user would
  pass (``pyro.optim.Adam``) and with :func:`pyro_bqn.infer.fit`'s (fused Adam, clipped,
  with an exponential learning-rate decay), against a float PyTorch MLP
  (Linear/BatchNorm/ReLU, fused Adam).
* By hand: the same objective computed from the library's moment rules with none of Pyro's
  machinery, with and without Pyro's gradient zeroing: the floor of the mathematics.
* CNN: two ``QuantizedConv2d`` blocks (5x5 convolution, batch norm, sign, 2x2 max pooling)
  and one hidden linear layer on 28x28 inputs, against the float CNN of the same shape.

Prints the medians and their ratios (target <= 4: three matrix products per layer make
about 3 the floor)::

    python benchmarks/step_time.py [--steps 40] [--threads 2] [--batch 100]
        [--levels binary] [--device cuda]

``--levels binary`` runs the same networks with two logits per weight instead of three: a
lower bound on what storing ``K - 1`` logits per ternary weight could give.

The networks are timed in alternating blocks of back-to-back steps (see
:func:`interleaved_medians`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI
from pyro.infer.util import zero_grads

from pyro_bqn.architectures import TORCH_LAYERS, Architecture
from pyro_bqn.baselines import float_mlp
from pyro_bqn.distributions import MomentCategorical
from pyro_bqn.distributions.level_statistics import level_statistics
from pyro_bqn.infer import AutoQuantizedGuide, DeterministicELBO
from pyro_bqn.levels import LevelSet, binary, ternary
from pyro_bqn.models import QuantizedClassifier, QuantizedMLP
from pyro_bqn.moments import Moments
from pyro_bqn.nn.batch_norm import batch_norm_moments
from pyro_bqn.nn.quantized_activation import quantized_activation_moments
from pyro_bqn.nn.quantized_layer import propagate

SIZES = (784, 512, 512, 10)
#: The small CNN: conv channels 16 and 32, a dense hidden layer of 128 (LeNet-5 layout).
CNN = Architecture("cnn", (1, 28, 28), 10, (16, 32, 128))
LEVELS = {"ternary": ternary, "binary": binary}
NUM_DATA = 60_000


def interleaved_medians(
    steps: dict[str, Callable[[], object]], rounds: int, block: int = 5, warmup: int = 5
) -> dict[str, float]:
    """Median seconds per step of each function, timed in alternating blocks so that all
    see the same machine conditions (on a shared 2-core VM, speed drifts by 30% between
    runs). Each block runs ``block`` steps back to back, as training does, and the first
    step after a switch is not timed: it pays for the other network having just evicted
    this one's data from the caches (about 1.3 ms here)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            for _ in range(block - 1):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def user_adam() -> pyro.optim.PyroOptim:
    """The optimiser a user would pass to ``SVI``."""
    return pyro.optim.Adam({"lr": 1e-2})


def fit_adam() -> pyro.optim.PyroOptim:
    """:func:`pyro_bqn.infer.fit`'s optimiser: fused Adam, gradients clipped to [-10, 10],
    exponential learning-rate decay."""
    optim_args = {"optimizer": torch.optim.Adam, "optim_args": {"lr": 1e-2, "fused": True}}
    return pyro.optim.ExponentialLR({**optim_args, "gamma": 0.9999}, {"clip_value": 10.0})


def svi_step(
    model: QuantizedClassifier, x: torch.Tensor, y: torch.Tensor, optim: pyro.optim.PyroOptim
) -> Callable[[], float]:
    """One ``SVI(model, guide, optim, DeterministicELBO())`` step per call. Pyro's param
    store is global, so one such network is timed at a time (see :func:`main`)."""
    pyro.clear_param_store()
    guide = AutoQuantizedGuide(model)
    svi = SVI(model, guide, optim, DeterministicELBO())
    return lambda: svi.step(x, y, num_data=NUM_DATA)


def adam_step(
    params: list[torch.Tensor], loss: Callable[[], torch.Tensor], pyro_zeroing: bool = False
) -> Callable[[], float]:
    """One fused-Adam step on ``params`` per call, the way a plain PyTorch loop does it
    (gradients set to ``None`` before each step), or with ``pyro_zeroing`` the way
    :class:`~pyro.infer.SVI` leaves them: replaced by fresh zero tensors after each step,
    into which the next backward pass then adds."""
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)

    def step() -> float:
        if not pyro_zeroing:
            optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        if pyro_zeroing:
            zero_grads(params)
        return value.item()

    return step


def float_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    return adam_step(list(model.parameters()), lambda: F.cross_entropy(model(x), y))


def float_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(OrderedDict(CNN.layers(TORCH_LAYERS)))


def bqn_by_hand_step(
    x: torch.Tensor,
    y: torch.Tensor,
    levels: LevelSet,
    pyro_zeroing: bool = False,
    compile_loss: bool = False,
) -> Callable[[], float]:
    """The same objective computed by hand from the library's moment rules, with none of
    Pyro's machinery (tracing, replay, param store, per-parameter optimiser, zeroed
    gradients): the cost of the mathematics alone, so the difference to :func:`svi_step` is
    the framework's. ``pyro_zeroing`` adds back Pyro's zeroing of gradients alone (see
    :func:`adam_step`), whose cost grows with the number of logits. ``compile_loss`` runs
    the objective through :func:`torch.compile` (Inductor; the kernels stay opaque
    operators, the rest is fused), with Pyro's validation off as a compiled loop would."""
    values, num_levels = levels.values, levels.num_levels
    pairs = list(zip(SIZES[:-1], SIZES[1:], strict=True))
    logits = [
        torch.randn(num_levels, fan_out, fan_in, requires_grad=True) for fan_in, fan_out in pairs
    ]
    norms = [
        (torch.ones(n, requires_grad=True), torch.zeros(n, requires_grad=True)) for n in SIZES[1:-1]
    ]
    bias = torch.zeros(SIZES[-1], requires_grad=True)
    temperature = torch.tensor(SIZES[-2] ** 0.5, requires_grad=True)
    sign_values, sign_threshold = torch.tensor([-1.0, 1.0]), torch.tensor([0.0])
    one = torch.ones(())
    scale = 60_000 / x.shape[0]

    def negative_elbo() -> torch.Tensor:
        h, kl = x, torch.zeros(())
        for index, theta in enumerate(logits):
            stats = level_statistics(theta, values)
            kl = kl + stats.neg_entropy.sum() + math.log(num_levels) * stats.neg_entropy.numel()
            weight = Moments(stats.mean, stats.var, stats.second_moment)
            h = propagate(F.linear, h, weight, feature_dims=1)
            if index < len(norms):
                h = Moments(*batch_norm_moments(h.mean, h.var, *norms[index], eps=1e-5))
                # Sign's outputs are +-1: E[x^2] = 1, which saves the next layer a product.
                sign = quantized_activation_moments(h.mean, h.var, sign_values, sign_threshold)
                h = Moments(*sign, second_moment=one)
        out = Moments((h.mean + bias) / temperature, h.var / temperature.square())
        return kl - scale * MomentCategorical(logits=out).expected_log_prob(y).sum()

    params = [*logits, *(p for pair in norms for p in pair), bias, temperature]
    if compile_loss:
        pyro.enable_validation(False)  # the distributions' argument checks are Python
        negative_elbo = torch.compile(negative_elbo, fullgraph=True)
    return adam_step(params, negative_elbo, pyro_zeroing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per network")
    parser.add_argument("--batch", type=int, default=100, help="the target is for 100")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--levels", choices=sorted(LEVELS), default="ternary")
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    parser.add_argument(
        "--compile", action="store_true", help="add the by-hand step compiled by torch.compile"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_device(args.device)
    levels = LEVELS[args.levels]()
    pyro.set_rng_seed(0)
    x, y = torch.randn(args.batch, SIZES[0]), torch.randint(0, SIZES[-1], (args.batch,))
    mlp = lambda: QuantizedMLP(SIZES, levels=levels)  # noqa: E731
    # Groups timed one after the other, each against its float network timed beside it.
    groups = [
        {
            "BQN MLP, pyro.optim.Adam": lambda: svi_step(mlp(), x, y, user_adam()),
            "by hand": lambda: bqn_by_hand_step(x, y, levels),
            "by hand, Pyro's zeroing": lambda: bqn_by_hand_step(x, y, levels, pyro_zeroing=True),
            "float MLP": lambda: float_step(float_mlp(SIZES), x, y),
        },
        {
            "BQN MLP, fit's optimiser": lambda: svi_step(mlp(), x, y, fit_adam()),
            "float MLP": lambda: float_step(float_mlp(SIZES), x, y),
        },
        {
            "BQN CNN, pyro.optim.Adam": lambda: svi_step(
                QuantizedClassifier(CNN, levels=levels), x, y, user_adam()
            ),
            "float CNN": lambda: float_step(float_cnn(), x, y),
        },
    ]
    if args.compile:  # last: it turns Pyro's validation off for the rest of the process
        compiled = lambda: bqn_by_hand_step(x, y, levels, compile_loss=True)  # noqa: E731
        groups.append(
            {
                "by hand, torch.compile": compiled,
                "by hand": lambda: bqn_by_hand_step(x, y, levels),
                "float MLP": lambda: float_step(float_mlp(SIZES), x, y),
            }
        )
    print(
        f"{args.levels} weights, batch {args.batch}, threads {args.threads}, {args.device}; "
        f"MLP {'-'.join(map(str, SIZES))}, CNN {CNN.hidden}"
    )
    for group in groups:
        steps = {name: make() for name, make in group.items()}
        medians = interleaved_medians(steps, rounds=-(-args.steps // 4), block=5)
        base_name = next(name for name in medians if name.startswith("float"))
        for name, median in medians.items():
            ratio = median / medians[base_name]
            print(f"{name:26s} median step {median * 1e3:8.2f} ms   ratio {ratio:5.2f}")
    print("(ratio: against the float network of the same shape in the same group; target <= 4)")


if __name__ == "__main__":
    main()
