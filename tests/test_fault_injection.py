"""``pyro-bqn fit --overwrite`` interrupted (SIGKILL, SIGINT) during every file write and
during the commit: the output folder then holds the complete previous results or the
complete new ones, every file readable, and ``--resume`` finishes an interrupted run."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from pyro_bqn.checkpoint import FILE_FORMAT, FILE_VERSION
from pyro_bqn.export import QuantizedNetwork
from pyro_bqn.payload_files import load_payload

RESULTS = {
    "arguments.json",
    "checkpoint.pt",
    "metrics.json",
    "network.pt",
    "posterior_history.png",
    "posterior_summary.png",
    "reliability.png",
    "summary.md",
}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _check_readable(folder: Path) -> None:
    assert {p.name for p in folder.iterdir()} == RESULTS
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and "test" in metrics
    json.loads((folder / "arguments.json").read_text())
    assert (folder / "summary.md").read_text().startswith("# pyro-bqn fit")
    for png in folder.glob("*.png"):
        assert matplotlib.image.imread(png).size > 0
    QuantizedNetwork.load(folder / "network.pt")
    load_payload(folder / "checkpoint.pt", FILE_FORMAT, FILE_VERSION, ())


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("faults")
    driver = Path(__file__).with_name("fault_driver.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(driver.parent.parent)}
    result = subprocess.run(
        [sys.executable, str(driver), str(workdir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, json.loads((workdir / "trials.json").read_text()), result.stderr


def test_every_write_of_a_run_was_interrupted(trials):
    workdir, found, _ = trials
    writes = json.loads((workdir / "writes.json").read_text())
    # arguments, one checkpoint per epoch, then the results.
    assert writes[0] == "arguments.json" and writes[1:3] == ["checkpoint.pt"] * 2
    assert set(writes) == RESULTS
    killed = {t["k"] for t in found if t["point"] == "write" and t["signal"] == "SIGKILL"}
    assert killed == set(range(1, len(writes) + 1))
    for trial in found:
        assert trial["interrupted"] in (trial["signal"], "exit 130"), trial


def test_the_output_folder_holds_the_previous_or_the_new_results(trials):
    workdir, found, _ = trials
    previous = _digest(workdir / "previous")
    _check_readable(workdir / "previous")
    for trial in found:
        after = workdir / f"interrupted-{trial['folder']}"
        if trial["point"] == "write":
            assert _digest(after) == previous, trial
        else:  # interrupted after the swap: the new results are complete
            assert _digest(after) != previous, trial
            _check_readable(after)


def test_an_interrupted_run_resumes_to_the_results_of_an_uninterrupted_one(trials):
    workdir, found, _ = trials
    expected = json.loads((workdir / "counted" / "metrics.json").read_text())
    for trial in found:
        folder = workdir / trial["folder"]
        assert ("resumed" in trial) == (trial["point"] == "write"), trial
        if "resumed" in trial:
            assert trial["resumed"] == "exit 0", trial
        assert not (workdir / f".{trial['folder']}.partial").exists(), trial
        old_results = workdir / f".{trial['folder']}.previous"
        if trial["point"] == "commit":
            # Killed before the swapped-out results were removed: they wait, whole, for the
            # next run on this folder to remove them (OutputFolder.prepare).
            assert _digest(old_results) == _digest(workdir / "previous"), trial
        else:
            assert not old_results.exists(), trial
        _check_readable(folder)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["test"] == expected["test"], trial
        losses = [h["loss"] for h in metrics["history"]]
        assert losses == [h["loss"] for h in expected["history"]], trial
