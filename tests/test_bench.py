import re
from pathlib import Path

import pytest
import torch

from pyro_bqn import bench
from pyro_bqn.architectures import Architecture
from pyro_bqn.bench import METHODS, MethodRun, run_method, summarise
from pyro_bqn.data import Dataset
from pyro_bqn.levels import ternary, uniform


def _run(method, seed, error):
    return MethodRun(method, seed, {"error": error}, 1.0, 2, 0.5)


def test_summary_is_over_distinct_seeds():
    rows = summarise([_run("bqn", 0, 0.1), _run("bqn", 1, 0.3), _run("float", 0, 0.2)])
    assert rows[0]["seeds"] == [0, 1]
    assert rows[0]["error"] == pytest.approx(0.2)
    assert rows[0]["error_std"] == pytest.approx(0.1414, abs=1e-4)


def test_a_method_run_twice_with_one_seed_is_refused():
    with pytest.raises(ValueError, match=r"repeated \(method, seed\): \[\('bqn', 0\)\]"):
        summarise([_run("bqn", 0, 0.1), _run("bqn", 0, 0.1), _run("bqn", 1, 0.2)])


def _tiny_data():
    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)

    (xt, yt), (xv, yv), (xs, ys) = split(20), split(10), split(8)
    return Dataset("tiny", 2, (4,), xt, yt, xv, yv, xs, ys, 1.0, torch.zeros(4), torch.ones(4))


def test_tune_picks_the_lowest_validation_nll_and_never_sees_the_test_split(monkeypatch):
    data = _tiny_data()
    seen = []

    def train(config, view, seed, settings):
        seen.append((settings["lr"], view.x_test))
        # Confident and right at lr = 0.1 only.
        right = torch.nn.functional.one_hot(view.y_test, 2).float()
        probs = (
            0.9 * right + 0.05 if settings["lr"] == 0.1 else torch.full((len(view.y_test), 2), 0.5)
        )
        return bench.Trained(probs, 0.0)

    fake = bench.Method(
        "a test method", train, lambda c: 2, {"mlp": {"lr": 0.01}}, {"lr": (0.01, 0.1, 1.0)}
    )
    monkeypatch.setitem(bench.METHODS, "fake", fake)
    config = bench.BenchConfig(Architecture("mlp", (4,), 2, (3,)), ternary())
    chosen, rows = bench.tune("fake", config, data)
    assert chosen == {"lr": 0.1}
    assert [row["lr"] for row in rows] == [0.01, 0.1, 1.0]
    assert all(x is data.x_val for _, x in seen)
    run = bench.run_method("fake", bench.replace(config, settings={"fake": chosen}), data, 0)
    assert run.settings == {"lr": 0.1} and seen[-1][1] is data.x_test


def test_every_method_declares_settings_for_both_architectures_and_a_paper():
    for name, method in METHODS.items():
        assert set(method.defaults) == {"mlp", "cnn"}, name
        assert set(method.grid) <= set(method.defaults["mlp"]), name
        assert method.paper, name


def _tiny_images():
    g = torch.Generator().manual_seed(1)

    def split(n):
        return torch.randn(n, 64, generator=g), torch.randint(0, 3, (n,), generator=g)

    (xt, yt), (xv, yv), (xs, ys) = split(24), split(0), split(6)
    return Dataset(
        "tiny", 3, (1, 8, 8), xt, yt, xv, yv, xs, ys, 1.0, torch.zeros(()), torch.ones(())
    )


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_and_predicts_in_both_architectures(name, kind):
    hidden = (4,) if kind == "mlp" else (2, 2, 4)
    shape = (64,) if kind == "mlp" else (1, 8, 8)
    config = bench.BenchConfig(
        Architecture(kind, shape, 3, hidden),
        ternary(),
        epochs=1,
        batch_size=8,
        mc_particles=1,
        predictive_samples=2,
        ensemble_members=2,
    )
    data = _tiny_images()
    run = run_method(name, config, data, seed=0)
    assert 0 <= run.metrics["error"] <= 1 and run.metrics["nll"] > 0
    weights_kib = (
        config.architecture.num_weights
        * run.bits_per_weight
        * METHODS[name].copies(config)
        / 8
        / 1024
    )
    if name == "chien":  # plus its full-precision outliers
        assert run.size_kib >= weights_kib
    else:
        assert run.size_kib == pytest.approx(weights_kib)
    assert run.sparsity is None or 0 <= run.sparsity <= 1


# --- the method registry ---------------------------------------------------------------------


