"""Throughput of data-parallel training over 1 and 2 processes (torch.distributed), its
scaling efficiency, and the peak memory of each process, on a 60,000-image IDX data set.

A random data set the size of MNIST (60,000 + 10,000 images of 28 x 28, the test helper
``tests/data/idx_files.py``) is written to a temporary folder. For each network (the MLP
784-512-256-10 and a LeNet-style CNN) and each process count ``W``, ``W`` fresh processes
are spawned (:mod:`torch.multiprocessing`) and joined in a process group (gloo on the CPU,
nccl on CUDA, one GPU per process); each loads the whole IDX set (:func:`pyro_bqn.data.
load_idx`) and trains with :func:`pyro_bqn.infer.fit` (data-parallel for ``W > 1``) for two
epochs on the first ``--images`` training images, ``--batch`` images per process and step.
The second epoch is timed (the first builds the guide and warms up).

Printed per network and ``W``: images per second (median over ``--repeats`` runs, each
value shown), the scaling efficiency ``throughput(W) / (W * throughput(1))`` of each
repeat, and per process the peak resident memory and its growth while loading the data.
Each process runs ``--threads`` torch threads (default 1, what ``torchrun`` sets), so on the
CPU ``W`` processes use ``W`` cores::

    python benchmarks/scaling.py [--device cpu|cuda] [--nproc 1,2] [--repeats 2]
        [--images-mlp 3000] [--images-cnn 600] [--batch 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import pyro
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the IDX writer of the tests

from pyro_bqn.architectures import Architecture  # noqa: E402
from pyro_bqn.data import load_idx  # noqa: E402
from pyro_bqn.devices import resolve_device  # noqa: E402
from pyro_bqn.infer import AutoQuantizedGuide, fit  # noqa: E402
from pyro_bqn.infer.distributed import init_from_environment, leave_process_group  # noqa: E402
from pyro_bqn.models import QuantizedClassifier  # noqa: E402
from tests.data.idx_files import write_full_size_idx_dir  # noqa: E402

NETWORKS = {
    "mlp": Architecture("mlp", (784,), 10, (512, 256)),
    # The small CNN of benchmarks/step_time.py (LeNet-5's layout, fewer channels).
    "cnn": Architecture("cnn", (1, 28, 28), 10, (16, 32, 128)),
}


def _status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in bytes. (The
    ``ru_maxrss`` of a spawned process starts at its parent's size when it forked.)"""
    lines = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in lines if line.startswith(field + ":")).split()[1]) * 1024


def _worker(rank: int, world_size: int, port: int, job: dict, results: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(job["threads"])
    device = init_from_environment(resolve_device(job["device"]))
    before = _status_bytes("VmRSS")
    data = load_idx(job["idx"])
    loaded = _status_bytes("VmRSS") - before
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = QuantizedClassifier(NETWORKS[job["network"]])
    guide = AutoQuantizedGuide(model)
    n = job["images"]
    history = fit(
        model,
        guide,
        data.x_train[:n],
        data.y_train[:n],
        epochs=2,
        batch_size=job["batch"],
        progress=False,
        device=device,
    )
    peak = _status_bytes("VmHWM")
    if device.type == "cuda":
        peak_device = torch.cuda.max_memory_allocated(device)
    else:
        peak_device = None
    leave_process_group()
    record = {
        "seconds": history[1]["seconds"],
        "peak_rss": peak,
        "data_growth": loaded,
        "peak_device": peak_device,
    }
    (results / f"{rank}.json").write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(job: dict, world_size: int) -> list[dict]:
    """One measurement: ``world_size`` fresh processes; their records, by rank."""
    with tempfile.TemporaryDirectory() as folder:
        results = Path(folder)
        mp.spawn(_worker, args=(world_size, _free_port(), job, results), nprocs=world_size)
        return [json.loads((results / f"{r}.json").read_text()) for r in range(world_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nproc", default="1,2", help="process counts, the first the baseline")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images-mlp", type=int, default=3000)
    parser.add_argument("--images-cnn", type=int, default=600)
    parser.add_argument("--batch", type=int, default=100, help="images per process and step")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (torchrun's default 1)"
    )
    args = parser.parse_args()
    resolve_device(args.device)  # refuse an unavailable device before any work
    counts = [int(n) for n in args.nproc.split(",")]
    with tempfile.TemporaryDirectory() as idx:
        write_full_size_idx_dir(Path(idx))
        print(
            f"# 60,000-image IDX set; device {args.device}; {os.cpu_count()} CPU cores, "
            f"{args.threads} thread(s) per process; {args.batch} images per process and "
            f"step; torch {torch.__version__}"
        )
        for network in NETWORKS:
            images = getattr(args, f"images_{network}")
            job = {"device": args.device, "idx": idx, "network": network, "images": images,
                   "batch": args.batch, "threads": args.threads}  # fmt: skip
            throughput: dict[int, list[float]] = {}
            for repeat in range(args.repeats):
                for count in counts:  # alternated, so that load drifts hit every count
                    records = run(job, count)
                    seconds = max(r["seconds"] for r in records)
                    throughput.setdefault(count, []).append(images / seconds)
                    memory = ", ".join(
                        f"rank {rank}: peak {r['peak_rss'] / 2**20:.0f} MiB"
                        f" (data +{r['data_growth'] / 2**20:.0f} MiB)"
                        + ("" if r["peak_device"] is None
                           else f", GPU peak {r['peak_device'] / 2**20:.0f} MiB")
                        for rank, r in enumerate(records)
                    )  # fmt: skip
                    print(f"{network} W={count} repeat {repeat + 1}: "
                          f"{images / seconds:.0f} images/s; {memory}", flush=True)  # fmt: skip
            base = counts[0]
            for count in counts:
                values = throughput[count]
                efficiency = [v / (count / base * b) for v, b in zip(values, throughput[base],
                                                                      strict=True)]  # fmt: skip
                print(f"{network} W={count}: median {statistics.median(values):.0f} images/s "
                      f"(runs {', '.join(f'{v:.0f}' for v in values)}); scaling efficiency "
                      f"{', '.join(f'{e:.2f}' for e in efficiency)}")  # fmt: skip


if __name__ == "__main__":
    main()
