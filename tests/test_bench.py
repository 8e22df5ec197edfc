import pytest

from pyro_bqn.bench import MethodRun, summarise


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
