"""The headline benchmark: the sampling-free BQN against the methods of the papers it
implements, on one architecture (an MLP or a LeNet-style CNN).

Each method is one :class:`Method` entry of :data:`METHODS`: what it trains, how it
predicts, how its size is counted, the settings it runs with and the knobs ``--tune``
sweeps. Every method trains the same :class:`~pyro_bqn.architectures.Architecture` on the
same split and is scored on the test set by
:func:`~pyro_bqn.diagnostics.calibration_report`; results are aggregated as mean ±
standard deviation over seeds and written as JSON, a Markdown table and a plot.

**Settings.** A method's settings (its learning rate and one or two key knobs) are the
defaults recorded in its entry, chosen by :func:`tune` on a validation split carved from
the training data (never the test split), or chosen afresh by ``pyro-bqn bench --tune``.
``bench.md`` lists the settings each row used.

Adding a method means adding one entry to :data:`METHODS`.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyro
import torch
from matplotlib.figure import Figure
from pyro.infer import Trace_ELBO

from pyro_bqn import baselines
from pyro_bqn.architectures import TORCH_LAYERS, Architecture
from pyro_bqn.atomic_files import write_text
from pyro_bqn.data import Dataset
from pyro_bqn.devices import resolve_device
from pyro_bqn.diagnostics import calibration_report, nll, save_figure
from pyro_bqn.export import export_network
from pyro_bqn.infer import (
    AutoQuantizedGuide,
    ScaleLatentsMessenger,
    fit,
    most_probable_sparsity,
    predict,
    predict_by_sampling,
    zero_share,
)
from pyro_bqn.levels import LevelSet, learnable
from pyro_bqn.models import QuantizedClassifier
from pyro_bqn.nn import RelaxedSign
from pyro_bqn.priors import SpikeAndSlabPrior
from pyro_bqn.results import markdown_table

__all__ = [
    "BenchConfig",
    "METHODS",
    "Method",
    "MethodRun",
    "Trained",
    "run_method",
    "summarise",
    "tune",
    "write_report",
]


@dataclass(frozen=True)
class BenchConfig:
    """What every method shares. ``kl_weight`` tempers the Bayesian methods alike;
    ``settings`` overrides a method's recorded settings (``{method: {knob: value}}``, e.g.
    from :func:`tune`)."""

    architecture: Architecture
    levels: LevelSet
    epochs: int = 12
    batch_size: int = 100
    kl_weight: float = 1e-3
    mc_particles: int = 5
    predictive_samples: int = 20
    ensemble_members: int = 5
    prior: Any = None
    settings: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    progress: bool = False
    device: str = "cpu"
    """Where every method trains and predicts (``pyro-bqn bench --device``), a name
    :func:`pyro_bqn.devices.resolve_device` accepts; the data move there once."""

    @property
    def bits_per_weight(self) -> int:
        return max(1, math.ceil(math.log2(self.levels.num_levels)))


@dataclass
class Trained:
    """What a method's trainer returns: test probabilities ``(N_test, C)``, training
    seconds, the test-NLL curve ``[(seconds, NLL)]`` per epoch where recorded, the share
    of zero weights of the network it would deploy (``None`` where weights cannot be
    zero) and the bytes that network stores beyond its quantized weights."""

    probs: torch.Tensor
    seconds: float
    curve: list[tuple[float, float]] = field(default_factory=list)
    sparsity: float | None = None
    extra_bytes: int = 0
    """Storage beyond ``bits_per_weight`` per weight, e.g. full-precision outliers."""


Trainer = Callable[[BenchConfig, Dataset, int, Mapping[str, float]], Trained]


@dataclass(frozen=True)
class Method:
    """One row of the benchmark.

    :param paper: the method's paper (and what is deployed), for ``bench.md``.
    :param train: ``train(config, data, seed, settings) -> Trained``.
    :param bits_per_weight: bits each stored weight takes when deployed.
    :param copies: how many networks are stored (an ensemble's members).
    :param defaults: settings per architecture kind (``"mlp"``, ``"cnn"``), chosen on a
        validation split (see :func:`tune`; the command is in ``docs/benchmarks.md``).
    :param grid: values of each knob that :func:`tune` tries.
    """

    paper: str
    train: Trainer
    bits_per_weight: Callable[[BenchConfig], float]
    defaults: Mapping[str, Mapping[str, float]]
    grid: Mapping[str, Sequence[float]]
    copies: Callable[[BenchConfig], int] = lambda config: 1

    def settings(self, name: str, config: BenchConfig) -> dict[str, float]:
        """The settings this method runs with under ``config``."""
        return {**self.defaults[config.architecture.kind], **config.settings.get(name, {})}


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
    sparsity: float | None = None
    settings: dict[str, float] = field(default_factory=dict)


def _common(config: BenchConfig, seed: int) -> dict:
    return {
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "seed": seed,
        "progress": config.progress,
        "device": config.device,
    }


def _timed(train: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = train()
    return result, time.perf_counter() - start


def _nll_curve(data: Dataset, probs_fn: Callable[[], torch.Tensor]):
    """An epoch callback recording (cumulative training seconds, test NLL)."""
    curve: list[tuple[float, float]] = []
    elapsed = [0.0]

    def record(epoch: int, metrics: dict) -> None:
        elapsed[0] += metrics["seconds"]
        curve.append((elapsed[0], nll(probs_fn(), data.y_test).item()))

    return curve, record


def _fresh_store(seed: int) -> None:
    """An empty param store and seeded generators, before a Pyro model is built."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)


def _fit_posterior(config: BenchConfig, data: Dataset, seed: int, settings, model, guide, **kw):
    """Train a Pyro model and guide with :func:`~pyro_bqn.fit` at the settings' learning
    rate and the shared KL weight; return the training seconds."""
    history = fit(
        model,
        guide,
        data.x_train,
        data.y_train,
        lr=settings["lr"],
        kl_weight=config.kl_weight,
        **kw,
        **_common(config, seed),
    )
    return sum(h["seconds"] for h in history)


def _most_probable_network(model, guide, data: Dataset):
    """The most probable network, with batch-norm statistics re-estimated for it."""
    return export_network(model, guide, data.x_train[:2], batch_norm_data=data.x_train)


def _bqn(config: BenchConfig, data: Dataset, seed: int, settings, *, sampled: bool) -> Trained:
    """The same Pyro model and guide; sampling-free (DeterministicELBO) or MC-ELBO."""
    _fresh_store(seed)
    model = QuantizedClassifier(config.architecture, config.levels, prior=config.prior)
    guide = AutoQuantizedGuide(model)
    if sampled:
        guide.temperature = settings["temperature"]
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
    seconds = _fit_posterior(
        config, data, seed, settings, train_model, train_guide, elbo=elbo, callback=record
    )
    return Trained(probs(), seconds, curve, most_probable_sparsity(guide))


def _local_reparameterization(config: BenchConfig, data: Dataset, seed: int, settings) -> Trained:
    """Roth et al.: sampled relaxed signs and logits in training, the most probable network
    (with batch-norm statistics of its own) deployed."""
    _fresh_store(seed)
    model = QuantizedClassifier(config.architecture, config.levels, "sign-lr", config.prior)
    for module in model.modules():  # the relaxation temperature is one of the settings
        if isinstance(module, RelaxedSign):
            module.temperature = settings["temperature"]
    guide = AutoQuantizedGuide(model)
    seconds = _fit_posterior(config, data, seed, settings, model, guide)
    probs = _most_probable_network(model, guide, data).run(model, data.x_test)
    return Trained(probs, seconds, [], most_probable_sparsity(guide))


def _chien(config: BenchConfig, data: Dataset, seed: int, settings) -> Trained:
    """Chien et al.: per-layer learnable levels (starting at ``config.levels``), a multiple
    spike-and-slab prior and a spike-and-slab posterior; the most probable network keeps
    its outliers at full precision."""
    _fresh_store(seed)
    levels = learnable(config.levels.values.detach())
    prior = SpikeAndSlabPrior(slab_prob=settings["slab_prob"])
    model = QuantizedClassifier(config.architecture, levels, prior=prior)
    guide = AutoQuantizedGuide(model, posterior="spike-and-slab")
    seconds = _fit_posterior(config, data, seed, settings, model, guide)
    network = _most_probable_network(model, guide, data)
    outliers = sum(site.outlier_nbytes for site in network.quantized.values())
    probs = predict(model, guide, data.x_test)
    return Trained(probs, seconds, [], most_probable_sparsity(guide), outliers)


def _train_network(config: BenchConfig, data: Dataset, seed: int, settings, build, train):
    """Build a plain network with ``build(config)`` (torch seeded with ``seed``) and train
    it with ``train(model, x, y, lr=..., epochs=..., ...)``; return it and the seconds."""

    def run():
        torch.manual_seed(seed)
        model = build(config)
        train(model, data.x_train, data.y_train, lr=settings["lr"], **_common(config, seed))
        return model

    return _timed(run)


def _ste(config: BenchConfig, data: Dataset, seed: int, settings) -> Trained:
    model, seconds = _train_network(
        config,
        data,
        seed,
        settings,
        lambda c: baselines.ste_network(
            c.architecture, c.levels.values, learn_output_scale=bool(settings["learned_scale"])
        ),
        baselines.train_ste,
    )
    weights = baselines.export_quantized_weights(model).values()
    return Trained(baselines.predict_proba(model, data.x_test), seconds, [], zero_share(weights))


def _eqnn(config: BenchConfig, data: Dataset, seed: int, settings) -> Trained:
    ensemble, seconds = _timed(
        lambda: baselines.fit_ensemble(
            data.x_train,
            data.y_train,
            config.architecture,
            config.levels.values,
            num_members=config.ensemble_members,
            learn_output_scale=bool(settings["learned_scale"]),
            lr=settings["lr"],
            **_common(config, seed),
        )
    )
    weights = [
        weight
        for member in ensemble.members
        for weight in baselines.export_quantized_weights(member).values()
    ]
    return Trained(baselines.predict_proba(ensemble, data.x_test), seconds, [], zero_share(weights))


def _bayesbinn(config: BenchConfig, data: Dataset, seed: int, settings) -> Trained:
    torch.manual_seed(seed)
    model = baselines.bayesbinn_network(config.architecture, device=data.x_train.device)
    optimizer, seconds = _timed(
        lambda: baselines.train_bayesbinn(
            model,
            data.x_train,
            data.y_train,
            kl_weight=config.kl_weight,
            **settings,
            **_common(config, seed),
        )
    )
    probs = baselines.bayesbinn_predict_proba(
        model, optimizer, data.x_test, num_samples=config.predictive_samples, seed=seed
    )
    return Trained(probs, seconds)


def _binarized(config: BenchConfig, data: Dataset, seed: int, settings) -> Trained:
    model, seconds = _train_network(
        config,
        data,
        seed,
        settings,
        lambda c: baselines.binarized_network(c.architecture),
        baselines.train_binarized,
    )
    return Trained(baselines.predict_proba(model, data.x_test), seconds)


def _float(config: BenchConfig, data: Dataset, seed: int, settings) -> Trained:
    model, seconds = _train_network(
        config,
        data,
        seed,
        settings,
        lambda c: baselines.Network(c.architecture, TORCH_LAYERS),
        baselines.train,
    )
    return Trained(baselines.predict_proba(model, data.x_test), seconds)


def _gaussian(config: BenchConfig, data: Dataset, seed: int, settings) -> Trained:
    (model, guide), seconds = _timed(
        lambda: baselines.train_gaussian_bnn(
            data.x_train,
            data.y_train,
            config.architecture,
            kl_weight=config.kl_weight,
            lr=settings["lr"],
            **_common(config, seed),
        )
    )
    probs = baselines.gaussian_bnn_predict_proba(
        model, guide, data.x_test, num_samples=config.predictive_samples, seed=seed
    )
    return Trained(probs, seconds)


def _quantized_bits(config: BenchConfig) -> int:
    return config.bits_per_weight


_LR_GRID = {"lr": (3e-3, 1e-2, 3e-2, 1e-1)}
#: Straight-through networks also choose whether their logit scale is learned (1) or kept at
#: its initial ``1 / sqrt(fan_in)`` (0): learned, it can make the network overconfident.
_STE_GRID = {**_LR_GRID, "learned_scale": (0.0, 1.0)}

#: name -> method. Defaults were chosen by ``tune`` on a 20 % validation split of the
#: training data (the command and table are in docs/benchmarks.md).
METHODS: dict[str, Method] = {
    "bqn": Method(
        paper="sampling-free BQN (Su et al., Bayesian quantized networks): DeterministicELBO, "
        "analytic predictive",
        train=lambda c, d, s, k: _bqn(c, d, s, k, sampled=False),
        bits_per_weight=_quantized_bits,
        defaults={"mlp": {"lr": 0.1}, "cnn": {"lr": 0.1}},
        grid={"lr": (0.03, 0.1, 0.3)},
    ),
    "mc-elbo": Method(
        paper="the same model, relaxed (Gumbel-softmax) guide, Trace_ELBO, sampled predictive",
        train=lambda c, d, s, k: _bqn(c, d, s, k, sampled=True),
        bits_per_weight=_quantized_bits,
        defaults={"mlp": {"lr": 0.1, "temperature": 1.0}, "cnn": {"lr": 0.1, "temperature": 1.0}},
        grid={"lr": (0.03, 0.1, 0.3), "temperature": (0.5, 1.0)},
    ),
    "lr-discrete": Method(
        paper="Roth et al. (ECML PKDD 2019): local reparameterization, relaxed sign samples; "
        "most probable network",
        train=_local_reparameterization,
        bits_per_weight=_quantized_bits,
        defaults={"mlp": {"lr": 0.1, "temperature": 0.5}, "cnn": {"lr": 0.1, "temperature": 0.5}},
        grid={"lr": (0.03, 0.1, 0.3), "temperature": (0.5, 1.0)},
    ),
    "chien": Method(
        paper="Chien et al. (Bayesian asymmetric quantized networks): learned per-layer "
        "levels, multiple spike-and-slab prior and posterior, analytic predictive",
        train=_chien,
        bits_per_weight=_quantized_bits,
        # Not tuned: lr as the BQN's, slab_prob as measured in docs/quantization.md.
        defaults={
            "mlp": {"lr": 0.1, "slab_prob": 0.01},
            "cnn": {"lr": 0.1, "slab_prob": 0.01},
        },
        grid={"lr": (0.03, 0.1), "slab_prob": (0.01, 0.05)},
    ),
    "ste": Method(
        paper="straight-through quantized network (BinaryConnect / Hubara et al. weights)",
        train=_ste,
        bits_per_weight=_quantized_bits,
        defaults={
            "mlp": {"lr": 1e-2, "learned_scale": 0.0},
            "cnn": {"lr": 3e-2, "learned_scale": 0.0},
        },
        grid=_STE_GRID,
    ),
    "binarized": Method(
        paper="Binarized Neural Networks (Hubara et al. 2016): binary weights and activations",
        train=_binarized,
        bits_per_weight=lambda c: 1,
        defaults={"mlp": {"lr": 1e-2}, "cnn": {"lr": 1e-2}},
        grid=_LR_GRID,
    ),
    "e-qnn": Method(
        paper="E-QNN: bootstrap ensemble of straight-through quantized networks",
        train=_eqnn,
        bits_per_weight=_quantized_bits,
        copies=lambda c: c.ensemble_members,
        defaults={
            "mlp": {"lr": 3e-2, "learned_scale": 0.0},
            "cnn": {"lr": 1e-1, "learned_scale": 1.0},
        },
        grid=_STE_GRID,
    ),
    "bayesbinn": Method(
        paper="BayesBiNN (Meng et al. 2020): Bayesian learning rule for binary weights, "
        "Monte Carlo predictive",
        train=_bayesbinn,
        bits_per_weight=lambda c: 1,
        # The authors' MNIST setting (their scale, tau 1e-10, |lambda| 10 at the start, cosine
        # decay); the learning rate barely matters there (flat from 1e-4 to 1e-1 on the
        # validation split), so the grid is short.
        defaults={"mlp": {"lr": 1e-4}, "cnn": {"lr": 1e-4}},
        grid={"lr": (1e-4, 1e-2)},
    ),
    "float": Method(
        paper="full-precision network (ReLU, Adam)",
        train=_float,
        bits_per_weight=lambda c: 32,
        defaults={"mlp": {"lr": 1e-3}, "cnn": {"lr": 1e-3}},
        grid={"lr": (3e-4, 1e-3, 3e-3)},
    ),
    "gaussian-bnn": Method(
        paper="Gaussian mean-field BNN (Bayes by backprop), Monte Carlo predictive",
        train=_gaussian,
        bits_per_weight=lambda c: 64,
        defaults={"mlp": {"lr": 3e-3}, "cnn": {"lr": 3e-3}},
        grid={"lr": (1e-3, 3e-3, 1e-2)},
    ),
}


def run_method(name: str, config: BenchConfig, data: Dataset, seed: int) -> MethodRun:
    """Train method ``name`` with ``seed`` and score it on ``data``'s test split."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    method = METHODS[name]
    settings = method.settings(name, config)
    data = data.to(resolve_device(config.device))
    trained = method.train(config, data, seed, settings)
    bits = method.bits_per_weight(config)
    weight_bytes = config.architecture.num_weights * bits * method.copies(config) / 8
    size_kib = (weight_bytes + trained.extra_bytes) / 1024
    metrics = calibration_report(trained.probs, data.y_test, num_bins=15)
    return MethodRun(
        name,
        seed,
        metrics,
        trained.seconds,
        bits,
        size_kib,
        trained.curve,
        trained.sparsity,
        settings,
    )


def validation_view(data: Dataset) -> Dataset:
    """``data`` with its validation split as the test split, for tuning.

    :raises ValueError: if the validation split is empty (load with ``val_fraction > 0``).
    """
    if data.x_val.shape[0] == 0:
        raise ValueError("tuning needs a validation split: load the data with val_fraction > 0")
    return replace(data, x_test=data.x_val, y_test=data.y_val)


def tune(
    name: str, config: BenchConfig, data: Dataset, seed: int = 0
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Choose method ``name``'s settings from its grid by validation NLL.

    Each point of the grid (all combinations of the knobs' values) trains on the training
    split and is scored on the validation split (:func:`validation_view`), never on the
    test split.

    :returns: the chosen settings and one row per point (its settings, ``val_nll``,
        ``val_error``).
    """
    method = METHODS[name]
    view = validation_view(data)
    knobs = list(method.grid)
    rows = []
    for values in itertools.product(*(method.grid[k] for k in knobs)):
        point = {**method.settings(name, config), **dict(zip(knobs, values, strict=True))}
        trial = replace(config, settings={**config.settings, name: point})
        run = run_method(name, trial, view, seed)
        rows.append({**point, "val_nll": run.metrics["nll"], "val_error": run.metrics["error"]})
    best = min(rows, key=lambda row: row["val_nll"])
    return {k: best[k] for k in method.settings(name, config)}, rows


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
        if mine[0].sparsity is not None:
            values["sparsity"] = [run.sparsity for run in mine]
        for key, series in values.items():
            row[key] = statistics.fmean(series)
            row[f"{key}_std"] = statistics.stdev(series) if len(series) > 1 else 0.0
        row["bits_per_weight"] = mine[0].bits_per_weight
        row["size_kib"] = mine[0].size_kib
        row["settings"] = mine[0].settings
        rows.append(row)
    return rows


def _mean_std(row: Mapping[str, object], key: str, digits: int = 4) -> str:
    if key not in row:
        return "n/a"
    return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"


def _markdown(rows: list[dict[str, object]], title: str) -> str:
    table = markdown_table(
        [
            "method",
            "test error",
            "NLL",
            "ECE (15 bins)",
            "Brier",
            "sparsity",
            "train time (s)",
            "bits/weight",
            "weights (KiB)",
        ],
        [
            [
                str(r["method"]),
                _mean_std(r, "error"),
                _mean_std(r, "nll"),
                _mean_std(r, "ece"),
                _mean_std(r, "brier"),
                _mean_std(r, "sparsity", 3),
                _mean_std(r, "train_seconds", 1),
                str(r["bits_per_weight"]),
                f"{r['size_kib']:.1f}",
            ]
            for r in rows
        ],
    )
    settings = markdown_table(
        ["method", "settings", "paper"],
        [
            [
                str(r["method"]),
                ", ".join(f"{k}={v:g}" for k, v in r["settings"].items()),
                METHODS[str(r["method"])].paper,
            ]
            for r in rows
        ],
    )
    return f"# {title}\n\n{table}\n## Settings\n\n{settings}"


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
    runs: Sequence[MethodRun],
    output: Path,
    config: BenchConfig,
    dataset: str,
    tuning: Mapping[str, list[dict[str, float]]] | None = None,
) -> list[dict[str, object]]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``output``; return the rows.

    :param tuning: per method, the rows of :func:`tune` when the settings were tuned now.
    """
    rows = summarise(runs)
    architecture = config.architecture
    payload = {
        "dataset": dataset,
        "config": {
            "architecture": asdict(architecture),
            "levels": config.levels.values.tolist(),
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "kl_weight": config.kl_weight,
            "mc_particles": config.mc_particles,
            "predictive_samples": config.predictive_samples,
            "ensemble_members": config.ensemble_members,
        },
        "summary": rows,
        "runs": [asdict(run) for run in runs],
        "tuning": dict(tuning or {}),
    }
    write_text(output / "bench.json", json.dumps(payload, indent=2))
    num_seeds = len({run.seed for run in runs})
    shape = f"{architecture.kind} {'-'.join(map(str, architecture.sizes))}"
    if architecture.kind == "cnn":
        shape = f"cnn {architecture.hidden} on {architecture.input_shape}"
    title = f"{dataset}, {shape}, {config.epochs} epochs, {num_seeds} seeds"
    write_text(output / "bench.md", _markdown(rows, title))
    save_figure(_plot(rows, runs), output / "bench.png")
    return rows
