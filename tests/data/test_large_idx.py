"""A data set the size of MNIST (60,000 training images) from IDX files: loaded with one
float copy, and served through a DataLoader with worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_bqn.data import load_idx
from pyro_bqn.data.loading import EpochBatches, batch_loader
from tests.data.idx_files import FULL_SIZE, write_full_size_idx_dir

# Measured in a fresh process, by its own high-water mark (VmHWM, reset by exec; the
# ru_maxrss of a child starts at its parent's size when it forked).
_MEASURE = """
import json, os, sys
from pyro_bqn.data import load_idx

def status(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

before = status("VmRSS")
ds = load_idx(sys.argv[1])
peak = status("VmHWM")
floats = sum(t.numel() * t.element_size() for t in (ds.x_train, ds.x_val, ds.x_test))
print(json.dumps({"growth": peak - before, "float_bytes": floats}))
"""


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("idx60k")
    write_full_size_idx_dir(directory)
    return directory


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_loading_holds_one_float_copy(full_size: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(full_size)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    measured = json.loads(out.stdout)
    pixels = (FULL_SIZE["n_train"] + FULL_SIZE["n_test"]) * 28 * 28
    assert measured["float_bytes"] == 4 * pixels
    # The float32 data set plus at most two byte-sized copies of the images (the file's
    # bytes and the decoded array) at the peak; a second float copy would add 4 bytes a
    # pixel, as building the normalised arrays out of place did (2.7 float copies at peak).
    assert measured["growth"] <= measured["float_bytes"] + 2 * pixels, measured


def test_workers_serve_the_batches_the_loop_chose(full_size: Path) -> None:
    ds = load_idx(full_size, kind="fashion-mnist")
    assert ds.x_train.shape == (60_000, 784) and ds.x_test.shape == (10_000, 784)
    order = torch.randperm(60_000, generator=torch.Generator().manual_seed(0))
    chosen = list(order[:500].split(100))
    batches = EpochBatches()
    loader = batch_loader(ds.x_train, ds.y_train, batches, num_workers=2)
    for _ in range(2):  # persistent workers serve a second epoch's batches too
        batches.set(chosen[::-1])
        for (xb, yb), idx in zip(loader, chosen[::-1], strict=True):
            assert torch.equal(xb, ds.x_train[idx]) and torch.equal(yb, ds.y_train[idx])
        chosen = chosen[1:]
