"""Median time of ``import pyro_bqn`` against ``import pyro``, each in a fresh interpreter.

    python benchmarks/import_time.py [--runs 9]

The two imports alternate so that both see the same machine load; the script prints the
medians of wall time and of CPU time (user + system, steadier on a shared machine) and
their differences (target: ``pyro_bqn`` within 0.5 s of ``pyro``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

MODULES = ("pyro", "pyro_bqn")


def timed_import(module: str) -> tuple[float, float]:
    """Wall and CPU seconds of a fresh interpreter that imports ``module``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="imports of each module")
    args = parser.parse_args()
    times: dict[str, list[tuple[float, float]]] = {module: [] for module in MODULES}
    for module in MODULES:  # warm the file cache
        timed_import(module)
    for _ in range(args.runs):
        for module in MODULES:
            times[module].append(timed_import(module))
    medians = {
        module: [statistics.median(run[i] for run in runs) for i in range(2)]
        for module, runs in times.items()
    }
    for module, (wall, cpu) in medians.items():
        print(f"import {module:9s} median wall {wall:6.2f} s   cpu {cpu:6.2f} s")
    (wall_pyro, cpu_pyro), (wall_bqn, cpu_bqn) = medians["pyro"], medians["pyro_bqn"]
    wall, cpu = wall_bqn - wall_pyro, cpu_bqn - cpu_pyro
    print(f"difference         wall {wall:+6.2f} s   cpu {cpu:+6.2f} s")


if __name__ == "__main__":
    main()
