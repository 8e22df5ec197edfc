"""The headline benchmark: the sampling-free BQN against its peers on one architecture.

Every method trains the same ``sizes`` network on the same split and is scored on the test
set by :func:`~pyro_bqn.diagnostics.calibration_report`. Results are aggregated as
mean ± standard deviation over seeds and written as JSON, a Markdown table and a plot.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyro
import torch
from matplotlib.figure import Figure
from pyro.infer import Trace_ELBO

from pyro_bqn import baselines
from pyro_bqn.atomic_files import write_text
from pyro_bqn.data import Dataset
from pyro_bqn.diagnostics import calibration_report, nll, save_figure
from pyro_bqn.infer import (
    AutoQuantizedGuide,
    ScaleLatentsMessenger,
    fit,
    predict,
    predict_by_sampling,
)
from pyro_bqn.levels import LevelSet
from pyro_bqn.models import QuantizedMLP

__all__ = ["BenchConfig", "MethodRun", "METHODS", "run_method", "summarise", "write_report"]


@dataclass(frozen=True)
class BenchConfig:
    """What every method shares. ``kl_weight`` tempers the Bayesian methods alike; ``lr`` is
    the learning rate of the quantized posterior's logits (BQN and MC-ELBO, which share the
    model and guide); the other baselines keep the rates their own defaults were tuned at."""

    sizes: tuple[int, ...]
    levels: LevelSet
    epochs: int = 12
    batch_size: int = 100
    lr: float = 0.1
    kl_weight: float = 1e-3
    mc_particles: int = 5
    mc_temperature: float = 1.0
    predictive_samples: int = 20
    ensemble_members: int = 5
    progress: bool = False

    @property
    def bits_per_weight(self) -> int:
        return max(1, math.ceil(math.log2(self.levels.num_levels)))

    @property
    def num_weights(self) -> int:
        return sum(a * b for a, b in zip(self.sizes[:-1], self.sizes[1:], strict=False))


@dataclass
class MethodRun:
    """One method trained with one seed. ``curve`` holds ``(training seconds, test NLL)``
    after each epoch where the method records it."""

    method: str
    seed: int
    metrics: dict[str, float]
    train_seconds: float
    bits_per_weight: float
    size_kib: float
    curve: list[tuple[float, float]] = field(default_factory=list)


Trainer = Callable[[BenchConfig, Dataset, int], tuple[torch.Tensor, float, list]]


def _nll_curve(data: Dataset, probs_fn: Callable[[], torch.Tensor]):
    """An epoch callback recording (cumulative training seconds, test NLL)."""
    curve: list[tuple[float, float]] = []
    elapsed = [0.0]

    def record(epoch: int, metrics: dict) -> None:
        elapsed[0] += metrics["seconds"]
        curve.append((elapsed[0], nll(probs_fn(), data.y_test).item()))

    return curve, record


def _bqn(config: BenchConfig, data: Dataset, seed: int, *, sampled: bool):
    """The same Pyro model and guide; sampling-free (DeterministicELBO) or MC-ELBO."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = QuantizedMLP(config.sizes, levels=config.levels)
    guide = AutoQuantizedGuide(model)
    if sampled:
        guide.temperature = config.mc_temperature
        scale = ScaleLatentsMessenger(config.kl_weight)
        elbo = Trace_ELBO(num_particles=config.mc_particles)
        train_model, train_guide = scale(model), ScaleLatentsMessenger(config.kl_weight)(guide)

        def probs():
            return predict_by_sampling(
                model, guide, data.x_test, num_samples=config.predictive_samples
            )
    else:
        elbo, train_model, train_guide = None, model, guide

        def probs():
            return predict(model, guide, data.x_test)

    curve, record = _nll_curve(data, probs)
    history = fit(
        train_model,
        train_guide,
        data.x_train,
        data.y_train,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        elbo=elbo,
        kl_weight=config.kl_weight,
        seed=seed,
        progress=config.progress,
        callback=record,
    )
    return probs(), sum(h["seconds"] for h in history), curve


