"""MaCheX shards -> training batches: the seeded, resumable stream, epoch after epoch.

Every split of the selection is used (the paper trains on all of MaCheX but a test set), the
held-out set named in the config is excluded, and an image that cannot be read is logged and
left out of its batch instead of stopping a run of days.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from cheff.config import DataConfig, TrainConfig
from cheff.train.stopping import ignore_notice_in_worker

log = logging.getLogger(__name__)


class SkipUnreadable:
    """A ``MaCheX`` whose unreadable items come back as ``None`` (and are logged)."""

    def __init__(self, dataset: Any) -> None:
        self._dataset = dataset

    def __getattr__(self, name: str) -> Any:
        # Not while unpickling in a spawned or forkserver worker: _dataset is not set yet, and
        # looking it up (or __setstate__) here would recurse without end.
        if name == "_dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._dataset, name)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return self._dataset[index]
        except Exception as error:  # a corrupt shard member must not end the run
            key = self._dataset._keys[index] if hasattr(self._dataset, "_keys") else index
            log.warning("skipping unreadable sample %s: %s", key, error)
            return None


def collate_readable(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    from machex import collate

    kept = [item for item in items if item is not None]
    return collate(kept) if kept else None


def several_ranks() -> bool:
    """On several ranks each epoch is cut to whole global batches, so every rank takes the
    same number of full batches (one process keeps the short last batch)."""
    from cheff.train.distributed import rank_and_world

    return rank_and_world()[1] > 1


def pinned_rank() -> dict[str, int]:
    """This process's rank and world size, fixed into the stream when it is made: a
    ``DataLoader`` worker started by spawn or forkserver has no process group to ask."""
    from cheff.train.distributed import rank_and_world

    rank, world = rank_and_world()
    return {"rank": rank, "world_size": world}


def open_stream(
    config: DataConfig, batch_size: int, seed: int, keys: Collection[str] | None = None
) -> Any:
    """The ``MaCheXStream`` of a run: images in [-1, 1] at ``config.image_size``; ``keys``
    narrows the selection (a conditioned run: the images that have a condition)."""
    from machex import MaCheX

    if not config.data:
        raise ValueError("no training data: give --data, a built MaCheX folder")
    stream = MaCheX.stream(
        config.data,
        seed=seed,
        shuffle_buffer=config.shuffle_buffer,
        batch_size=batch_size,
        sources=list(config.sources) or None,
        splits=None,
        composition=config.composition,
        where=config.where,
        exclude_holdout=config.holdout,
        image_size=config.image_size,
        value_range=(-1, 1),
        with_labels=False,
        keys=keys,
        drop_last=several_ranks(),
        **pinned_rank(),
    )
    if stream.epoch_size == 0:
        raise ValueError(f"the selection of {config.data} holds no image to train on")
    stream.dataset = SkipUnreadable(stream.dataset)
    return stream


def steps_for(epochs: float | None, max_steps: int | None, images: int, batch: int) -> int:
    """``max_steps`` if given, else ``ceil(epochs * images / batch)`` (``batch`` effective)."""
    if max_steps is not None:
        return int(max_steps)
    if epochs is None:
        raise ValueError("set train.epochs or train.max_steps (--max-steps)")
    return max(1, math.ceil(epochs * images / batch))


def run_steps(train: TrainConfig, epoch_size: int) -> int:
    """The optimiser steps of a run: ``max_steps``, else its epochs over ``epoch_size`` images
    at the effective batch (per device x accumulation x devices)."""
    from cheff.train.distributed import rank_and_world

    world = rank_and_world()[1]
    effective = train.batch_size * train.grad_accum * world
    return steps_for(train.epochs, train.max_steps, epoch_size, effective)


def batch_source(
    stream: Any, config: DataConfig, batch_size: int
) -> Callable[[dict | None, torch.device], tuple[Iterator[dict], Callable[[], dict]]]:
    """The loop's ``make_batches``: endless batches from a stream position, and the position.
    For a CUDA device the loader pins each batch (in a thread of its own when
    ``num_workers`` > 0), so that its copy to the device waits for nothing."""

    def make(state: dict | None, device: torch.device) -> tuple[Iterator[dict], Callable[[], dict]]:
        if state is not None:
            stream.load_state_dict(state)
        taken = [0]

        def batches() -> Iterator[dict]:
            while True:
                loader = DataLoader(
                    stream,
                    batch_size=batch_size,
                    num_workers=config.num_workers,
                    collate_fn=collate_readable,
                    generator=torch.Generator(),  # never draw from the global RNG
                    pin_memory=device.type == "cuda",
                    persistent_workers=False,
                    # SIGUSR1 asks the run to checkpoint and stop: the workers must outlive it
                    worker_init_fn=ignore_notice_in_worker if config.num_workers else None,
                )
                taken[0], given, fresh = 0, 0, stream.start == 0
                for batch in loader:
                    taken[0] += 1
                    if batch is not None:
                        given += 1
                        yield batch
                # An empty fresh epoch would repeat for ever; a resumed one may be a tail that
                # no longer fills one global batch (more ranks than wrote the position).
                if given == 0 and fresh:
                    raise ValueError(
                        f"an epoch of {stream.epoch_size} images gave this rank no batch: the "
                        f"selection is smaller than one global batch ({stream.world_size} "
                        f"ranks x {batch_size}) or none of its images could be read"
                    )
                stream.set_epoch(stream.epoch + 1)

        return batches(), lambda: stream.state_dict(taken[0])

    return make


def holdout_record(root: str | Path | None, name: str | None) -> dict[str, str]:
    """What a trained checkpoint's header says of the held-out set the run left out: its
    name (``"none"``: every image was used) and the SHA-256 of its keys (empty where the set
    cannot be read from ``root``). ``cheff eval recon`` compares them with the set it scores
    on (``cheff.checkpoints.read_training_holdout``)."""
    if not name or name.lower() == "none":
        return {"holdout": "none", "holdout_sha256": ""}
    digest = ""
    if root is not None:
        from machex.holdout import holdout_fingerprint

        try:
            digest = holdout_fingerprint(Path(root), name)
        except Exception as error:  # noqa: BLE001 - the name is still worth recording
            log.warning("cannot fingerprint the held-out set %r of %s: %s", name, root, error)
    return {"holdout": name, "holdout_sha256": digest}
