"""Training on several processes (``torchrun``) with ``DistributedDataParallel``.

    torchrun --nproc-per-node 8 -m cheff train sdm --preset paper-uncond --data ...

Each rank streams its own blocks of the one global order (``machex.stream``), computes its
task's loss through ``DistributedDataParallel`` (which averages the gradients) and steps an
identical copy of the optimisers; rank 0 alone logs, draws grids and writes checkpoints.

What makes a run on W ranks the same run as one process with the W-times batch:

- **Random draws.** Every rank holds the same task generator. A draw for a batch (noise,
  timesteps, posterior samples, condition drops) is made for the whole global batch and each
  rank keeps its own rows (:func:`shard_rows`), so the generators stay in step and the rows
  are the ones a single process would draw for the same samples.
- **Logged values** are averaged over the ranks (:func:`mean_over_ranks`).
- **The checkpoint** holds the global data position and the shared generator state, so it
  resumes on any number of ranks.

The autoencoder's discriminator keeps per-rank BatchNorm statistics, as in the official
(Lightning DDP) training; it is off for the first ``disc_start`` steps.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0 and 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0: the one process that logs and writes."""
    return rank_and_world()[0] == 0


def launched_world_size() -> int:
    """The ``WORLD_SIZE`` torchrun set (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def process_group(device: str) -> Iterator[None]:
    """Join the process group torchrun described in the environment (a no-op for one
    process or when a group exists already), and leave it at the end if we joined it.
    ``device``: the run's device setting; CUDA ranks use NCCL, CPU ranks gloo."""
    if launched_world_size() <= 1 or dist.is_initialized():
        yield
        return
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = rank_and_world()
    log.info("rank %d of %d joined (%s)", rank, world, dist.get_backend())
    try:
        yield
    finally:
        dist.destroy_process_group()


def in_process_group(train: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``train(config, ...)`` inside :func:`process_group` (``config.train.device``), so
    ``cheff train`` and the ``train_*`` functions work under torchrun as they are."""

    @functools.wraps(train)
    def run(config: Any, *args: Any, **kwargs: Any) -> Any:
        with process_group(config.train.device):
            return train(config, *args, **kwargs)

    return run


def local_device(device: torch.device) -> torch.device:
    """A CUDA rank's own GPU (``LOCAL_RANK``); other devices as they are."""
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard_rows(draw: Callable[[int], Tensor], count: int) -> Tensor:
    """``draw(n)`` draws ``n`` rows; on W ranks it draws ``W * count`` rows and this rank
    keeps rows ``rank * count`` to ``(rank + 1) * count``: the global batch's draw, in step
    on every rank. One process: ``draw(count)``, unchanged."""
    rank, world = rank_and_world()
    if world == 1:
        return draw(count)
    return draw(world * count)[rank * count : (rank + 1) * count]


def randn_rows(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Standard normal noise of ``shape`` (rows first) for this rank's part of the batch."""
    rows, rest = shape[0], tuple(shape[1:])
    return shard_rows(lambda n: torch.randn((n, *rest), generator=generator), rows)


def randint_rows(high: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` integers uniform in [0, high), this rank's part of the batch's draw."""
    return shard_rows(lambda n: torch.randint(0, high, (n,), generator=generator), count)


def rand_rows(count: int, generator: torch.Generator) -> Tensor:
    """``count`` numbers uniform in [0, 1), this rank's part of the batch's draw."""
    return shard_rows(lambda n: torch.rand(n, generator=generator), count)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each logged value averaged over the ranks (every rank must call it, with the same
    keys in the same order)."""
    _, world = rank_and_world()
    if world == 1 or not values:
        return values
    keys = sorted(values)
    device = _collective_device()
    total = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return {k: float(v) / world for k, v in zip(keys, total.tolist())}


def all_finite(loss: Tensor) -> bool:
    """Whether the loss is finite on every rank (so all ranks stop together)."""
    finite = bool(torch.isfinite(loss).all())
    if rank_and_world()[1] == 1:
        return finite
    flag = torch.tensor([1 if finite else 0], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def average_gradient(grad: Tensor) -> Tensor:
    """``grad`` averaged over the ranks (a gradient taken inside the loss with
    ``torch.autograd.grad``, which ``DistributedDataParallel`` does not reduce)."""
    _, world = rank_and_world()
    if world == 1:
        return grad
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / world


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TaskLoss(nn.Module):
    """A task's loss as one module, so ``DistributedDataParallel`` sees one forward per
    backward (as Lightning wraps a whole ``training_step``). Holds the task's modules; adds
    no parameters of its own."""

    def __init__(self, task: Any) -> None:
        super().__init__()
        self.task = task
        self.parts = nn.ModuleDict(task.modules())

    def forward(
        self, name: str, batch: dict[str, Any], step: int, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        return self.task.loss(name, batch, step, generator)


def wrap(task: Any, device: torch.device) -> nn.Module:
    """The task's loss behind ``DistributedDataParallel``. Tasks with several losses (the
    autoencoder's generator and discriminator) leave some trained parameters out of each
    loss, so DDP is told to look for unused ones."""
    return nn.parallel.DistributedDataParallel(
        TaskLoss(task),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=len(task.losses) > 1,
    )
