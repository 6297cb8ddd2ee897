"""``MaCheX.stream``: every selected sample once per epoch across ranks x workers, a seeded
order independent of the layout, exact resume from the global count (also 2 -> 1 ranks), and
items identical to the map-style dataset's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from machex import MaCheX, collate
from machex.build import BuildOptions, build_source
from machex.sample import make_sample
from machex.stream import MaCheXStream, epoch_order

SOURCES = ("chexpert", "vindr", "mimic")
SIZE = 32  # small images: the tests are about order, not pixels


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    roots = make_sample(tmp_path_factory.mktemp("sample"), list(SOURCES))
    out = tmp_path_factory.mktemp("built")
    for source in SOURCES:
        build_source(source, roots[source], out, BuildOptions(workers=1, shard_size=5))
    return out


def stream(built: Path, **kwargs) -> MaCheXStream:
    kwargs.setdefault("image_size", SIZE)
    kwargs.setdefault("splits", None)
    kwargs.setdefault("shuffle_buffer", 7)
    return MaCheX.stream(built, **kwargs)


def batches(ds: MaCheXStream, workers: int, limit: int | None = None) -> list[list[str]]:
    """The key lists of the batches a DataLoader with ``workers`` workers yields."""
    loader = DataLoader(ds, batch_size=ds.batch_size, num_workers=workers, collate_fn=collate)
    out = []
    for batch in loader:
        if limit is not None and len(out) == limit:
            break
        out.append(batch["key"])
    return out


def flat(lists: list[list[str]]) -> list[str]:
    return [key for keys in lists for key in keys]


def global_keys(ds: MaCheXStream, epoch: int | None = None) -> list[str]:
    return [str(ds.dataset._keys[i]) for i in ds.order(epoch)]


def test_every_sample_once_across_ranks_and_workers(built: Path) -> None:
    world, batch = 2, 3
    ranks = [stream(built, rank=r, world_size=world, batch_size=batch) for r in range(world)]
    n = ranks[0].epoch_size
    assert n > 4 * batch * world  # the sample spans several rounds of blocks
    assert len(ranks[0].dataset._shards) > 3  # and several shards
    per_rank = [batches(ds, workers=2) for ds in ranks]
    keys = flat(per_rank[0]) + flat(per_rank[1])
    assert sorted(keys) == sorted(ranks[0].dataset._keys.tolist())
    assert len(set(keys)) == n
    assert [len(ds) for ds in ranks] == [len(flat(b)) for b in per_rank]
    # Rank r's j-th batch is global block j * world + r, whatever the worker count.
    order = global_keys(ranks[0])
    blocks = [order[i : i + batch] for i in range(0, n, batch)]
    for r in range(world):
        assert per_rank[r] == blocks[r::world]
        assert batches(ranks[r], workers=0) == per_rank[r]
    # The selection is the map-style one.
    selected = stream(built, splits="train", rank=0, world_size=1)
    assert sorted(global_keys(selected)) == sorted(MaCheX(built)._keys.tolist())


def test_order_seeded_by_seed_and_epoch(built: Path) -> None:
    a, b = stream(built, seed=3), stream(built, seed=3)
    assert global_keys(a) == global_keys(b)
    assert flat(batches(a, workers=0)) == global_keys(a)
    first = global_keys(a)
    a.set_epoch(1)
    assert global_keys(a) != first
    assert sorted(global_keys(a)) == sorted(first)
    assert global_keys(stream(built, seed=4)) != first
    # Shuffled: not the manifest order; unshuffled: grouped by shard, in offset order.
    assert first != a.dataset._keys.tolist()
    plain = stream(built, shuffle=False)
    shards = plain.dataset._shard_index[plain.order()]
    assert (np.diff(shards) >= 0).all()


def test_order_is_independent_of_the_layout(built: Path) -> None:
    base = stream(built, seed=5, rank=0, world_size=1)
    for world in (1, 2, 3):
        for workers in (1, 2, 4):
            got = [
                base.positions(r, world, w, workers) for r in range(world) for w in range(workers)
            ]
            positions = np.sort(np.concatenate(got))
            assert (positions == np.arange(base.epoch_size)).all()


def test_epoch_order_windows() -> None:
    shard = np.repeat(np.arange(10), 5)
    offsets = np.tile(np.arange(5) * 1024, 10)
    order = epoch_order(shard, offsets, seed=0, epoch=0, shuffle_buffer=10)
    assert sorted(order.tolist()) == list(range(50))
    # Windows of whole shards with >= 10 items: every window of 10 covers exactly 2 shards.
    for i in range(0, 50, 10):
        assert len(set(shard[order[i : i + 10]].tolist())) == 2
    only_shards = epoch_order(shard, offsets, seed=0, epoch=0, shuffle_buffer=0)
    for i in range(0, 50, 5):
        assert len(set(shard[only_shards[i : i + 5]].tolist())) == 1
        assert (np.diff(offsets[only_shards[i : i + 5]]) > 0).all()


@pytest.mark.parametrize("new_world", [2, 1])
def test_resume_neither_repeats_nor_skips(built: Path, new_world: int) -> None:
    world, batch, taken = 2, 2, 3
    ranks = [
        stream(built, seed=1, epoch=2, rank=r, world_size=world, batch_size=batch)
        for r in range(world)
    ]
    consumed = [flat(batches(ds, workers=2, limit=taken)) for ds in ranks]
    state = ranks[0].state_dict(taken)
    assert state == ranks[1].state_dict(taken)
    assert state == {"epoch": 2, "seen": taken * world * batch}
    order = global_keys(ranks[0])
    assert sorted(consumed[0] + consumed[1]) == sorted(order[: state["seen"]])

    resumed = []
    for r in range(new_world):
        ds = stream(built, seed=1, rank=r, world_size=new_world, batch_size=batch)
        ds.load_state_dict(state)
        ds.set_epoch(2)  # the same epoch keeps the resume point
        assert ds.start == state["seen"]
        resumed += flat(batches(ds, workers=2))
    everything = consumed[0] + consumed[1] + resumed
    assert len(everything) == len(set(everything)) == len(order)
    assert sorted(resumed) == sorted(order[state["seen"] :])
    ds.set_epoch(3)
    assert ds.start == 0


def test_resume_with_another_batch_size_and_state_at_epoch_end(built: Path) -> None:
    ds = stream(built, seed=2, batch_size=4)
    order = global_keys(ds)
    ds.load_state_dict({"epoch": 0, "seen": 5})  # not a multiple of the new batch size
    assert flat(batches(ds, workers=2)) == order[5:]
    assert ds.state_dict(10**6) == {"epoch": 1, "seen": 0}
    with pytest.raises(ValueError):
        ds.load_state_dict({"epoch": 0, "seen": ds.epoch_size + 1})


def test_drop_last_gives_every_rank_full_batches(built: Path) -> None:
    world, batch = 2, 4
    ranks = [
        stream(built, rank=r, world_size=world, batch_size=batch, drop_last=True)
        for r in range(world)
    ]
    sizes = [[len(b) for b in batches(ds, workers=0)] for ds in ranks]
    assert sizes[0] == sizes[1]
    assert set(sizes[0]) == {batch}
    assert sum(map(sum, sizes)) == ranks[0].epoch_size // (world * batch) * world * batch


def test_positions_cut_the_epoch_for_the_world_size_given(built: Path) -> None:
    """``positions(rank, world_size)`` of a 1-rank stream is what a real ``world_size``-rank
    stream streams, ``drop_last`` included: the epoch is cut to whole batches on *those*
    ranks (cut for one rank, the ranks' counts differ and DDP hangs)."""
    batch = 4
    single = stream(built, batch_size=batch, drop_last=True, rank=0, world_size=1)
    differs = False
    for start in (0, 5):
        single.load_state_dict({"epoch": 0, "seen": start})
        for world in (2, 3, 4):
            ranks = [
                stream(built, rank=r, world_size=world, batch_size=batch, drop_last=True)
                for r in range(world)
            ]
            for ds in ranks:
                ds.load_state_dict({"epoch": 0, "seen": start})
            cut = (single.epoch_size - start) // (world * batch) * world * batch
            counts = []
            for r, ds in enumerate(ranks):
                mine = single.positions(r, world)
                np.testing.assert_array_equal(mine, ds.positions(r, world))
                assert [str(single.dataset._keys[i]) for i in single.order()[mine]] == ds.keys()
                counts.append(len(mine))
            assert counts == [len(ds) for ds in ranks] == [cut // world] * world, (start, world)
            differs |= cut != len(single.positions(0, 1))
    assert differs  # some cut for several ranks is not the cut for one


def test_items_equal_the_map_style_items(built: Path) -> None:
    options = dict(image_size=48, value_range=(-1, 1), with_reports=True, with_boxes=True)
    ds = stream(built, **options, shuffle_buffer=3)
    mapped = MaCheX(built, splits=None, **options)
    index = {key: i for i, key in enumerate(mapped._keys.tolist())}
    seen_boxes = False
    for item in DataLoader(ds, batch_size=None, num_workers=2):
        reference = mapped[index[item["key"]]]
        assert item.keys() == reference.keys()
        for name, value in reference.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(item[name], value, rtol=0, atol=0, equal_nan=True)
            else:
                assert item[name] == value, name
        seen_boxes |= len(item["boxes"]) > 0
    assert seen_boxes


def test_bad_arguments(built: Path) -> None:
    with pytest.raises(ValueError):
        stream(built, rank=0)
    with pytest.raises(ValueError):
        stream(built, rank=2, world_size=2)
    with pytest.raises(ValueError):
        stream(built, batch_size=0)
    with pytest.raises(ValueError):
        stream(built, start=-1)


def test_spawned_workers_stream_their_ranks_share(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``spawn`` worker joins no process group: asking torch.distributed itself it saw
    rank 0 of 1, so every DDP rank streamed the whole epoch. It now gets its rank with the
    pickled stream. Here this process plays rank 1 of 2; the worker is a real spawned one."""
    import machex.stream

    monkeypatch.setattr(machex.stream, "_distributed", lambda: (1, 2))
    ds = stream(built, batch_size=3)  # rank and world size from torch.distributed
    assert (ds.rank, ds.world_size) == (1, 2)
    loader = DataLoader(
        ds, batch_size=3, num_workers=1, collate_fn=collate, multiprocessing_context="spawn"
    )
    spawned = [batch["key"] for batch in loader]
    explicit = stream(built, batch_size=3, rank=1, world_size=2)
    assert spawned == batches(explicit, workers=0)
    assert len(flat(spawned)) == len(ds) < ds.epoch_size