def test_every_registered_method_is_described_in_the_docs():
    # docs/benchmarks.md has one "- **name** —" entry per method, and no other.
    text = (Path(__file__).parents[1] / "docs" / "benchmarks.md").read_text()
    documented = set(re.findall(r"^- \*\*([a-z-]+)\*\* —", text, flags=re.MULTILINE))
    assert documented == set(METHODS)


def test_papers_are_distinct_and_name_what_they_implement():
    papers = [method.paper for method in METHODS.values()]
    assert len(set(papers)) == len(papers)
    assert "Su et al." in METHODS["bqn"].paper
    assert "Meng et al. 2020" in METHODS["bayesbinn"].paper
    assert "Hubara et al. 2016" in METHODS["binarized"].paper
    assert "Roth et al." in METHODS["lr-discrete"].paper


@pytest.mark.parametrize("name", sorted(METHODS))
def test_defaults_lie_on_the_grid_and_share_their_knobs_across_architectures(name):
    # tune chooses from the grid, so a default off the grid could not have been chosen.
    method = METHODS[name]
    assert set(method.defaults["mlp"]) == set(method.defaults["cnn"])
    for kind in ("mlp", "cnn"):
        for knob, values in method.grid.items():
            assert method.defaults[kind][knob] in values, (kind, knob)
    for knob, values in method.grid.items():
        if knob == "learned_scale":  # a switch: 0 keeps the logit scale fixed, 1 learns it
            assert set(values) == {0.0, 1.0}
        else:
            assert all(value > 0 for value in values), knob


def _config(kind, levels=None, **kwargs):
    hidden = (4,) if kind == "mlp" else (2, 2, 4)
    shape = (64,) if kind == "mlp" else (1, 8, 8)
    architecture = Architecture(kind, shape, 3, hidden)
    return bench.BenchConfig(architecture, levels or ternary(), **kwargs)


def test_settings_are_the_architectures_defaults_overridden_by_the_config():
    method = bench.Method(
        paper="a test method",
        train=lambda *args: None,
        bits_per_weight=lambda c: 1,
        defaults={"mlp": {"lr": 0.1, "decay": 0.5}, "cnn": {"lr": 0.2, "decay": 0.7}},
        grid={"lr": (0.1, 0.2)},
    )
    assert method.settings("m", _config("mlp")) == {"lr": 0.1, "decay": 0.5}
    assert method.settings("m", _config("cnn")) == {"lr": 0.2, "decay": 0.7}
    overridden = _config("cnn", settings={"m": {"lr": 0.3}, "other": {"decay": 9.0}})
    assert method.settings("m", overridden) == {"lr": 0.3, "decay": 0.7}
    assert method.copies(overridden) == 1


def test_bits_and_copies_per_method():
    config = _config("mlp", ensemble_members=3, levels=uniform(2))
    bits = {name: method.bits_per_weight(config) for name, method in METHODS.items()}
    assert bits == {
        "bqn": 2, "mc-elbo": 2, "lr-discrete": 2, "chien": 2, "ste": 2, "e-qnn": 2,
        "binarized": 1, "bayesbinn": 1, "float": 32, "gaussian-bnn": 64,
    }  # fmt: skip
    copies = {name: method.copies(config) for name, method in METHODS.items()}
    assert copies == {name: 3 if name == "e-qnn" else 1 for name in METHODS}


def test_an_unknown_method_is_refused_before_any_training():
    with pytest.raises(ValueError, match=r"unknown method 'nope'; choose from \['bayesbinn'"):
        run_method("nope", _config("mlp"), _tiny_data(), 0)


def test_tune_tries_every_point_of_the_grid(monkeypatch):
    tried = []

    def train(config, view, seed, settings):
        tried.append(dict(settings))
        return bench.Trained(torch.full((len(view.y_test), 2), 0.5), 0.0)

    grid = {"lr": (0.1, 0.2, 0.3), "momentum": (0.0, 0.9)}
    method = bench.Method("fake", train, lambda c: 1, {"mlp": {"lr": 0.1, "momentum": 0.0}}, grid)
    monkeypatch.setitem(METHODS, "fake", method)
    config = bench.BenchConfig(Architecture("mlp", (4,), 2, (3,)), ternary())
    chosen, rows = bench.tune("fake", config, _tiny_data())
    expected = [{"lr": lr, "momentum": m} for lr in grid["lr"] for m in grid["momentum"]]
    assert tried == expected
    assert [{k: row[k] for k in ("lr", "momentum")} for row in rows] == expected
    assert set(chosen) == {"lr", "momentum"}
