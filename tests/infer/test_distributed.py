"""Data-parallel fit over torch.distributed: sharding, and two gloo processes with batches of
B/2 against one process with batches of B."""

from __future__ import annotations

import socket
from pathlib import Path

import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pyro.nn import PyroModule

from pyro_bqn import nn as qnn
from pyro_bqn.distributions.moment_likelihoods import MomentCategorical
from pyro_bqn.infer import AutoQuantizedGuide, fit
from pyro_bqn.infer.distributed import (
    DataParallelLoss,
    average_running_statistics,
    main_process_first,
    num_shard_minibatches,
    shard_minibatches,
    sum_over_processes,
    world,
)
from pyro_bqn.minibatches import minibatches
from pyro_bqn.models import QuantizedMLP
from pyro_bqn.nn.quantized_linear import QuantizedLinear
from tests.infer.models import linear_classes

# 69 = 4 * 16 + 5: the last global minibatch splits 3 + 2, so the loss weights W b_r / G
# (1.2 and 0.8) are exercised too.
NUM_DATA, BATCH, EPOCHS = 69, 16, 2


class SignNet(PyroModule):
    """4 -> 8 -> 3 with sign activations and no batch norm, whose gradient on a batch is
    the mean of its halves' (batch norm would normalise each half by its own statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = QuantizedLinear(4, 8, bias=False)
        self.act = qnn.Sign()
        self.fc2 = QuantizedLinear(8, 3)

    def forward(self, x, y=None, num_data=None):
        logits = self.fc2(self.act(self.fc1(x)))
        batch = x.shape[0]
        with pyro.plate("data", num_data or batch, subsample=torch.arange(batch)):
            return pyro.sample("obs", MomentCategorical(logits=logits), obs=y)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = linear_classes(NUM_DATA, 4, 3, seed=5)
    return x.double(), y


def _train(model: PyroModule, batch_size: int, checkpoint: Path | None = None):
    x, y = _data()
    model = model.double()
    guide = AutoQuantizedGuide(model)
    history = fit(
        model,
        guide,
        x,
        y,
        epochs=EPOCHS,
        batch_size=batch_size,
        lr=0.05,
        seed=3,
        progress=False,
        checkpoint=checkpoint,
    )
    params = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    return history, params, model


def _worker(rank: int, world_size: int, port: int, folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        pyro.clear_param_store()
        pyro.set_rng_seed(rank)  # DDP's broadcast makes process 0's initial values everyone's
        history, params, _ = _train(SignNet(), BATCH // world_size, folder / f"ckpt{rank}.pt")
        # A network with batch norm: replicas stay equal, running statistics are averaged.
        pyro.clear_param_store()
        x, y = linear_classes(NUM_DATA, 4, 3, seed=5)
        mlp = QuantizedMLP((4, 8, 3))
        fit(mlp, AutoQuantizedGuide(mlp), x, y, epochs=1, batch_size=8, progress=False)
        bn_state = {
            **{name: value.detach().clone() for name, value in pyro.get_param_store().items()},
            **{name: value.clone() for name, value in mlp.named_buffers()},
        }
        torch.save({"history": history, "params": params, "bn": bn_state}, folder / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_follow_one_process_with_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    runs = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    history, params, _ = _train(SignNet(), BATCH)
    # The only process-dependent arithmetic is the order of float64 sums (a batch's halves,
    # then their mean): rounding of ~1e-16 per step, far below these bounds.
    for run in runs:
        assert run["params"].keys() == params.keys()
        for name, value in params.items():
            assert torch.allclose(run["params"][name], value, rtol=1e-9, atol=1e-9), name
        for mine, theirs in zip(run["history"], history, strict=True):
            for key in ("loss", "expected_log_likelihood", "kl", "lr"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-9), key
    # Replicas of the batch-norm network are equal, running statistics included.
    first, second = (run["bn"] for run in runs)
    assert first.keys() == second.keys() and any("running_mean" in name for name in first)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    # Only process 0 writes the checkpoint.
    assert (tmp_path / "ckpt0.pt").exists() and not (tmp_path / "ckpt1.pt").exists()


@pytest.mark.parametrize(
    ("num_data", "batch_size", "world_size"), [(64, 8, 2), (11, 2, 2), (23, 3, 3), (10, 4, 1)]
)
def test_shards_cover_each_global_minibatch_once(num_data, batch_size, world_size) -> None:
    order = torch.randperm(num_data, generator=torch.Generator().manual_seed(1))
    shards = [shard_minibatches(order, batch_size, r, world_size) for r in range(world_size)]
    steps = num_shard_minibatches(num_data, batch_size, world_size)
    assert all(len(shard) == steps for shard in shards)
    together = []
    for step in range(steps):
        pieces = [shards[r][step] for r in range(world_size)]
        size = sum(len(idx) for idx, _ in pieces)
        # Each share at least 2 (batch norm), shares differ by at most one example.
        lengths = [len(idx) for idx, _ in pieces]
        assert min(lengths) >= min(2, batch_size) and max(lengths) - min(lengths) <= 1
        # The weights W b_r / G average to 1, so the averaged gradient is the global batch's.
        for idx, weight in pieces:
            assert weight == pytest.approx(world_size * len(idx) / size)
        assert sum(w for _, w in pieces) == pytest.approx(world_size)
        together += [idx for idx, _ in pieces]
    assert torch.equal(torch.cat(together), order)


def test_one_process_shards_are_the_minibatches() -> None:
    order = torch.randperm(21, generator=torch.Generator().manual_seed(0))
    shards = shard_minibatches(order, 4, 0, 1)
    assert [idx.tolist() for idx, _ in shards] == [b.tolist() for b in minibatches(order, 4)]
    assert {weight for _, weight in shards} == {1.0}


def test_too_little_data_for_the_processes_is_refused() -> None:
    with pytest.raises(ValueError, match="3 examples cannot be shared by 2 processes"):
        shard_minibatches(torch.arange(3), 4, 0, 2)
    with pytest.raises(ValueError, match="rank must lie in"):
        shard_minibatches(torch.arange(8), 4, 2, 2)


def test_outside_a_process_group_everything_is_local() -> None:
    assert world() == (0, 1)
    assert sum_over_processes([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    assert main_process_first(lambda: 7) == 7
    model = QuantizedMLP((4, 8, 3))
    before = {name: b.clone() for name, b in model.named_buffers()}
    average_running_statistics(model)
    assert all(torch.equal(before[name], b) for name, b in model.named_buffers())


def test_parameters_outside_the_modules_are_refused() -> None:
    # A pyro.param of no module would escape DDP's all-reduce and drift between processes.
    pyro.param("stray", torch.ones(2))
    model = SignNet()
    guide = AutoQuantizedGuide(model)
    x, y = _data()
    with pytest.raises(ValueError, match=r"\['stray'\] belong to neither"):
        DataParallelLoss(
            pyro.infer.Trace_ELBO(), model.double(), guide, torch.device("cpu"), x[:2], y[:2]
        )