def _timed(train: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = train()
    return result, time.perf_counter() - start


def _common(config: BenchConfig, seed: int) -> dict:
    return {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "seed": seed,
        "progress": config.progress,
    }


def _ste(config: BenchConfig, data: Dataset, seed: int):
    def train():
        model = baselines.ste_mlp(config.sizes, config.levels.values)
        baselines.train_ste(model, data.x_train, data.y_train, **_common(config, seed))
        return model

    model, seconds = _timed(train)
    return baselines.predict_proba(model, data.x_test), seconds, []


def _eqnn(config: BenchConfig, data: Dataset, seed: int):
    ensemble, seconds = _timed(
        lambda: baselines.fit_ensemble(
            data.x_train,
            data.y_train,
            config.sizes,
            config.levels.values,
            num_members=config.ensemble_members,
            **_common(config, seed),
        )
    )
    return baselines.predict_proba(ensemble, data.x_test), seconds, []


def _bayesbinn(config: BenchConfig, data: Dataset, seed: int):
    # Binary by construction; its learning rate is the one the baseline's tests tuned for
    # a few thousand examples (the reference's 1e-4 assumes 60k and hundreds of epochs).
    model = baselines.bayesbinn_mlp(config.sizes)
    optimizer, seconds = _timed(
        lambda: baselines.train_bayesbinn(
            model,
            data.x_train,
            data.y_train,
            lr=2e-2,
            init_lamda=1.0,
            num_samples=1,
            **_common(config, seed),
        )
    )
    probs = baselines.bayesbinn_predict_proba(
        model, optimizer, data.x_test, num_samples=config.predictive_samples, seed=seed
    )
    return probs, seconds, []


def _float(config: BenchConfig, data: Dataset, seed: int):
    def train():
        model = baselines.float_mlp(config.sizes)
        baselines.train(model, data.x_train, data.y_train, lr=1e-3, **_common(config, seed))
        return model

    model, seconds = _timed(train)
    return baselines.predict_proba(model, data.x_test), seconds, []


def _gaussian(config: BenchConfig, data: Dataset, seed: int):
    (model, guide), seconds = _timed(
        lambda: baselines.train_gaussian_bnn(
            data.x_train,
            data.y_train,
            config.sizes,
            kl_weight=config.kl_weight,
            **_common(config, seed),
        )
    )
    probs = baselines.gaussian_bnn_predict_proba(
        model, guide, data.x_test, num_samples=config.predictive_samples, seed=seed
    )
    return probs, seconds, []


#: name -> (trainer, bits per weight as stored for prediction, number of weight copies)
METHODS: dict[str, tuple[Trainer, Callable[[BenchConfig], float], int | None]] = {
    "bqn": (lambda c, d, s: _bqn(c, d, s, sampled=False), lambda c: c.bits_per_weight, 1),
    "mc-elbo": (lambda c, d, s: _bqn(c, d, s, sampled=True), lambda c: c.bits_per_weight, 1),
    "ste": (_ste, lambda c: c.bits_per_weight, 1),
    "e-qnn": (_eqnn, lambda c: c.bits_per_weight, None),
    "bayesbinn": (_bayesbinn, lambda c: 1, 1),
    "float": (_float, lambda c: 32, 1),
    "gaussian-bnn": (_gaussian, lambda c: 64, 1),
}


def run_method(name: str, config: BenchConfig, data: Dataset, seed: int) -> MethodRun:
    """Train method ``name`` with ``seed`` and score it on ``data``'s test split."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    trainer, bits, copies = METHODS[name]
    probs, seconds, curve = trainer(config, data, seed)
    copies = config.ensemble_members if copies is None else copies
    bits_per_weight = bits(config)
    size_kib = config.num_weights * bits_per_weight * copies / 8 / 1024
    metrics = calibration_report(probs, data.y_test, num_bins=15)
    return MethodRun(name, seed, metrics, seconds, bits_per_weight, size_kib, curve)


def summarise(runs: Sequence[MethodRun]) -> list[dict[str, object]]:
    """Mean and standard deviation over seeds of each method's metrics, one row a method.

    :raises ValueError: if a method was run twice with one seed (the spread over seeds
        would be understated).
    """
    pairs = [(run.method, run.seed) for run in runs]
    repeated = sorted({pair for pair in pairs if pairs.count(pair) > 1})
    if repeated:
        raise ValueError(f"each method must run once per seed; repeated (method, seed): {repeated}")
    rows = []
    for method in dict.fromkeys(run.method for run in runs):
        mine = [run for run in runs if run.method == method]
        row: dict[str, object] = {"method": method, "seeds": [run.seed for run in mine]}
        values = {key: [run.metrics[key] for run in mine] for key in mine[0].metrics}
        values["train_seconds"] = [run.train_seconds for run in mine]
        for key, series in values.items():
            row[key] = statistics.fmean(series)
            row[f"{key}_std"] = statistics.stdev(series) if len(series) > 1 else 0.0
        row["bits_per_weight"] = mine[0].bits_per_weight
        row["size_kib"] = mine[0].size_kib
        rows.append(row)
    return rows


def _markdown(rows: list[dict[str, object]], title: str) -> str:
    header = (
        "| method | test error | NLL | ECE (15 bins) | Brier | train time (s) | bits/weight "
        "| weights (KiB) |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['method']} | {r['error']:.4f} ± {r['error_std']:.4f} "
        f"| {r['nll']:.4f} ± {r['nll_std']:.4f} | {r['ece']:.4f} ± {r['ece_std']:.4f} "
        f"| {r['brier']:.4f} ± {r['brier_std']:.4f} "
        f"| {r['train_seconds']:.1f} ± {r['train_seconds_std']:.1f} "
        f"| {r['bits_per_weight']} | {r['size_kib']:.1f} |"
        for r in rows
    ]
    return f"# {title}\n\n" + header + "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, object]], runs: Sequence[MethodRun]) -> Figure:
    fig = Figure(figsize=(11, 4))
    ax_nll, ax_err, ax_curve = fig.subplots(1, 3)
    names = [str(r["method"]) for r in rows]
    for ax, key, label in ((ax_nll, "nll", "test NLL"), (ax_err, "error", "test error")):
        ax.bar(names, [r[key] for r in rows], yerr=[r[f"{key}_std"] for r in rows], capsize=3)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=45)
    for run in runs:
        if run.curve:
            seconds, values = zip(*run.curve, strict=True)
            ax_curve.plot(seconds, values, marker=".", label=f"{run.method} (seed {run.seed})")
    ax_curve.set_xlabel("training seconds")
    ax_curve.set_ylabel("test NLL after each epoch")
    if ax_curve.lines:
        ax_curve.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_report(
    runs: Sequence[MethodRun], output: Path, config: BenchConfig, dataset: str
) -> list[dict[str, object]]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``output``; return the rows."""
    output.mkdir(parents=True, exist_ok=True)
    rows = summarise(runs)
    settings = {k: v for k, v in asdict(config).items() if k != "levels"}
    settings["levels"] = config.levels.values.tolist()
    payload = {
        "dataset": dataset,
        "config": settings,
        "summary": rows,
        "runs": [asdict(run) for run in runs],
    }
    write_text(output / "bench.json", json.dumps(payload, indent=2))
    num_seeds = len({run.seed for run in runs})
    title = f"{dataset}, {'-'.join(map(str, config.sizes))}, {num_seeds} seeds"
    write_text(output / "bench.md", _markdown(rows, title))
    save_figure(_plot(rows, runs), output / "bench.png")
    return rows
