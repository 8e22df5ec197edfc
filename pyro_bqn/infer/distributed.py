"""Data-parallel training over processes and machines with :mod:`torch.distributed`.

:func:`~pyro_bqn.infer.fit` trains one model over ``W`` processes when it runs inside an
initialised process group (``torchrun --nproc_per_node W ...``, or ``pyro-bqn fit --nproc
W``, which calls torchrun's own launcher). Nothing here is home-made parallelism: the
gradients are averaged by :class:`torch.nn.parallel.DistributedDataParallel` (DDP), the
processes are started by :mod:`torch.distributed.run`, and they talk over ``gloo`` on CPUs
and ``nccl`` on CUDA GPUs (:func:`backend_for`).

**One step.** Every process draws the same permutation of the ``N`` examples each epoch
(the same seeded generator), cuts it into *global* minibatches of ``W * B`` examples
(``B``, ``fit``'s ``batch_size``, is the per-process batch, as in torch's
``DistributedSampler``) and takes its own contiguous share of each
(:func:`shard_minibatches`). The model is called with ``num_data=N``, so each share's
likelihood is scaled to the full data set. The loss of process ``r`` with ``b_r`` of the
``G`` examples of the global batch is multiplied by ``W b_r / G`` before DDP averages the
gradients over the processes, which gives exactly the gradient of one process on the
whole global batch:

.. math::
    \\frac{1}{W} \\sum_r \\frac{W b_r}{G} \\Big(-\\frac{N}{b_r} \\sum_{i \\in r} \\ell_i
    + \\mathrm{KL}\\Big) = -\\frac{N}{G} \\sum_{i} \\ell_i + \\mathrm{KL}

(the weight is 1 when the shares are equal). So ``W`` processes with batches of ``B`` follow
the same path, up to floating-point rounding, as one process with batches of ``W * B``: the
optimiser (Adam, clipping, learning-rate schedule) sees the same gradients on every process
and keeps every replica's parameters equal without any further communication.

**Why DDP over the ELBO module.** ``elbo(model, guide)`` is an :class:`torch.nn.Module`
(Pyro's ``ELBOModule``) whose parameters are the model's and the guide's, so DDP can wrap
it: its backward hooks all-reduce the gradients in buckets while the backward pass is still
running, and its construction broadcasts process 0's initial values. Pyro's param store
holds the very same tensors (a ``PyroModule`` and the param store share their
``Parameter`` objects), so :class:`~pyro.infer.SVI` and the :mod:`pyro.optim` optimiser step
them unchanged. A parameter created by ``pyro.param`` outside the model's and guide's
modules would escape the all-reduce; :class:`DataParallelLoss` refuses such a store.

**Batch norm.** Each process normalises its share with that share's batch statistics (as
torch's ``BatchNorm`` under DDP without ``SyncBatchNorm``), so with batch norm ``W``
processes follow one process only approximately; keep the per-process batch large enough
(``B >= 32``) for the statistics to be stable. The running statistics are averaged over
the processes at the end of every epoch (:func:`average_running_statistics`), so the
evaluation-mode network that process 0 saves has seen every shard.

**Results.** Only process 0 (:func:`is_main_process`) writes checkpoints and results.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch
import torch.distributed as dist
from pyro import poutine
from torch.nn.parallel import DistributedDataParallel

from pyro_bqn.live_tensors import buffers_of, preserved
from pyro_bqn.minibatches import minibatches

__all__ = [
    "DataParallelLoss",
    "average_running_statistics",
    "backend_for",
    "init_from_environment",
    "is_main_process",
    "launch",
    "leave_process_group",
    "main_process_first",
    "num_shard_minibatches",
    "shard_minibatches",
    "sum_over_processes",
    "world",
]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process writes results: process 0, or the only one."""
    return world()[0] == 0


def backend_for(device: torch.device) -> str:
    """The :mod:`torch.distributed` backend for ``device``: ``nccl`` for CUDA, ``gloo``
    for the CPU.

    :raises ValueError: for a device no backend serves (MPS).
    """
    if device.type == "cuda":
        return "nccl"
    if device.type == "cpu":
        return "gloo"
    raise ValueError(f"distributed training runs on cpu (gloo) or cuda (nccl), not {device}")


