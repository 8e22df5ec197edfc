"""Runs ``pyro-bqn fit`` in forked children that are interrupted at chosen points, for
tests/test_fault_injection.py. Run as ``python tests/fault_driver.py WORKDIR``.

The driver imports the library once and forks a child per trial (a fresh interpreter per
trial would spend most of the test importing torch). Every trial starts from a copy of
``WORKDIR/previous``, the complete results of an earlier run, and runs ``fit --overwrite``
with another seed into it. A trial's plan, ``(point, signal)``, says where the child dies:

* ``("write", k)`` — during the k-th atomic file write of the run, after half of the first
  chunk of bytes is written;
* ``("commit", 0)`` — after the staging folder has been swapped in, before the previous
  results are removed.

``WORKDIR/trials.json`` lists every trial with the child's exit status; the output folder
as the interruption left it is copied to ``WORKDIR/interrupted-<trial>``, and an
interrupted run is then resumed with ``--resume``. The files an uninterrupted run
(``WORKDIR/counted``) writes, in order, go to ``WORKDIR/writes.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from pyro_bqn import atomic_files, cli, output_folder

ARGS = [
    "fit",
    "--dataset",
    "breast-cancer",
    "--hidden",
    "6",
    "--epochs",
    "2",
    "--batch-size",
    "50",
    "--mc-samples",
    "0",
    "--no-progress",
]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT}
# CI has two cores: two children at a time.
PARALLEL = 2


def _die(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(5)  # SIGINT arrives as KeyboardInterrupt here; SIGKILL never returns


class _DyingFile:
    """A file object that writes half of its first chunk, then has the process killed."""

    def __init__(self, handle, signum: int) -> None:
        self._handle, self._signum = handle, signum

    def write(self, data) -> int:
        data = bytes(data)
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        _die(self._signum)
        return len(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)


def _hook_writes(on_write) -> None:
    """Route every atomic write of the library through ``on_write(path, handle)``."""
    real = atomic_files.atomic_writer

    @contextlib.contextmanager
    def hooked(path, *args, **kwargs):
        with real(path, *args, **kwargs) as handle:
            yield on_write(Path(path), handle)

    atomic_files.atomic_writer = hooked


def _start(work, argv: list[str]) -> int:
    """Fork a child that runs ``work()`` then ``cli.main(argv)``; return its pid."""
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            work()
            cli.main(argv)
        except SystemExit as exit_info:
            status = exit_info.code if isinstance(exit_info.code, int) else 1
        except BaseException:  # noqa: BLE001 - the status says it; the test reads stderr
            import traceback

            traceback.print_exc()
            status = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    return pid


def _run_all(jobs: list[tuple], parallel: int = PARALLEL) -> list[int]:
    """Run ``(work, argv)`` jobs in forked children, ``parallel`` at a time; return their
    wait statuses in order."""
    statuses: dict[int, int] = {}
    running: dict[int, int] = {}
    for index, (work, argv) in enumerate(jobs):
        if len(running) == parallel:
            pid, status = os.wait()
            statuses[running.pop(pid)] = status
        running[_start(work, argv)] = index
    while running:
        pid, status = os.wait()
        statuses[running.pop(pid)] = status
    return [statuses[index] for index in range(len(jobs))]


def _exit_description(status: int) -> str:
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"


def _interrupt(point: str, k: int, signum: int):
    """The ``work`` of a child that dies at ``(point, k)`` (see the module docstring)."""

    def at_write() -> None:
        seen = [0]

        def maybe_die(path, handle):
            seen[0] += 1
            return _DyingFile(handle, signum) if seen[0] == k else handle

        _hook_writes(maybe_die)

    def at_commit() -> None:
        real_rmtree = output_folder.shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name.endswith(".previous"):
                _die(signum)
            return real_rmtree(path, *args, **kwargs)

        output_folder.shutil.rmtree = rmtree

    return at_write if point == "write" else at_commit


def main(workdir: Path) -> None:
    torch.set_num_threads(1)
    previous = workdir / "previous"
    [status] = _run_all([(lambda: None, [*ARGS, "--seed", "0", "--output", str(previous)])])
    assert status == 0

    log = workdir / "writes.log"

    def count_writes() -> None:
        def record(path, handle):
            with open(log, "a") as out:
                out.write(path.name + "\n")
            return handle

        _hook_writes(record)

    counted = workdir / "counted"
    shutil.copytree(previous, counted)
    argv = [*ARGS, "--seed", "1", "--overwrite", "--output"]
    assert _run_all([(count_writes, [*argv, str(counted)])]) == [0]
    writes = log.read_text().split()
    (workdir / "writes.json").write_text(json.dumps(writes))

    plans = [("write", k, "SIGKILL") for k in range(1, len(writes) + 1)]
    plans += [("write", k, "SIGINT") for k in (2, len(writes) - 1)]
    plans += [("commit", 0, "SIGKILL")]
    folders = [workdir / f"trial-{point}-{k}-{signame}" for point, k, signame in plans]
    for folder in folders:
        shutil.copytree(previous, folder)
    jobs = [
        (_interrupt(point, k, SIGNALS[signame]), [*argv, str(folder)])
        for (point, k, signame), folder in zip(plans, folders, strict=True)
    ]
    trials = []
    for (point, k, signame), folder, status in zip(plans, folders, _run_all(jobs), strict=True):
        trial = {"folder": folder.name, "point": point, "k": k, "signal": signame}
        trial["interrupted"] = _exit_description(status)
        # What a user would find in the output folder right after the interruption.
        shutil.copytree(folder, workdir / f"interrupted-{folder.name}")
        trials.append(trial)
    to_resume = [t for t in trials if (workdir / f".{t['folder']}.partial").exists()]
    resume_argv = [*argv[:-2], "--resume", "--output"]
    jobs = [(lambda: None, [*resume_argv, str(workdir / t["folder"])]) for t in to_resume]
    for trial, status in zip(to_resume, _run_all(jobs), strict=True):
        trial["resumed"] = _exit_description(status)
    (workdir / "trials.json").write_text(json.dumps(trials, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
