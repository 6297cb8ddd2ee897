"""Training on several processes (``torchrun``) with ``DistributedDataParallel``.

    torchrun --nproc-per-node 8 -m cheff train sdm --preset paper-uncond --data ...

Each rank streams its own blocks of the one global order (``machex.stream``), computes its
task's loss through ``DistributedDataParallel`` (which averages the gradients) and steps an
identical copy of the optimisers; rank 0 alone logs, draws grids and writes checkpoints.

What makes a run on W ranks the same run as one process with the W-times batch:

- **Random draws.** Every rank holds the same task generator. A draw for a batch (noise,
  timesteps, posterior samples, condition drops) is made for the whole global batch and each
  rank keeps its own rows (:class:`BatchDraws`), so the generators stay in step and the rows
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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
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
    if device.startswith("cuda:"):
        raise ValueError(
            f"--device {device} under torchrun: give --device cuda (or auto); each rank takes "
            "the GPU of its LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Rank 0 writes checkpoints (tens of GB for the report model) while the others wait in a
    # collective: the default 10 minutes is too short on a slow shared filesystem.
    timeout = timedelta(minutes=float(os.environ.get("CHEFF_DIST_TIMEOUT_MIN", "60")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    rank, world = rank_and_world()
    log.info("rank %d of %d joined (%s)", rank, world, dist.get_backend())
    if rank != 0:  # one copy of the run's messages: rank 0's (warnings from every rank)
        for name in ("cheff", "cheff.train"):  # the CLI sets cheff.train's level of its own
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may never reach it
        raise
    # Leave together: a rank tearing gloo down while another is still finishing (rank 0
    # writing its last grid) was seen to abort the process after a finished run.
    dist.barrier()
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


@dataclass(frozen=True)
class BatchDraws:
    """The random numbers of one rank's part of a global batch.

    Every rank holds the same ``generator`` (the loop's, on the CPU) and draws for the whole
    global batch of ``world x per_rank`` rows, keeping its own ``count`` rows: the generators
    stay in step (also when a rank's batch came short by an unreadable image) and the rows
    are a single process's. On a GPU the numbers come from a device generator seeded from
    ``generator`` (one draw of it per call), so the global batch's noise costs the GPU
    microseconds, not the CPU tens of milliseconds; a CPU run draws from ``generator``
    itself, as one process always did."""

    generator: torch.Generator
    per_rank: int  # the nominal per-device batch (train.batch_size)
    device: torch.device

    def normal(self, shape: tuple[int, ...]) -> Tensor:
        rest = tuple(shape[1:])
        return self._rows(shape[0], lambda n, g, d: torch.randn((n, *rest), generator=g, device=d))

    def integers(self, high: int, count: int) -> Tensor:
        def draw(n: int, g: torch.Generator, d: torch.device) -> Tensor:
            return torch.randint(0, high, (n,), generator=g, device=d)

        return self._rows(count, draw)

    def uniform(self, count: int) -> Tensor:
        return self._rows(count, lambda n, g, d: torch.rand(n, generator=g, device=d))

    def _rows(
        self, count: int, draw: Callable[[int, torch.Generator, torch.device], Tensor]
    ) -> Tensor:
        rank, world = rank_and_world()
        if self.device.type == "cpu":
            generator, device = self.generator, torch.device("cpu")
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            generator = torch.Generator(device=self.device).manual_seed(seed)
            device = self.device
        if world == 1:
            return draw(count, generator, device)
        if count > self.per_rank:
            raise ValueError(f"a batch of {count} on a rank whose batch size is {self.per_rank}")
        first = rank * self.per_rank
        return draw(world * self.per_rank, generator, device)[first : first + count]


def widened(value: Tensor | float) -> Tensor:
    """A logged value as a 0-d tensor to sum in: float64, except on Apple's MPS (which has no
    float64: float32 there). Stays on its device."""
    value = torch.as_tensor(value).detach().reshape(())
    return value.to(torch.float32 if value.device.type == "mps" else torch.float64)


def mean_over_ranks(values: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Each logged value (a number, or a 0-d tensor on any device) averaged over the ranks,
    read back in one transfer; in the order given (every rank must call it, with the same
    keys)."""
    if not values:
        return {}
    _, world = rank_and_world()
    keys = sorted(values)
    tensors = [widened(values[k]) for k in keys]
    device = _collective_device() if world > 1 else tensors[0].device
    dtype = tensors[0].dtype if world == 1 else torch.float64
    total = torch.stack([t.to(device, dtype) for t in tensors])
    if world > 1:
        dist.all_reduce(total)
    means = dict(zip(keys, total.tolist()))
    return {k: means[k] / world for k in values}


def all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (every rank must call it), so that all ranks
    take the same branch: stop together, or go on together."""
    return smallest_over_ranks(1.0 if flag else 0.0) == 1.0


def smallest_over_ranks(number: float) -> float:
    """The smallest of every rank's ``number`` (every rank must call it)."""
    if rank_and_world()[1] == 1:
        return number
    value = torch.tensor([number], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return float(value.item())


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; every rank must call it)."""
    if rank_and_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    ) -> tuple[Tensor, dict[str, Tensor]]:
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