def init_from_environment(device: torch.device) -> torch.device:
    """Join the process group a launcher describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, as ``torchrun`` sets them)
    and return the device this process trains on: ``cuda:<LOCAL_RANK>`` for CUDA, else
    ``device``. Without ``WORLD_SIZE`` (or with 1), or when a group is already
    initialised, nothing is joined.

    :raises ValueError: for a device no backend serves, or more processes on this node
        than it has CUDA devices.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    backend = backend_for(device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"process {local_rank} of this node needs CUDA device {local_rank}, but there "
                f"are {torch.cuda.device_count()}: start at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return device


def leave_process_group() -> None:
    """Leave the process group, if this process is in one (after the last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_process_first(action: Callable[[], Any]) -> Any:
    """Run ``action`` on process 0 only (e.g. preparing the output folder), then let every
    process go on; an error on process 0 is raised on every process (as a ``ValueError``
    with process 0's message), so that none waits for the others forever.

    :returns: ``action()`` on process 0, ``None`` elsewhere.
    """
    rank, size = world()
    result, failure, message = None, None, [None]
    if rank == 0:
        try:
            result = action()
        except Exception as error:  # re-raised below, after the others have heard of it
            failure, message[0] = error, f"{type(error).__name__}: {error}"
    if size > 1:
        dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise ValueError(f"process 0 failed: {message[0]}")
    return result


def shard_minibatches(
    order: torch.Tensor, batch_size: int, rank: int, world_size: int
) -> list[tuple[torch.Tensor, float]]:
    """This process's minibatches of one epoch, and the weight of each one's loss.

    ``order`` (``(N,)``, the epoch's permutation, the same on every process) is cut into
    global minibatches of ``world_size * batch_size`` indices by
    :func:`pyro_bqn.minibatches.minibatches`; a last global minibatch too small to give
    every process ``min(2, batch_size)`` examples (batch norm needs two) is folded into the
    one before. Each global minibatch of ``G`` indices is split into ``world_size``
    contiguous shares of sizes differing by at most one; process ``rank`` takes share
    ``rank``, of ``b`` indices, with the weight ``world_size * b / G`` (module docstring).
    With ``world_size = 1`` this is :func:`~pyro_bqn.minibatches.minibatches` with weights 1.

    Usage::

        >>> [(idx.tolist(), round(w, 3)) for idx, w in shard_minibatches(torch.arange(11), 2, 1, 2)]
        [([2, 3], 1.0), ([8, 9, 10], 0.857)]

    :raises ValueError: if ``order`` is too short to give every process its examples.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    if world_size == 1:
        return [(idx, 1.0) for idx in minibatches(order, batch_size)]
    least = world_size * min(2, batch_size)
    if len(order) < least:
        raise ValueError(
            f"{len(order)} examples cannot be shared by {world_size} processes with at least "
            f"{min(2, batch_size)} each; use fewer processes"
        )
    batches = list(order.split(world_size * batch_size))
    if len(batches) > 1 and len(batches[-1]) < least:
        batches[-2:] = [torch.cat(batches[-2:])]
    shares = [batch.tensor_split(world_size)[rank] for batch in batches]
    return [
        (share, world_size * len(share) / len(batch))
        for share, batch in zip(shares, batches, strict=True)
    ]


def num_shard_minibatches(num_data: int, batch_size: int, world_size: int) -> int:
    """How many minibatches :func:`shard_minibatches` gives each process per epoch."""
    order = torch.empty(num_data, dtype=torch.long)
    return len(shard_minibatches(order, batch_size, 0, world_size))


class DataParallelLoss:
    """The loss of ``elbo`` for ``model`` and ``guide`` as one
    :class:`~torch.nn.parallel.DistributedDataParallel` module, for
    :class:`~pyro.infer.SVI`'s ``loss_and_grads``.

    Construction runs the guide once on ``example`` inputs (without gradients, hidden from
    handlers) so that its parameters exist, checks that every parameter in Pyro's param store
    belongs to ``model`` or ``guide``, and wraps ``elbo(model, guide)``; DDP then copies
    process 0's parameters and buffers to every process. Buffers are not broadcast at each
    step (``forward_sync_buffers=False``): see :func:`average_running_statistics`.

    :param elbo: a :class:`pyro.infer.ELBO` (its ``differentiable_loss`` is DDP's forward).
    :param model: a :class:`torch.nn.Module` (a ``PyroModule``).
    :param guide: a :class:`torch.nn.Module`.
    :param device: where the model lives (its CUDA index is DDP's ``device_ids``).
    :raises ValueError: if the model or guide is not a module, or a parameter of the param
        store belongs to neither.
    """

    def __init__(
        self,
        elbo: pyro.infer.ELBO,
        model: Any,
        guide: Any,
        device: torch.device,
        *example_args: Any,
        **example_kwargs: Any,
    ) -> None:
        for name, value in (("model", model), ("guide", guide)):
            if not isinstance(value, torch.nn.Module):
                raise ValueError(
                    f"data-parallel training needs the {name} to be a torch.nn.Module (a "
                    f"PyroModule), got {type(value).__name__}"
                )
        # Only to create the guide's parameters: leave batch-norm statistics as they are.
        with torch.no_grad(), poutine.block(), preserved(buffers_of(model)):
            guide(*example_args, **example_kwargs)
        _check_params_in_modules(model, guide)
        device_ids = None
        if device.type == "cuda":  # "cuda" alone means the current device of this process
            device_ids = [torch.cuda.current_device() if device.index is None else device.index]
        self.module = DistributedDataParallel(
            elbo(model, guide),
            device_ids=device_ids,
            forward_sync_buffers=False,
        )

    def loss_and_grads(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        """The weighted loss (keyword ``weight``, default 1) of this process's batch; its
        backward pass leaves the gradients averaged over the processes."""
        weight = kwargs.pop("weight", 1.0)
        loss = self.module(*args, **kwargs) * weight
        loss.backward()
        return loss.item()

    def loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        """The weighted loss without gradients (:meth:`pyro.infer.SVI.evaluate_loss`)."""
        weight = kwargs.pop("weight", 1.0)
        with torch.no_grad():
            return self.module.module(*args, **kwargs).item() * weight


def _check_params_in_modules(model: torch.nn.Module, guide: torch.nn.Module) -> None:
    held = {id(p) for module in (model, guide) for p in module.parameters()}
    store = pyro.get_param_store()
    outside = [name for name in store.keys() if id(store._params[name]) not in held]
    if outside:
        raise ValueError(
            f"Pyro parameters {outside} belong to neither the model's nor the guide's modules, "
            "so data-parallel training cannot average their gradients: declare them as "
            "PyroParam attributes of a PyroModule (or clear the param store of stale entries)"
        )


def sum_over_processes(values: Sequence[float], device: torch.device) -> list[float]:
    """Each of ``values`` summed over every process (``values`` unchanged outside a group)."""
    if world()[1] == 1:
        return list(values)
    total = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def average_running_statistics(module: torch.nn.Module) -> None:
    """Replace every batch-norm running statistic of ``module`` (the floating-point buffers
    named ``running_*``) by its mean over the processes, in place; nothing outside a group."""
    size = world()[1]
    if size == 1:
        return
    for name, buffer in module.named_buffers():
        if name.rpartition(".")[2].startswith("running_") and buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(size)


def launch(nproc: int, module: str, argv: Sequence[str]) -> None:
    """Run ``python -m module argv`` in ``nproc`` processes on this machine with torch's own
    launcher (what ``torchrun --standalone --nproc_per_node nproc -m module argv`` does),
    and wait for them.

    :raises RuntimeError: if a process failed (its error is printed by the process).
    """
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    options = run.parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module", module])
    # Set after parsing: torchrun's parser would read the command's own options (--nproc is
    # an abbreviation of its --nproc-per-node).
    options.training_script_args = list(argv)
    try:
        run.run(options)
    except ChildFailedError as error:
        failed = ", ".join(str(rank) for rank in sorted(error.failures))
        message = f"process(es) {failed} of {nproc} failed (their errors are above)"
        raise RuntimeError(message) from None
