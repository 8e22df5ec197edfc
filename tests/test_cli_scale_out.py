"""``pyro-bqn fit --device`` and ``--nproc``: devices refused before any work, and a fit
over two processes (torch's launcher, gloo) that writes its results once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_bqn import cli

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "breast-cancer", "--hidden", "6", "--no-progress"]
TINY = [*COMMON, "--mc-samples", "0"]


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["fit", "bench"])
def test_a_bad_device_is_refused_before_any_work(command, tmp_path, capsys) -> None:
    output = tmp_path / "run"
    argv = [command, *(TINY if command == "fit" else COMMON), "--output", str(output)]
    message = _error([*argv, "--device", "tpu"], capsys)
    assert "--device tpu: device must be one of cpu, cuda, mps, auto" in message
    if not torch.cuda.is_available():
        message = _error([*argv, "--device", "cuda"], capsys)
        assert "--device cuda" in message and "CUDA is not available" in message
    assert not output.exists() and not (tmp_path / ".run.partial").exists()


def test_nproc_inside_a_launch_of_another_size_is_refused(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    message = _error(["fit", *TINY, "--output", str(tmp_path / "r"), "--nproc", "2"], capsys)
    assert "--nproc 2 inside a launch of 3 processes" in message


def test_fit_over_two_processes_writes_one_result(tmp_path) -> None:
    output = tmp_path / "run"
    argv = [*TINY, "--epochs", "2", "--batch-size", "40", "--output", str(output), "--nproc", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pyro_bqn.cli", "fit", *argv],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("# pyro-bqn fit: breast-cancer") == 1  # process 0 reports
    metrics = json.loads((output / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert json.loads((output / "arguments.json").read_text())["nproc"] == 2
    assert (output / "checkpoint.pt").exists() and (output / "network.pt").exists()
    assert not (tmp_path / ".run.partial").exists()
