"""``MaCheXStream``: a ``MaCheX`` selection as a resumable, sharded ``IterableDataset``.

One epoch's *global order* of the selected samples is a pure function of ``(seed, epoch,
selection)``: the shard list is permuted, then the samples are permuted within windows of
consecutive shards holding at least ``shuffle_buffer`` samples. It does not depend on the
number of ranks or workers.

The global order is cut into blocks of ``batch_size`` samples, counted from the resume point
``start``. Block ``g`` goes to rank ``g % W``; within a rank, its ``j``-th block goes to worker
``j % K``, which is the order in which a ``DataLoader`` with ``K`` workers hands batches out.
So rank ``r``'s ``j``-th batch is global block ``j * W + r``: after every rank took ``n``
batches, exactly the first ``start + n * W * batch_size`` samples of the epoch were consumed,
whatever ``K`` is. That count is the resume state (``seen``); resuming with any other
``W``, ``K`` (or even batch size) neither repeats nor skips a sample.

Samples are read by offset from the WebDataset shards, as ``MaCheX.__getitem__`` does (the
items are the very same dicts); positions before ``start`` are skipped without reading. See
``docs/dataset.md`` ("Streaming").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from machex.dataset import MaCheX

__all__ = ["MaCheXStream", "epoch_order"]


def epoch_order(
    shard_index: np.ndarray,
    offsets: np.ndarray,
    seed: int,
    epoch: int,
    shuffle_buffer: int,
    shuffle: bool = True,
) -> np.ndarray:
    """The global order of one epoch: item indices (into the selection) as an int64 array.

    Items are grouped by shard (ascending offset within a shard); the shards are permuted with
    a generator seeded by ``(seed, epoch)``, then the items are permuted within windows of
    consecutive shards holding at least ``shuffle_buffer`` items (``<= 1``: shards shuffled,
    items kept in shard order). ``shuffle=False``: shards in name order, no permutation.
    """
    shard_index = np.asarray(shard_index, dtype=np.int64)
    n = len(shard_index)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    by_shard = np.lexsort((np.asarray(offsets, dtype=np.int64), shard_index))
    sorted_shards = shard_index[by_shard]
    bounds = np.flatnonzero(np.diff(sorted_shards)) + 1
    groups = np.split(by_shard, bounds)
    if not shuffle:
        return np.concatenate(groups)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, 0x4D43])
    groups = [groups[i] for i in rng.permutation(len(groups))]
    if shuffle_buffer <= 1:
        return np.concatenate(groups)
    out: list[np.ndarray] = []
    window: list[np.ndarray] = []
    count = 0
    for group in groups:
        window.append(group)
        count += len(group)
        if count >= shuffle_buffer:
            out.append(rng.permutation(np.concatenate(window)))
            window, count = [], 0
    if window:
        out.append(rng.permutation(np.concatenate(window)))
    return np.concatenate(out)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class MaCheXStream(IterableDataset):
    """A ``MaCheX`` selection streamed in a seeded, shard-then-sample shuffled order, split
    across ranks (``torch.distributed``) and ``DataLoader`` workers, resumable from a global
    sample count. Build it with ``MaCheX.stream(root, ...)`` or ``MaCheXStream(dataset)``.

    Args:
        dataset: the map-style selection; items are ``dataset[i]``.
        seed: with ``epoch``, fixes the global order.
        shuffle_buffer: items are permuted within windows of whole shards holding at least
            this many items (``<= 1``: only the shard order is shuffled).
        epoch: the epoch to stream (``set_epoch``).
        start: how many items of the epoch all ranks together already consumed (``seen`` of
            ``state_dict``); they are skipped without reading.
        batch_size: the ``DataLoader``'s batch size (the block each rank/worker takes at a
            time); must equal it for an exact resume count.
        shuffle: ``False`` streams in shard order (for evaluation).
        drop_last: truncate the epoch to a multiple of ``world_size * batch_size`` items so
            every rank gets the same number of full batches (the dropped tail depends on the
            world size and on ``start``).
        rank, world_size: override ``torch.distributed`` (default: its rank and world size
            when initialised, else rank 0 of 1).
    """

    def __init__(
        self,
        dataset: MaCheX,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        epoch: int = 0,
        start: int = 0,
        batch_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.dataset = dataset
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._rank = rank
        self._world_size = world_size
        self.epoch = int(epoch)
        self.start = 0
        self._check_start(start)
        self.start = int(start)

    # -- state -----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """What ``spawn`` / ``forkserver`` DataLoader workers get: this process's rank and
        world size, fixed. Such a worker joins no process group; asking ``torch.distributed``
        itself, it would see rank 0 of 1 and stream the whole epoch on every rank."""
        state = self.__dict__.copy()
        state["_rank"], state["_world_size"] = self.rank, self.world_size
        return state

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else _distributed()[0]

    @property
    def world_size(self) -> int:
        return self._world_size if self._world_size is not None else _distributed()[1]

    @property
    def epoch_size(self) -> int:
        """Items in one epoch (all ranks together), before ``drop_last``."""
        return len(self.dataset)

    def _check_start(self, start: int) -> None:
        if not 0 <= int(start) <= self.epoch_size:
            raise ValueError(f"start {start} out of range for an epoch of {self.epoch_size}")

    def set_epoch(self, epoch: int) -> None:
        """Stream ``epoch`` next. A new epoch starts at 0; the current one keeps its resume
        point, so ``load_state_dict`` followed by ``set_epoch`` of the same epoch resumes.
        Call it before creating the ``DataLoader`` iterator (workers get a copy; with
        ``persistent_workers=True`` the change does not reach them)."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.start = 0

    def global_count(self, local_batches: int, world_size: int | None = None) -> int:
        """Items of the epoch consumed by all ranks together after each rank took
        ``local_batches`` batches (of ``batch_size``) since this stream's ``start``:
        ``min(start + local_batches * world_size * batch_size, epoch_size)``. The worker count
        does not enter: batches reach a rank in global-block order whatever it is."""
        world = self.world_size if world_size is None else int(world_size)
        return min(self.start + int(local_batches) * world * self.batch_size, self.epoch_size)

    def state_dict(self, local_batches: int = 0) -> dict[str, int]:
        """``{"epoch": e, "seen": global_count(local_batches)}``; ``local_batches`` is the
        number of batches this rank consumed since the stream's ``start`` (the same on every
        rank in synchronous training). An epoch fully consumed is ``{"epoch": e + 1, "seen":
        0}``."""
        seen = self.global_count(local_batches)
        if seen >= self._epoch_end():
            return {"epoch": self.epoch + 1, "seen": 0}
        return {"epoch": self.epoch, "seen": seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._check_start(int(state["seen"]))
        self.epoch = int(state["epoch"])
        self.start = int(state["seen"])

    # -- order -----------------------------------------------------------------------------

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's global order: item indices into ``dataset`` (all of them, from 0)."""
        return epoch_order(
            self.dataset._shard_index,
            self.dataset._offsets,
            self.seed,
            self.epoch if epoch is None else epoch,
            self.shuffle_buffer,
            self.shuffle,
        )

    def _epoch_end(self, world_size: int | None = None) -> int:
        """Where the epoch ends for ``world_size`` ranks (default: this stream's): with
        ``drop_last``, the tail that does not fill one batch on every rank is left out."""
        n = self.epoch_size
        if not self.drop_last:
            return n
        world = self.world_size if world_size is None else int(world_size)
        block = world * self.batch_size
        return self.start + (n - self.start) // block * block

    def positions(
        self, rank: int, world_size: int, worker: int = 0, workers: int = 1
    ) -> np.ndarray:
        """Global positions (indices into ``order()``) that ``worker`` of ``rank`` streams,
        in the order it yields them (with ``drop_last``, the epoch is cut for ``world_size``
        ranks, not for this stream's own world size)."""
        end = self._epoch_end(world_size)
        b = self.batch_size
        relative = np.arange(end - self.start, dtype=np.int64)
        block = relative // b
        mine = (block % world_size == rank) & ((block // world_size) % workers == worker)
        return relative[mine] + self.start

    def _mine(self) -> np.ndarray:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self.rank, self.world_size
        return self.order()[self.positions(rank, world, worker, workers)]

    # -- iteration -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Items this rank streams in the current epoch (from ``start``), all workers."""
        return len(self.positions(self.rank, self.world_size))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in self._mine():
            yield self.dataset[int(index)]

    def keys(self) -> list[str]:
        """The keys this rank/worker would stream, without reading any image."""
        return [str(self.dataset._keys[i]) for i in self._mine()]
