"""``machex.MaCheX`` over a built sample: random access by offset, decoding, filters, labels,
boxes, reports, held-out sets, DataLoader workers (fork and spawn), and ``machex.resize``."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import machex.dataset
from machex import MaCheX, collate, load_manifest, resize
from machex.build import BuildOptions, build_source
from machex.imaging import Encoding, PixelOptions
from machex.records import FINDINGS
from machex.tables import load_composition

SOURCES = ("chexpert", "mimic", "vindr")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, sample_roots_pristine) -> Path:
    out = tmp_path_factory.mktemp("built")
    for source in SOURCES:
        build_source(
            source, sample_roots_pristine[source], out, BuildOptions(workers=1, shard_size=5)
        )
    return out


@pytest.fixture(scope="module")
def built_png16(tmp_path_factory: pytest.TempPathFactory, sample_roots_pristine) -> Path:
    out = tmp_path_factory.mktemp("built16")
    options = BuildOptions(workers=1, pixels=PixelOptions(encoding=Encoding.png16))
    build_source("vindr", sample_roots_pristine["vindr"], out, options)
    return out


def all_images(out: Path) -> pd.DataFrame:
    return load_manifest(out, "images")


def write_holdout(out: Path, name: str, frame: pd.DataFrame) -> None:
    folder = out / "manifests" / "holdouts"
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(
        frame[["key", "source", "patient_id"]].reset_index(drop=True), preserve_index=False
    )
    pq.write_table(table, folder / f"{name}.parquet")
    (folder / f"{name}.json").write_text("{}\n")  # the sidecar marks the set complete


# -- random access and decoding --------------------------------------------------------------


def test_reads_exactly_the_bytes_the_builder_wrote(built: Path, monkeypatch) -> None:
    ds = MaCheX(built, splits=None)
    images = all_images(built)
    assert len(ds) == len(images) > 20
    assert sorted(ds.manifest["key"]) == sorted(images["key"])
    assert ds.manifest["shard"].nunique() > 3  # several shards per source

    def no_tar(*args, **kwargs):
        raise AssertionError("random access must not open the tar as an archive")

    monkeypatch.setattr(tarfile, "open", no_tar)
    for index in reversed(range(len(ds))):  # out of order on purpose
        row = ds.manifest.iloc[index]
        data = ds.read_bytes(index)
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        item = ds[index]
        assert item["key"] == row["key"] and item["source"] == row["source"]
        with Image.open(io.BytesIO(data)) as image:
            expected = np.asarray(image.convert("L"), dtype=np.float32) / 255
        assert item["image"].dtype == torch.float32
        assert item["image"].shape == (1, 1024, 1024)
        assert torch.equal(item["image"][0], torch.from_numpy(expected))


def test_threads_sharing_one_dataset_read_the_right_bytes(built: Path, monkeypatch) -> None:
    """A seek then a read on a shared handle interleaves between threads (wrong bytes, short
    reads); ``os.pread`` does not. With room for 2 open shards, readers also evict shards
    that other threads are reading."""
    monkeypatch.setattr(machex.dataset, "_MAX_OPEN_SHARDS", 2)
    ds = MaCheX(built, splits=None)
    expected = ds.manifest["sha256"].tolist()
    assert ds.manifest["shard"].nunique() > 2
    threads, rounds = 8, 12
    start = threading.Barrier(threads)
    wrong: list[tuple[int, str]] = []

    def reader(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(np.tile(np.arange(len(ds)), rounds))
        start.wait()
        for index in order.tolist():
            try:
                if hashlib.sha256(ds.read_bytes(index)).hexdigest() != expected[index]:
                    wrong.append((index, "wrong bytes"))
            except OSError as error:
                wrong.append((index, repr(error)))

    pool = [threading.Thread(target=reader, args=(seed,)) for seed in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: between a seek and its read too
    try:
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, f"{len(wrong)} of {threads * rounds * len(ds)} reads failed: {wrong[:5]}"
    assert len(ds._handles) <= 2
    assert all(handle.readers == 0 for handle in ds._handles.values())


def test_forked_child_closes_the_inherited_shards(built: Path) -> None:
    """A forked child (a DataLoader worker) closes its copies of the parent's descriptors
    instead of dropping them (``ResourceWarning: unclosed file``), and the parent's stay
    open."""
    if "fork" not in multiprocessing.get_all_start_methods() or not Path("/proc/self/fd").is_dir():
        pytest.skip("needs the fork start method and /proc/self/fd")
    ds = MaCheX(built, splits=None)
    shards = ds.manifest["shard"].tolist()
    firsts = [shards.index(name) for name in dict.fromkeys(shards)]
    for index in firsts:  # one open descriptor per shard in the parent
        ds.read_bytes(index)
    assert len(ds._handles) == len(firsts) > 3
    paths = {str((built / name).resolve()) for name in shards}

    def open_shards() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
                count += os.readlink(f"/proc/self/fd/{fd}") in paths
        return count

    def child(conn) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = ds.read_bytes(firsts[-1])
            gc.collect()
        conn.send(
            (
                [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)],
                hashlib.sha256(data).hexdigest(),
                open_shards(),
            )
        )
        conn.close()

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(send,))
    process.start()
    resource_warnings, digest, child_open = receive.recv()
    process.join(timeout=60)
    assert process.exitcode == 0
    assert resource_warnings == []
    assert digest == ds.manifest["sha256"][firsts[-1]]
    assert child_open == 1  # only the shard it read, not the inherited ones
    assert open_shards() == len(firsts)  # the parent's are still open, and read
    for index in firsts:
        assert hashlib.sha256(ds.read_bytes(index)).hexdigest() == ds.manifest["sha256"][index]


def test_png16_scaled_by_65535(built_png16: Path) -> None:
    ds = MaCheX(built_png16, splits=None)
    assert len(ds) > 0
    for index in range(len(ds)):
        with Image.open(io.BytesIO(ds.read_bytes(index))) as image:
            expected = np.asarray(image, dtype=np.float64)
        item = ds[index]["image"][0].double().numpy()
        assert expected.max() > 255  # really 16-bit
        np.testing.assert_allclose(item, expected / 65535, atol=1e-6)


def test_value_range_transform_and_negative_index(built: Path) -> None:
    plain = MaCheX(built, sources="vindr")
    scaled = MaCheX(built, sources="vindr", value_range=(-1, 1), transform=lambda x: x * 10)
    a, b = plain[-1], scaled[len(scaled) - 1]
    assert a["key"] == b["key"]
    torch.testing.assert_close(b["image"], (a["image"] * 2 - 1) * 10)
    with pytest.raises(IndexError):
        plain[len(plain)]


def test_pickles_without_handles(built: Path) -> None:
    ds = MaCheX(built, sources="chexpert")
    first = ds[0]
    assert ds._handles  # a handle was opened lazily
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._handles
    assert torch.equal(clone[0]["image"], first["image"])


# -- selection ------------------------------------------------------------------------------


def test_sources_and_splits(built: Path) -> None:
    images = all_images(built)
    ds = MaCheX(built)  # default: train, every source
    assert set(ds.manifest["key"]) == set(images.loc[images["split"] == "train", "key"])
    ds = MaCheX(built, sources=["mimic", "vindr"], splits=["val", "test"])
    expected = images[
        images["source"].isin(["mimic", "vindr"]) & images["split"].isin(["val", "test"])
    ]
    assert set(ds.manifest["key"]) == set(expected["key"]) and len(expected) > 0
    assert (
        len(MaCheX(built, sources="chexpert", splits=None))
        == (images["source"] == "chexpert").sum()
    )
    with pytest.raises(ValueError, match="unknown split or held-out set 'nope'"):
        MaCheX(built, splits="nope")


def test_sources_by_alias_and_unknown_names_refused(built: Path) -> None:
    images = all_images(built)
    mimic = set(images.loc[images["source"] == "mimic", "key"])
    assert mimic
    for name in ("mimic", "mimic-cxr", ["MIMIC-CXR-JPG"], ("mimic",)):
        assert set(MaCheX(built, sources=name, splits=None).manifest["key"]) == mimic, name
    built_list = r"\['chexpert', 'mimic', 'vindr'\]"
    with pytest.raises(ValueError, match=rf"\['nope'\] are not built in .*{built_list}"):
        MaCheX(built, sources=["mimic", "nope"])
    # `nih` (the CLI's alias of chestxray14) is known but not built here.
    with pytest.raises(ValueError, match=rf"\['nih'\] are not built in .*{built_list}"):
        MaCheX(built, sources="nih")


def test_sources_outside_the_composition_refused(report_collection: Path) -> None:
    assert "openi" not in {source for source, _ in load_composition("paper-2023")}
    with pytest.raises(ValueError, match=r"\['openi'\] are not in composition 'paper-2023'"):
        MaCheX(report_collection, composition="paper-2023", sources="open-i")
    only_mimic = MaCheX(report_collection, composition="paper-2023", sources="mimic")
    assert len(only_mimic) > 0 and set(only_mimic.manifest["source"]) == {"mimic"}


def test_load_manifest_sources_a_name_or_an_alias(built: Path) -> None:
    images = all_images(built)
    vindr = images.loc[images["source"] == "vindr", "key"].tolist()
    assert load_manifest(built, "images", "vindr")["key"].tolist() == vindr
    assert load_manifest(built, "images", "vindr-cxr")["key"].tolist() == vindr
    # A str is one name, not a container to match substrings in.
    assert load_manifest(built, "images", "vindr,mimic").empty
    assert load_manifest(str(built), "labels", ["VinDr-CXR"])["key"].tolist() == vindr


def test_unfinished_build_is_loaded_with_a_warning(built: Path, tmp_path: Path) -> None:
    """An interrupted build (status in_progress in build.json) loads as it is, but not
    without a word: ``machex holdout`` refuses the same folder."""
    out = tmp_path / "out"
    shutil.copytree(built, out)
    record = json.loads((out / "build.json").read_text())
    record["sources"]["chexpert"]["status"] = "in_progress"
    (out / "build.json").write_text(json.dumps(record))
    chexpert = int((all_images(out)["source"] == "chexpert").sum())
    with pytest.warns(UserWarning) as caught:
        ds = MaCheX(out, splits=None)
    assert len(ds) == len(all_images(out))  # not refused
    assert [str(w.message) for w in caught] == [
        f"{out}: the build of chexpert ({chexpert:,} images so far) is not complete, so this "
        "dataset holds only part of it; re-run the same `machex build` command to finish it"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaCheX(out, sources=["mimic", "vindr"])  # complete sources: no warning
        MaCheX(built)


def test_manifest_in_item_order(built: Path) -> None:
    ds = MaCheX(built, splits=None)
    assert list(ds.manifest.index) == list(range(len(ds)))
    assert [ds[i]["key"] for i in range(0, len(ds), 7)] == list(ds.manifest["key"][::7])
    assert ds.label_names == list(FINDINGS) and len(ds.label_names) == 14


def joined(built: Path) -> pd.DataFrame:
    return all_images(built).merge(load_manifest(built, "labels"), on=["key", "source"], how="left")


def test_where_query_callable_and_expression_agree(built: Path) -> None:
    frame = joined(built)
    expected = set(
        frame.loc[(frame["source"] == "chexpert") & (frame["Cardiomegaly"] == -1), "key"]
    )
    assert expected  # the sample has uncertain cardiomegaly
    query = MaCheX(built, splits=None, where="source == 'chexpert' and Cardiomegaly == -1")
    func = MaCheX(
        built,
        splits=None,
        where=lambda f: (f["source"] == "chexpert") & (f["Cardiomegaly"] == -1),
    )
    expr = MaCheX(
        built,
        splits=None,
        where=(pc.field("source") == "chexpert") & (pc.field("Cardiomegaly") == -1),
    )
    for ds in (query, func, expr):
        assert set(ds.manifest["key"]) == expected
    # Names with spaces, and nulls count as False (not an error).
    effusion = MaCheX(built, splits=None, where="`Pleural Effusion` == 1")
    assert set(effusion.manifest["key"]) == set(frame.loc[frame["Pleural Effusion"] == 1, "key"])
    assert len(MaCheX(built, where="source == 'nowhere'")) == 0


def test_a_where_series_in_another_order_is_lined_up_by_label(built: Path) -> None:
    """pd.concat of per-source conditions gives the right labels in another order; it was
    applied by position, selecting other images than the condition."""

    def by_source(frame):
        parts = [g["Cardiomegaly"] == 1 for _, g in frame.groupby("source", sort=False)]
        return pd.concat(parts[::-1])

    wanted = MaCheX(built, where="Cardiomegaly == 1")
    chosen = MaCheX(built, where=by_source)
    assert len(wanted) > 0 and sorted(chosen.manifest["key"]) == sorted(wanted.manifest["key"])
    with pytest.raises(ValueError, match="index is not the frame's"):
        MaCheX(built, where=lambda f: pd.Series(True, index=range(10**6, 10**6 + len(f))))


def test_where_assignment_is_refused_with_a_hint(built: Path) -> None:
    with pytest.raises(ValueError, match=r"'Cardiomegaly = 1' is an assignment.*'=='"):
        MaCheX(built, where="Cardiomegaly = 1")
    with pytest.raises(ValueError, match=r"where='foo == 1': UndefinedVariableError.*'Edema'"):
        MaCheX(built, where="foo == 1")  # the columns it could have used, Edema among them
    with pytest.raises(ValueError, match="a table of 2 columns; expected one boolean per row"):
        MaCheX(built, where=lambda f: f[["Edema", "Cardiomegaly"]] == 1)


def test_composition(built: Path) -> None:
    pairs = set(load_composition("paper-2023"))
    images = all_images(built)
    expected = {
        k for k, s, p in zip(images["key"], images["source"], images["split"]) if (s, p) in pairs
    }
    ds = MaCheX(built, composition="paper-2023")
    assert set(ds.manifest["key"]) == expected
    assert {"test", "val"} <= set(ds.manifest["split"])  # MIMIC: every split
    assert set(ds.manifest.loc[ds.manifest["source"] == "vindr", "split"]) == {"train"}
    narrowed = MaCheX(built, composition="paper-2023", splits="val", sources=["mimic", "vindr"])
    assert set(narrowed.manifest["key"]) == set(
        images.loc[(images["source"] == "mimic") & (images["split"] == "val"), "key"]
    )


def test_holdouts(built: Path, tmp_path: Path) -> None:
    images = all_images(built)
    held = images[images["source"] == "chexpert"].iloc[:4]
    write_holdout(built, "my-holdout", held)
    try:
        exact = MaCheX(built, splits="my-holdout")
        assert sorted(exact.manifest["key"]) == sorted(held["key"])  # train and val alike
        both = MaCheX(built, splits=["my-holdout", "test"])
        assert set(both.manifest["key"]) == set(held["key"]) | set(
            images.loc[images["split"] == "test", "key"]
        )
        rest = MaCheX(built, splits=None, exclude_holdout="my-holdout")
        assert set(rest.manifest["key"]) == set(images["key"]) - set(held["key"])
        with pytest.raises(
            ValueError, match=r"no held-out set 'other'.*available: \['my-holdout'\]"
        ):
            MaCheX(built, exclude_holdout="other")
        (built / "manifests" / "holdouts" / "my-holdout.json").unlink()  # as if still written
        with pytest.raises(ValueError, match="unknown split or held-out set 'my-holdout'"):
            MaCheX(built, splits="my-holdout")
    finally:
        for suffix in (".parquet", ".json"):
            (built / "manifests" / "holdouts" / f"my-holdout{suffix}").unlink(missing_ok=True)


# -- labels, boxes, reports -----------------------------------------------------------------


def test_labels_nan_for_null_and_uncertain_kept(built: Path) -> None:
    ds = MaCheX(built, splits=None)
    labels = load_manifest(built, "labels").set_index("key")
    seen = set()
    for index in range(len(ds)):
        item = ds[index]
        assert item["labels"].dtype == torch.float32 and item["labels"].shape == (14,)
        row = labels.loc[item["key"], list(FINDINGS)]
        for value, got in zip(row, item["labels"].tolist()):
            if pd.isna(value):
                assert np.isnan(got)
            else:
                assert got == float(value)
            seen.add("nan" if np.isnan(got) else got)
    assert {"nan", -1.0, 0.0, 1.0} <= seen
    assert "labels" not in MaCheX(built, with_labels=False)[0]


@pytest.mark.parametrize("size", [1024, 256])
def test_boxes_scaled_to_image_size(built: Path, size: int) -> None:
    ds = MaCheX(built, sources="vindr", splits=None, with_boxes=True, image_size=size)
    boxes = load_manifest(built, "bboxes")
    assert len(boxes) > 0
    total = 0
    for index in range(len(ds)):
        item = ds[index]
        assert item["image"].shape == (1, size, size)
        rows = boxes[boxes["key"] == item["key"]]
        assert item["boxes"].shape == (len(rows), 4) and item["boxes"].dtype == torch.float32
        assert item["box_labels"] == list(rows["label"])
        expected = np.stack(
            [rows["x"], rows["y"], rows["x"] + rows["width"], rows["y"] + rows["height"]], axis=1
        ).reshape(-1, 4) * (size / 1024)
        np.testing.assert_allclose(item["boxes"].numpy(), expected, rtol=1e-5, atol=1e-3)
        assert (item["boxes"] >= 0).all() and (item["boxes"] <= size + 1e-3).all()
        total += len(rows)
    assert total == len(boxes)


def test_reports_are_the_conditioning_text(built: Path) -> None:
    ds = MaCheX(built, splits=None, with_reports=True)
    reports = load_manifest(built, "reports").set_index(["source", "study_id"])
    with_text = 0
    for index in range(len(ds)):
        item = ds[index]
        row = ds.manifest.iloc[index]
        with tarfile.open(built / row["shard"]) as tar:
            sample = json.loads(tar.extractfile(f"{item['key']}.json").read())
        assert item["report"] == (sample["report"] or "")
        study = (item["source"], row["study_id"])
        if study in reports.index and isinstance(reports.loc[study, "text_v1"], str):
            assert item["report"] == reports.loc[study, "text_v1"]  # --report-text default
            with_text += 1
        else:
            assert item["report"] == ""  # no report (CheXpert, VinDr-CXR, a MIMIC gap)
    assert with_text > 0
    assert "report" not in MaCheX(built)[0]


# -- collate and workers --------------------------------------------------------------------


def test_collate_variable_boxes_and_absent_fields(built: Path) -> None:
    ds = MaCheX(
        built, sources="vindr", splits=None, with_boxes=True, with_reports=True, image_size=64
    )
    counts = [len(ds[i]["boxes"]) for i in range(len(ds))]
    assert len(set(counts)) > 1  # the sample has images with different box counts
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (len(ds), 1, 64, 64)
    assert batch["labels"].shape == (len(ds), 14)
    assert isinstance(batch["key"], list) and isinstance(batch["report"], list)
    assert [len(b) for b in batch["boxes"]] == counts
    assert isinstance(batch["box_labels"], list)
    lean = collate([MaCheX(built, with_labels=False, image_size=32)[i] for i in range(3)])
    assert set(lean) == {"image", "key", "source"}


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_yield_every_key_once(built: Path, context: str) -> None:
    if context not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {context} start method here")
    ds = MaCheX(built, splits=None, image_size=64, with_boxes=True, with_reports=True)
    ds[0]  # an open handle in the parent must not leak into (or be pickled for) workers
    loader = DataLoader(
        ds,
        batch_size=4,
        shuffle=True,
        num_workers=2,
        collate_fn=collate,
        multiprocessing_context=context,
        generator=torch.Generator().manual_seed(0),
    )
    keys = []
    for batch in loader:
        keys.extend(batch["key"])
        assert batch["image"].shape[1:] == (1, 64, 64)
    assert sorted(keys) == sorted(ds.manifest["key"])


# -- resize ----------------------------------------------------------------------------------


def test_resize_is_antialiased() -> None:
    def board(n: int) -> torch.Tensor:
        return ((torch.arange(n)[:, None] + torch.arange(n)[None, :]) % 2).float()

    out = resize(board(64), 16)  # 4x down: flat grey at the board's mean
    assert out.shape == (16, 16)
    torch.testing.assert_close(out, torch.full((16, 16), 0.5), atol=0.01, rtol=0)
    # 5x down, where plain bicubic samples pixel centres: without antialiasing the board
    # survives as full-contrast aliasing; with it the result is flat.
    aliased = torch.nn.functional.interpolate(board(80)[None, None], size=16, mode="bicubic")
    assert aliased.std() > 0.4
    assert resize(board(80), 16).std() < 0.01


def test_resize_shapes_dtype_and_range() -> None:
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(2, 3, 40, 30, generator=generator) * 0.5 + 0.25
    out = resize(batch, (20, 10))
    assert out.shape == (2, 3, 20, 10) and out.dtype == torch.float32
    assert resize(batch.double(), 8).dtype == torch.float64
    assert resize(batch, (40, 30)) is batch
    # A hard edge enlarged: bicubic overshoots, the clamp keeps each image in its own range.
    step = torch.zeros(2, 16, 16)
    step[0, :, 8:] = 1.0
    step[1] = step[0] * 0.5 + 0.25
    big = resize(step, 64)
    for image, source in zip(big, step):
        assert image.min() >= source.min() and image.max() <= source.max()
    raw = torch.nn.functional.interpolate(step[:, None], size=64, mode="bicubic", antialias=True)
    assert raw.max() > 1.0 or raw.min() < 0.0  # there was an overshoot to clamp
    with pytest.raises(TypeError):
        resize(torch.zeros(4, 4, dtype=torch.uint8), 2)


@pytest.mark.parametrize(
    "size", [np.int64(24), np.int32(24), torch.tensor(24), torch.tensor(24, dtype=torch.int32)]
)
def test_resize_takes_numpy_and_torch_integers(size) -> None:
    image = torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resize(image, size), resize(image, 24))
    pair = (np.int64(24), torch.tensor(16))
    assert torch.equal(resize(image, pair), resize(image, (24, 16)))
    assert resize(image, np.array([24, 16])).shape == (2, 24, 16)
    for bad in (24.0, (24,), "24", (24.5, 16)):
        with pytest.raises(TypeError, match=r"an integer or \(height, width\) integers, got"):
            resize(image, bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_resize_keeps_half_dtypes_on_the_cpu(dtype: torch.dtype) -> None:
    image = torch.rand(3, 40, 30, generator=torch.Generator().manual_seed(0)).to(dtype)
    for size in (16, 64):  # down and up
        out = resize(image, size)
        assert out.dtype == dtype and out.shape == (3, size, size)
        expected = resize(image.float(), size).to(dtype)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_dataset_resize_is_machex_resize(built: Path) -> None:
    full, small = (
        MaCheX(built, sources="chexpert"),
        MaCheX(built, sources="chexpert", image_size=256),
    )
    assert torch.equal(small[0]["image"], resize(full[0]["image"], 256))


def test_import_machex_does_not_import_torch() -> None:
    code = (
        "import sys, machex; assert 'torch' not in sys.modules and 'pandas' not in sys.modules;"
        "from machex import MaCheX, collate, resize; import types;"
        "assert isinstance(resize, types.FunctionType), resize"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("size", [0, 256.5, True])
def test_image_size_must_be_a_positive_whole_number(built: Path, size: object) -> None:
    with pytest.raises(ValueError, match="image_size must be a positive whole number"):
        MaCheX(built, image_size=size)  # 256.5 was cut to 256 without a word
