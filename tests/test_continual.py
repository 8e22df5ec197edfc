"""The continual-learning runner and the ``pyro-bqn continual`` command."""

from __future__ import annotations

import json
import math

import pytest

from pyro_bqn.baselines import mlp_architecture
from pyro_bqn.cli import main
from pyro_bqn.continual import METHODS, ContinualConfig, StreamRun, forgetting, run_stream
from pyro_bqn.data import load_digits
from pyro_bqn.data.tasks import task_stream


def test_forgetting_is_the_mean_drop_from_each_earlier_tasks_best():
    accuracy = [[0.9], [0.7, 0.8], [0.5, 0.85, 0.6]]
    # Task 1: best 0.9, last 0.5; task 2: best 0.8, last 0.85 (a gain, counted negative).
    assert forgetting(accuracy) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.85)) / 2)
    run = StreamRun("ste", 0, accuracy, 1.0, {})
    assert run.average_accuracy == pytest.approx((0.5 + 0.85 + 0.6) / 3)
    assert run.learning_accuracy == pytest.approx((0.9 + 0.8 + 0.6) / 3)
    for bad in ([[0.9]], [[0.9], [0.8]]):
        with pytest.raises(ValueError, match="rows of length"):
            forgetting(bad)


@pytest.fixture(scope="module")
def tasks():
    return task_stream(load_digits(), "permuted:2", seed=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_fills_a_lower_triangular_accuracy_matrix(method, tasks):
    config = ContinualConfig(mlp_architecture([64, 16, 10]), epochs=2, batch_size=50)
    run = run_stream(method, config, tasks, seed=0)
    assert [len(row) for row in run.accuracy] == [1, 2]
    assert all(0.0 <= a <= 1.0 for row in run.accuracy for a in row)
    # Two epochs on the digits are enough to beat chance (0.1) on the task just learned.
    assert run.learning_accuracy > 0.3, run.accuracy
    assert math.isfinite(run.forgetting)


def test_run_stream_refuses_bad_input_before_training(tasks):
    config = ContinualConfig(mlp_architecture([64, 16, 10]), evaluate_on="val")
    with pytest.raises(ValueError, match="unknown method"):
        run_stream("ewc", config, tasks, 0)
    with pytest.raises(ValueError, match="at least two tasks"):
        run_stream("ste", config, tasks[:1], 0)
    with pytest.raises(ValueError, match="evaluate_on"):
        ContinualConfig(mlp_architecture([64, 16, 10]), evaluate_on="train")


def test_the_command_writes_json_markdown_and_the_accuracy_matrix_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "continual", "--dataset", "digits", "--tasks", "split:2", "--hidden", "8",
            "--epochs", "1", "--batch-size", "50", "--seeds", "0,1",
            "--methods", "bqn-prior,ste", "--set", "ste:lr=0.01", "--output", str(out),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"continual.json", "continual.md", "continual.png"}
    payload = json.loads((out / "continual.json").read_text())
    assert [row["method"] for row in payload["summary"]] == ["bqn-prior", "ste"]
    assert payload["summary"][1]["settings"] == {"lr": 0.01}
    assert len(payload["runs"]) == 4
    assert payload["config"]["architecture"]["num_classes"] == 2  # the shared two-class head
    assert "forgetting" in (out / "continual.md").read_text()
    assert "average accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argument", "match"),
    [
        (["--tasks", "permuted:1"], "--tasks"),
        (["--tasks", "split:6"], "needs 12 classes"),
        (["--methods", "ewc"], "--methods"),
        (["--set", "ste:momentum=0.9"], "--set"),
        (["--set", "ste:lr=-1"], "positive"),
        (["--seeds", "0,0"], "each value once"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, capsys, argument, match):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["continual", "--dataset", "digits", "--output", str(out), *argument])
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()
