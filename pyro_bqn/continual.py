"""Continual learning on a task stream: every method learns the tasks one after the other,
and after each task is scored on every task seen so far (the accuracy matrix).

Methods (:data:`METHODS`):

* ``bqn-prior`` — the sampling-free BQN, the posterior of each task the prior of the next
  (:func:`pyro_bqn.infer.posterior_as_prior`, with ``strength`` and ``floor``);
* ``bqn-finetune`` — the same network and guide trained task after task with the uniform
  prior every time (plain fine-tuning: the KL pulls towards uniform, not towards the past);
* ``bayesbinn`` — BayesBiNN's continual mode: the natural parameters of each task's
  posterior the prior of the next (:meth:`pyro_bqn.baselines.BayesBiNN.posterior_as_prior_`);
* ``ste`` — a straight-through quantized network fine-tuned task after task.

Each learner keeps one network for the whole stream (a shared output head) and trains
``epochs`` per task. Metrics of one run, from the accuracy matrix ``A[t, j]`` (accuracy on
task ``j`` after training on task ``t``, ``j <= t``) of ``T`` tasks:

* **average accuracy** ``(1/T) sum_j A[T, j]``, over all tasks after the last one;
* **forgetting** ``1/(T-1) sum_{j<T} (max_{j<=t<T} A[t, j] - A[T, j])``, the drop from each
  earlier task's best accuracy (Chaudhry et al., 2018);
* **learning accuracy** ``(1/T) sum_j A[j, j]``, each task just after it was learned (how much
  a strong prior holds the network back).

:func:`run_stream` runs one method with one seed; :func:`write_report` writes
``continual.json``, ``continual.md`` and ``continual.png`` (the mean accuracy matrices).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyro
import torch
from matplotlib.figure import Figure

from pyro_bqn import baselines
from pyro_bqn.architectures import Architecture
from pyro_bqn.atomic_files import write_text
from pyro_bqn.data import Dataset
from pyro_bqn.diagnostics import save_figure
from pyro_bqn.infer import AutoQuantizedGuide, fit, posterior_as_prior, predict
from pyro_bqn.levels import LevelSet, binary
from pyro_bqn.models import QuantizedClassifier
from pyro_bqn.results import markdown_table

__all__ = [
    "METHODS",
    "ContinualConfig",
    "StreamRun",
    "forgetting",
    "run_stream",
    "summarise",
    "write_report",
]

#: Evaluation splits: the test split, or the validation split for choosing settings.
EVALUATION_SPLITS = ("test", "val")


@dataclass(frozen=True)
class ContinualConfig:
    """What every method of a stream shares.

    :param architecture: the network's shape (input size and classes of the tasks).
    :param levels: weight levels of the BQN and STE networks (BayesBiNN's are binary).
    :param epochs: training epochs per task.
    :param kl_weight: ``beta``, the KL weight of both Bayesian methods alike.
    :param strength: the prior's strength (tempering of the previous posterior) of
        ``bqn-prior`` and ``bayesbinn``.
    :param floor: the uniform share of ``bqn-prior``'s categorical priors.
    :param prior: the first task's weight prior of the BQN methods (default uniform).
    :param settings: per method, overrides of :data:`DEFAULT_SETTINGS`.
    :param evaluate_on: ``"test"``, or ``"val"`` to choose settings without the test split.
    :param predictive_samples: networks BayesBiNN's Monte Carlo predictive averages.
    """

    architecture: Architecture
    levels: LevelSet = field(default_factory=binary)
    epochs: int = 5
    batch_size: int = 100
    kl_weight: float = 1e-3
    strength: float = 1.0
    floor: float = 1e-3
    prior: Any = None
    settings: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    evaluate_on: str = "test"
    predictive_samples: int = 10
    progress: bool = False

    def __post_init__(self) -> None:
        if self.evaluate_on not in EVALUATION_SPLITS:
            raise ValueError(
                f"evaluate_on must be one of {EVALUATION_SPLITS}, got {self.evaluate_on!r}"
            )

    def method_settings(self, method: str) -> dict[str, float]:
        """The settings ``method`` runs with: its defaults, then ``settings[method]``."""
        return {**DEFAULT_SETTINGS[method], **self.settings.get(method, {})}


class Learner(Protocol):
    """One network learning a stream: ``learn`` a task (after the ones before), then
    ``predict_proba`` class probabilities ``(N, C)`` of inputs ``(N, D)``."""

    def learn(self, task: Dataset, index: int) -> None: ...

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor: ...


class BQNLearner:
    """The sampling-free BQN; with ``carry_posterior`` the posterior of each task becomes the
    prior of the next, otherwise the prior stays the first one (plain fine-tuning)."""

    def __init__(self, config: ContinualConfig, seed: int, carry_posterior: bool) -> None:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        self.config, self.seed, self.carry_posterior = config, seed, carry_posterior
        self.settings = config.method_settings("bqn-prior" if carry_posterior else "bqn-finetune")
        self.model = QuantizedClassifier(config.architecture, config.levels, prior=config.prior)
        self.guide = AutoQuantizedGuide(self.model)

    def learn(self, task: Dataset, index: int) -> None:
        if index > 0 and self.carry_posterior:
            posterior_as_prior(
                self.model, self.guide, strength=self.config.strength, floor=self.config.floor
            )
        fit(
            self.model,
            self.guide,
            task.x_train,
            task.y_train,
            epochs=self.config.epochs,
            batch_size=self.config.batch_size,
            lr=self.settings["lr"],
            kl_weight=self.config.kl_weight,
            seed=self.seed * 1000 + index,
            progress=False,
        )

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return predict(self.model, self.guide, x)


class BayesBiNNLearner:
    """BayesBiNN, its posterior's natural parameters the prior of the next task."""

    def __init__(self, config: ContinualConfig, seed: int) -> None:
        torch.manual_seed(seed)
        self.config, self.seed = config, seed
        self.settings = config.method_settings("bayesbinn")
        self.model = baselines.bayesbinn_network(config.architecture)
        self.optimizer: baselines.BayesBiNN | None = None

    def learn(self, task: Dataset, index: int) -> None:
        common = {
            "epochs": self.config.epochs,
            "batch_size": self.config.batch_size,
            "seed": self.seed * 1000 + index,
            "progress": False,
        }
        if self.optimizer is None:
            self.optimizer = baselines.train_bayesbinn(
                self.model,
                task.x_train,
                task.y_train,
                kl_weight=self.config.kl_weight,
                **self.settings,
                **common,
            )
            return
        self.optimizer.posterior_as_prior_(self.config.strength)
        baselines.continue_bayesbinn(
            self.model, self.optimizer, task.x_train, task.y_train, **common
        )

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        if self.optimizer is None:
            raise ValueError("learn a task before predicting")
        return baselines.bayesbinn_predict_proba(
            self.model,
            self.optimizer,
            x,
            num_samples=self.config.predictive_samples,
            seed=self.seed,
        )


class STELearner:
    """A straight-through network, fine-tuned task after task (a fresh Adam per task)."""

    def __init__(self, config: ContinualConfig, seed: int) -> None:
        torch.manual_seed(seed)
        self.config, self.seed = config, seed
        self.settings = config.method_settings("ste")
        self.model = baselines.ste_network(config.architecture, config.levels.values)

    def learn(self, task: Dataset, index: int) -> None:
        baselines.train_ste(
            self.model,
            task.x_train,
            task.y_train,
            lr=self.settings["lr"],
            epochs=self.config.epochs,
            batch_size=self.config.batch_size,
            seed=self.seed * 1000 + index,
            progress=False,
        )

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return baselines.predict_proba(self.model, x)


#: name -> (what it is, how to build its learner).
METHODS: dict[str, tuple[str, Callable[[ContinualConfig, int], Learner]]] = {
    "bqn-prior": (
        "sampling-free BQN, each task's posterior the next task's prior",
        lambda config, seed: BQNLearner(config, seed, carry_posterior=True),
    ),
    "bqn-finetune": (
        "sampling-free BQN fine-tuned task after task, uniform prior every task",
        lambda config, seed: BQNLearner(config, seed, carry_posterior=False),
    ),
    "bayesbinn": (
        "BayesBiNN (Meng et al. 2020), continual mode: natural parameters of each task's "
        "posterior the next task's prior",
        BayesBiNNLearner,
    ),
    "ste": ("straight-through quantized network fine-tuned task after task", STELearner),
}

#: Settings per method, chosen on a validation split of permuted MNIST (3 epochs a task,
#: KL weight 1; docs/continual.md has the grid). BayesBiNN runs the reference's
#: continual-learning setting (tau 1e-2, |lambda| 10 at the start, a cosine decay restarted
#: every task) but lr 0.1: at the reference's 1e-3 three epochs a task learn nothing.
DEFAULT_SETTINGS: dict[str, dict[str, float]] = {
    "bqn-prior": {"lr": 0.1},
    "bqn-finetune": {"lr": 0.1},
    "bayesbinn": {"lr": 0.1, "temperature": 1e-2, "init_lamda": 10.0},
    "ste": {"lr": 1e-2},
}


@dataclass
class StreamRun:
    """One method learning the whole stream with one seed. ``accuracy[t][j]`` is the
    accuracy on task ``j`` after learning task ``t`` (``j <= t``)."""

    method: str
    seed: int
    accuracy: list[list[float]]
    train_seconds: float
    settings: dict[str, float]

    @property
    def average_accuracy(self) -> float:
        """Mean accuracy over all tasks after the last one."""
        return statistics.fmean(self.accuracy[-1])

    @property
    def learning_accuracy(self) -> float:
        """Mean accuracy on each task just after learning it."""
        return statistics.fmean(row[-1] for row in self.accuracy)

    @property
    def forgetting(self) -> float:
        """:func:`forgetting` of :attr:`accuracy`."""
        return forgetting(self.accuracy)


def forgetting(accuracy: Sequence[Sequence[float]]) -> float:
    """Mean over the tasks before the last of (best accuracy on it before the last task)
    minus (accuracy on it after the last task); ``accuracy`` is lower-triangular, row ``t``
    holding tasks ``0..t``.

    :raises ValueError: for fewer than two tasks or rows of the wrong length.
    """
    if len(accuracy) < 2 or any(len(row) != t + 1 for t, row in enumerate(accuracy)):
        raise ValueError("accuracy must hold rows of length 1, 2, ..., T for T >= 2 tasks")
    last = accuracy[-1]
    drops = [
        max(accuracy[t][j] for t in range(j, len(accuracy) - 1)) - last[j]
        for j in range(len(accuracy) - 1)
    ]
    return statistics.fmean(drops)


def _accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return (probs.argmax(-1) == y).float().mean().item()


def run_stream(
    method: str,
    config: ContinualConfig,
    tasks: Sequence[Dataset],
    seed: int,
    on_task: Callable[[], None] | None = None,
) -> StreamRun:
    """Train ``method`` on ``tasks`` in order with ``seed``; after each task, score it on
    every task so far (on ``config.evaluate_on``).

    :param on_task: called after each task (e.g. to advance a progress bar).
    :raises ValueError: for an unknown method, fewer than two tasks or an empty split.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if len(tasks) < 2:
        raise ValueError(f"a stream needs at least two tasks, got {len(tasks)}")
    for task in tasks:
        if task.split(config.evaluate_on)[0].shape[0] == 0:
            raise ValueError(
                f"task {task.name} has an empty {config.evaluate_on} split "
                "(load the data with val_fraction > 0 to evaluate on 'val')"
            )
    learner = METHODS[method][1](config, seed)
    accuracy: list[list[float]] = []
    seconds = 0.0
    for index, task in enumerate(tasks):
        start = time.perf_counter()
        learner.learn(task, index)
        seconds += time.perf_counter() - start
        accuracy.append(
            [
                _accuracy(learner.predict_proba(x), y)
                for x, y in (seen.split(config.evaluate_on) for seen in tasks[: index + 1])
            ]
        )
        if on_task is not None:
            on_task()
    return StreamRun(method, seed, accuracy, seconds, config.method_settings(method))


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: Sequence[StreamRun]) -> list[dict[str, Any]]:
    """Per method: mean and standard deviation over seeds of the average accuracy,
    forgetting, learning accuracy and training seconds, and the mean accuracy matrix."""
    rows = []
    for method in dict.fromkeys(run.method for run in runs):
        mine = [run for run in runs if run.method == method]
        row: dict[str, Any] = {"method": method, "seeds": [run.seed for run in mine]}
        for key in ("average_accuracy", "forgetting", "learning_accuracy", "train_seconds"):
            row[key], row[f"{key}_std"] = _mean_std([getattr(run, key) for run in mine])
        row["accuracy"] = [
            [statistics.fmean(run.accuracy[t][j] for run in mine) for j in range(t + 1)]
            for t in range(len(mine[0].accuracy))
        ]
        row["settings"] = mine[0].settings
        rows.append(row)
    return rows


def _cell(row: Mapping[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * row[key]:.{digits}f} ± {scale * row[f'{key}_std']:.{digits}f}"


def _markdown(rows: list[dict[str, Any]], title: str, config: ContinualConfig) -> str:
    table = markdown_table(
        [
            "method",
            "average accuracy (%)",
            "forgetting (points)",
            "learning accuracy (%)",
            "train time (s)",
        ],
        [
            [
                r["method"],
                _cell(r, "average_accuracy"),
                _cell(r, "forgetting"),
                _cell(r, "learning_accuracy"),
                _cell(r, "train_seconds", 1.0),
            ]
            for r in rows
        ],
    )
    lines = [f"# {title}", "", table, "## Accuracy matrices (mean over seeds, %)", ""]
    for r in rows:
        num_tasks = len(r["accuracy"])
        matrix = markdown_table(
            ["after task", *(f"task {j + 1}" for j in range(num_tasks))],
            [
                [str(t + 1), *(f"{100 * a:.1f}" for a in accs), *([""] * (num_tasks - t - 1))]
                for t, accs in enumerate(r["accuracy"])
            ],
        )
        lines += [f"**{r['method']}** — {METHODS[r['method']][0]}", "", matrix]
    settings = markdown_table(
        ["method", "settings"],
        [[r["method"], ", ".join(f"{k}={v:g}" for k, v in r["settings"].items())] for r in rows],
    )
    lines += [
        "## Settings",
        "",
        f"KL weight {config.kl_weight:g} (both Bayesian methods), prior strength "
        f"{config.strength:g}, floor {config.floor:g}, {config.epochs} epochs per task, "
        f"batch size {config.batch_size}, scored on the {config.evaluate_on} split.",
        "",
        settings,
    ]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]]) -> Figure:
    fig = Figure(figsize=(3.2 * len(rows), 3.2))
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    for ax, row in zip(axes, rows, strict=True):
        num_tasks = len(row["accuracy"])
        matrix = torch.full((num_tasks, num_tasks), float("nan"))
        for t, accs in enumerate(row["accuracy"]):
            matrix[t, : t + 1] = torch.tensor(accs)
        ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        for t in range(num_tasks):
            for j in range(t + 1):
                ax.text(j, t, f"{100 * matrix[t, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if matrix[t, j] < 0.6 else "black")
        ticks = range(num_tasks)
        ax.set_xticks(ticks, [str(j + 1) for j in ticks])
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
        ax.set_xlabel("accuracy on task")
        ax.set_ylabel("after training on task")
        ax.set_title(f"{row['method']}: {100 * row['average_accuracy']:.1f}%", fontsize=9)
    fig.tight_layout()
    return fig


def write_report(
    runs: Sequence[StreamRun], output: Path, config: ContinualConfig, title: str
) -> list[dict[str, Any]]:
    """Write ``continual.json``, ``continual.md`` and ``continual.png`` (the mean accuracy
    matrix of every method) into ``output``; return :func:`summarise`'s rows."""
    rows = summarise(runs)
    payload = {
        "title": title,
        "config": {
            "architecture": asdict(config.architecture),
            "levels": config.levels.values.tolist(),
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "kl_weight": config.kl_weight,
            "strength": config.strength,
            "floor": config.floor,
            "evaluate_on": config.evaluate_on,
            "predictive_samples": config.predictive_samples,
        },
        "summary": rows,
        "runs": [
            {
                **asdict(run),
                "average_accuracy": run.average_accuracy,
                "forgetting": run.forgetting,
                "learning_accuracy": run.learning_accuracy,
            }
            for run in runs
        ],
    }
    write_text(output / "continual.json", json.dumps(payload, indent=2))
    write_text(output / "continual.md", _markdown(rows, title, config) + "\n")
    save_figure(_plot(rows), output / "continual.png")
    return rows
