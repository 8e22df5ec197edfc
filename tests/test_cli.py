"""The ``pyro-bqn`` command: arguments checked before any work, results that replace the
previous ones as a whole, a run that resumes bit for bit."""

import functools
import importlib
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_bqn import cli
from pyro_bqn.data import load_dataset

TINY = ["--dataset", "breast-cancer", "--hidden", "6", "--no-progress", "--mc-samples", "0"]


# pyro_bqn.infer.fit is also the name of the function the package exports.
fit_module = importlib.import_module("pyro_bqn.infer.fit")


class TrainingStarted(Exception):
    """Raised by the stand-in for training: the arguments passed every check."""


@pytest.fixture
def no_training(monkeypatch):
    """Arguments are checked before any work: reaching training means all were accepted."""
    cached = functools.cache(load_dataset)
    monkeypatch.setattr(cli, "load_dataset", cached)

    def fit(*args, **kwargs):
        raise TrainingStarted

    monkeypatch.setattr(cli, "fit", fit)
    monkeypatch.setattr("pyro_bqn.bench.run_method", fit)


def _error(argv, capsys) -> str:
    """The one-line message ``pyro-bqn`` exits with (status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("pyro-bqn") and "error" in message
    return message


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--levels", "0bit", "1 <= n <= 8"),
        ("--levels", "64bit", "1 <= n <= 8"),
        ("--levels", "1,nan", "finite"),
        ("--kl-weight", "inf", "must be in"),
        ("--kl-weight", "-1", "must be in"),
        ("--lr", "inf", "must be in"),
        ("--lr", "1e30", "must be in"),
        ("--lr", "0", "must be in"),
        ("--seed", "-1", "must be in"),
        ("--seed", "99999999999999999999", "must be in"),
        ("--hidden", "100000000,100000000", "GiB"),
        ("--num-bins", "100000000000", "must be in"),
        ("--mc-samples", "-3", "must be in"),
        ("--epochs", "1.5", "expected int"),
        ("--arch", "cnn", "needs image inputs"),  # breast-cancer is a table
        ("--prior-zero", "1", "must be below 1"),
        ("--prior-zero", "0", "must be in"),
        ("--prior", "gaussian", "prior must be one of"),
        ("--prior", "spike-and-slab:slab_prob=2", "slab_prob"),
        ("--posterior", "normal", "invalid choice"),
    ],
)
def test_a_bad_argument_is_one_line_before_any_work(
    option, value, expected, tmp_path, capsys, no_training
):
    message = _error(["fit", *TINY, option, value, "--output", str(tmp_path / "run")], capsys)
    assert expected in message
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()


def test_a_zero_prior_needs_a_zero_level_and_a_cnn_three_hidden_sizes(
    tmp_path, capsys, no_training
):
    binary = ["fit", *TINY, "--levels", "binary", "--prior-zero", "0.5"]
    assert "levels that hold 0" in _error([*binary, "--output", str(tmp_path / "a")], capsys)
    cnn = ["fit", *TINY[2:], "--dataset", "digits", "--arch", "cnn", "--hidden", "4,4"]
    assert "(conv1 channels" in _error([*cnn, "--output", str(tmp_path / "b")], capsys)


def test_output_that_is_a_file_or_holds_results_is_refused(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("mine")
    assert "is a file" in _error(["fit", *TINY, "--output", str(tmp_path / "file")], capsys)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    message = _error(["fit", *TINY, "--output", str(tmp_path / "run")], capsys)
    assert "--overwrite" in message
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    with pytest.raises(TrainingStarted):
        cli.main(["fit", *TINY, "--output", str(tmp_path / "run"), "--overwrite"])


@pytest.mark.parametrize(
    ("seeds", "methods", "expected"),
    [
        ("0,0,0", "bqn", "0 more than once"),
        ("0", "bqn", "at least 3 distinct seeds"),
        ("0,1,x", "bqn", "comma-separated integers"),
        ("0,1,-2", "bqn", "must be in"),
        ("0,1,2", "bqn,bqn", "bqn more than once"),
        ("0,1,2", "bqn,nope", "unknown"),
    ],
)
def test_bench_refuses_repeated_or_too_few_seeds_and_methods(
    seeds, methods, expected, tmp_path, capsys, no_training
):
    argv = ["bench", *TINY[:-2], "--seeds", seeds, "--methods", methods]
    message = _error([*argv, "--output", str(tmp_path / "b")], capsys)
    assert expected in message


# Option values a user might type, and some no user would.
_TEXT = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"-?[0-9]{1,25}(\.[0-9]*)?(e-?[0-9]{1,3})?", fullmatch=True),
    st.sampled_from(["nan", "inf", "-inf", "0", "1e308", "ternary", "4bit", "1,2,3", ",", ""]),
)
_OPTIONS = [
    "--levels",
    "--hidden",
    "--epochs",
    "--batch-size",
    "--lr",
    "--kl-weight",
    "--seed",
    "--num-bins",
    "--mc-samples",
    "--activation",
    "--dataset",
    "--prior",
    "--posterior",
]


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(option=st.sampled_from(_OPTIONS), value=_TEXT)
def test_fuzzed_arguments_give_a_one_line_error_or_reach_training(
    option, value, tmp_path, capsys, no_training
):
    output = tmp_path / "fuzz"
    try:
        cli.main(["fit", *TINY, "--epochs", "1", option, value, "--output", str(output)])
    except TrainingStarted:
        pass
    except SystemExit as exit_info:
        assert exit_info.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines and "error" in lines[-1] and "Traceback" not in "".join(lines)
    finally:
        for folder in (output, tmp_path / ".fuzz.partial"):
            if folder.exists():
                for path in folder.iterdir():
                    path.unlink()
                folder.rmdir()


def _fit(output, *extra):
    argv = ["fit", *TINY, "--epochs", "3", "--batch-size", "20", "--output", str(output)]
    cli.main([*argv, *extra])
    return json.loads((output / "metrics.json").read_text())


def test_fit_trains_when_the_last_minibatch_would_hold_one_example(tmp_path):
    # breast-cancer has 341 training examples: 17 * 20 + 1.
    metrics = _fit(tmp_path / "run")
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {
        "metrics.json",
        "summary.md",
        "network.pt",
        "checkpoint.pt",
        "arguments.json",
        "reliability.png",
        "posterior_summary.png",
        "posterior_history.png",
    }


def test_an_interrupted_fit_resumes_to_the_same_parameters_and_metrics(tmp_path, monkeypatch):
    whole = _fit(tmp_path / "whole")
    whole_state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)

    real_save = fit_module.save_checkpoint
    saves = []

    def save_twice_then_interrupt(*args, **kwargs):
        saves.append(1)
        if len(saves) == 3:  # Ctrl-C while the third epoch's checkpoint is written
            raise KeyboardInterrupt
        real_save(*args, **kwargs)

    monkeypatch.setattr(fit_module, "save_checkpoint", save_twice_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        _fit(tmp_path / "parts")
    assert exit_info.value.code == 130
    assert not (tmp_path / "parts").exists()
    monkeypatch.setattr(fit_module, "save_checkpoint", real_save)
    with pytest.raises(SystemExit):  # different arguments are refused
        _fit(tmp_path / "parts", "--resume", "--seed", "3")
    resumed = _fit(tmp_path / "parts", "--resume")
    resumed_state = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)

    for name, value in whole_state["params"].items():
        assert torch.equal(value, resumed_state["params"][name]), name
    for key in ("loss", "expected_log_likelihood", "kl", "lr"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in whole["history"]]
    assert resumed["test"] == whole["test"]
    assert resumed["most_probable_network"] == whole["most_probable_network"]


def test_fit_trains_a_cnn_with_a_zero_favouring_prior_and_reports_its_sparsity(tmp_path):
    argv = ["fit", *TINY[2:], "--dataset", "digits", "--arch", "cnn", "--hidden", "2,4,8"]
    cli.main([*argv, "--epochs", "1", "--prior-zero", "0.9", "--output", str(tmp_path / "c")])
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["architecture"] == "cnn" and metrics["prior"] == "categorical:zero_mass=0.9"
    sparsity = metrics["most_probable_network"]["sparsity"]
    assert 0 <= sparsity <= 1 and metrics["history"][-1]["sparsity"] == sparsity
    assert f"Sparsity of the most probable network: {sparsity:.3f}" in (
        tmp_path / "c" / "summary.md"
    ).read_text()


def test_fit_learns_per_layer_levels_under_chiens_prior_and_posterior(tmp_path):
    argv = ["fit", *TINY, "--epochs", "1", "--levels", "learnable:-1,-0.2,0.4,1.2"]
    argv += ["--prior", "spike-and-slab:slab_prob=0.05", "--posterior", "spike-and-slab"]
    cli.main([*argv, "--output", str(tmp_path / "chien")])
    metrics = json.loads((tmp_path / "chien" / "metrics.json").read_text())
    assert metrics["prior"].startswith("spike-and-slab:slab_prob=0.05")
    assert {"body.1", "body.4"} <= set(metrics["learned_levels"])  # and the Sign, body.3
    summary = (tmp_path / "chien" / "summary.md").read_text()
    assert "Learned levels per layer" in summary and "`body.4`" in summary


def test_prior_and_prior_zero_are_exclusive(tmp_path, capsys, no_training):
    argv = ["fit", *TINY, "--prior", "categorical", "--prior-zero", "0.5"]
    assert "not both" in _error([*argv, "--output", str(tmp_path / "x")], capsys)
