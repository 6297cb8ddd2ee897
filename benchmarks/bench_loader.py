"""Loading speed and worker memory of a built collection, against the original layout.

    python benchmarks/bench_loader.py [--images 5000] [--quick] [--json-out FILE]

Builds, in a scratch folder, a CheXpert-like collection of ``--images`` 1024x1024 grayscale
JPEGs q95 with realistic entropy (synthetic radiographs plus film grain, written at 1024x1024
and built with ``build_source(..., BuildOptions(workers=2))``), exports it in the original
MaCheX layout (``machex.export.export_index``: ``NN/NNNNNN.jpg`` RGB q95 + ``index.json``) and
times one epoch of ``DataLoader(batch_size=32, collate_fn=machex.collate)`` at
``num_workers`` 0, 1 and 2 for:

- (a) ``MaCheX(root)``: random access (``shuffle=True``), members read by manifest offset;
- (b) ``MaCheX.stream``: sequential shard reading, when it exists (otherwise skipped);
- (c) the original approach: ``index.json`` + ``Image.open(path).convert("RGB")`` then to a
  float tensor ``[3, H, W]`` in ``[0, 1]`` (what ``torchvision.transforms.ToTensor`` does);
- (d) the decode floor: the same JPEG member bytes, held in memory (one shared buffer), decoded
  with PIL to a float tensor ``[1, H, W]``: no file I/O, no resize, no labels.

Each epoch is timed after a short warm-up (the first ``2 * max(1, num_workers)`` batches,
which include the workers' start-up). Worker memory: ``VmRSS`` of the DataLoader's worker
processes (the children of this process, from ``/proc``) when 10% and 100% of the epoch's
images have arrived; with ``num_workers=0`` the main process's. Prints a table and the
issue's targets as PASS/FAIL; ``--json-out`` keeps every figure.
"""

from __future__ import annotations

import os

# One thread per process: set before numpy/torch load their thread pools.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
from bench_common import Target, code_version, cpu_model  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from machex import MaCheX, collate  # noqa: E402
from machex.build import BuildOptions, build_source  # noqa: E402
from machex.export import export_index  # noqa: E402
from machex.sample import make_sample, synthetic_radiograph  # noqa: E402

SIDE = 1024
BATCH_SIZE = 32
WORKERS = (0, 1, 2)
#: Film-grain noise, in 8-bit grey levels (as in bench_build.py).
GRAIN_SIGMA = 2.0
#: Distinct source images; the rest of the collection repeats them (same bytes, new keys).
DISTINCT = 96
MEMORY_GROWTH_MB = 50.0


# --- the collection -----------------------------------------------------------------------


def chexpert_1024(scratch: Path, images: int, rng: np.random.Generator) -> Path:
    """A CheXpert-like miniature whose ``images`` frontal images are 1024x1024 JPEG q95."""
    root = make_sample(scratch / "sample", ["chexpert"])["chexpert"]
    train = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    template = train[train["Frontal/Lateral"] == "Frontal"].iloc[0]
    distinct = []
    for i in range(min(DISTINCT, images)):
        pixels = synthetic_radiograph(rng, SIDE, SIDE).astype(np.float32)
        pixels += rng.normal(0.0, GRAIN_SIGMA, pixels.shape).astype(np.float32)
        path = scratch / "distinct" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L").save(
            path, quality=95
        )
        distinct.append(path)
    rows = []
    for i in range(images):
        target = root / "train" / f"patient{70000 + i:05d}" / "study1" / "view1_frontal.jpg"
        target.parent.mkdir(parents=True)
        shutil.copyfile(distinct[i % len(distinct)], target)
        rows.append(template.copy())
        rows[-1]["Path"] = f"CheXpert-v1.0-small/{target.relative_to(root)}"
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    (root / "valid.csv").write_text((root / "valid.csv").read_text().splitlines()[0] + "\n")
    return root


# --- the methods --------------------------------------------------------------------------


class OriginalLayout(Dataset):
    """(c) The original approach: ``index.json`` of paths, PIL open, RGB, to a float tensor."""

    def __init__(self, folder: Path) -> None:
        index = json.loads((folder / "index.json").read_text())
        self.paths = [index[k]["path"] for k in sorted(index)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        with Image.open(self.paths[index]) as image:
            pixels = np.array(image.convert("RGB"))  # a copy, as ToTensor makes
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
        return {"image": tensor, "index": index}


class DecodeFloor(Dataset):
    """(d) The same member bytes in one shared in-memory buffer, PIL decode to float."""

    def __init__(self, dataset: MaCheX) -> None:
        chunks = [dataset.read_bytes(i) for i in range(len(dataset))]
        self.sizes = np.array([len(c) for c in chunks], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.buffer = np.frombuffer(b"".join(chunks), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        start = int(self.offsets[index])
        data = self.buffer[start : start + int(self.sizes[index])]
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image)
        return {"image": torch.from_numpy(pixels).float().div(255)[None], "index": index}


def stream_dataset(root: Path) -> Any | None:
    """``MaCheX.stream`` over every split, or None where it does not exist (yet)."""
    if not hasattr(MaCheX, "stream"):
        return None
    for kwargs in (
        {"splits": None, "shuffle": True, "batch_size": BATCH_SIZE},
        {"splits": None, "shuffle": True},
        {"splits": None},
    ):
        try:
            return MaCheX.stream(root, **kwargs)
        except TypeError:
            continue
    return MaCheX.stream(root)


# --- measuring ----------------------------------------------------------------------------


def _children(parent: int) -> list[int]:
    """Live processes whose parent is ``parent`` (the DataLoader's workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(pids)


def _memory_mb(pid: int, field: str) -> float | None:
    """``field`` (``VmRSS``, ``VmHWM``) of a process in MB (10**6 bytes); None once gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = next((int(s.split()[1]) for s in status.splitlines() if s.startswith(field)), None)
    return None if kib is None else round(kib * 1024 / 1e6, 1)


def _rss_of(pids: list[int]) -> dict[int, tuple[float | None, float | None]]:
    return {pid: (_memory_mb(pid, "VmRSS:"), _memory_mb(pid, "VmHWM:")) for pid in pids}


def time_epoch(dataset: Any, workers: int, shuffle: bool, expected: int) -> dict[str, Any]:
    """images/s over one epoch after a warm-up, and RSS at 10% and 100% of the epoch."""
    loader = DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=False,
    )
    main = os.getpid()
    warmup = 2 * max(1, workers)
    others = set(_children(main))  # e.g. the build's idle loky workers: not the loader's
    batches = iter(loader)
    pids = [main] if workers == 0 else []
    seen = timed = 0
    start = 0.0
    rss_10: dict[int, tuple[float | None, float | None]] = {}
    rss_100: dict[int, tuple[float | None, float | None]] = {}
    for number, batch in enumerate(batches):
        count = len(batch["image"])
        seen += count
        if number < warmup:
            if number == warmup - 1:
                start = time.perf_counter()
                if workers:
                    pids = [p for p in _children(main) if p not in others]
            continue
        timed += count
        if not rss_10 and seen >= 0.1 * expected:
            rss_10 = _rss_of(pids)
        if seen >= expected:
            rss_100 = _rss_of(pids)  # the workers are still alive at the last batch
    seconds = time.perf_counter() - start
    del batches
    both = [p for p in pids if None not in (*rss_10.get(p, (None,)), *rss_100.get(p, (None,)))]
    growth = [round(rss_100[p][0] - rss_10[p][0], 1) for p in both]  # type: ignore[operator]
    peak_growth = [round(rss_100[p][1] - rss_10[p][1], 1) for p in both]  # type: ignore[operator]
    return {
        "workers": workers,
        "images": seen,
        "timed_images": timed,
        "seconds": round(seconds, 2),
        "images_per_second": round(timed / seconds, 1) if seconds > 0 else None,
        "rss_pids": "main" if workers == 0 else "workers",
        "rss_10pct_mb": [rss_10.get(p, (None,))[0] for p in pids],
        "rss_100pct_mb": [rss_100.get(p, (None,))[0] for p in pids],
        "rss_growth_mb": growth,
        "peak_10pct_mb": [rss_10.get(p, (None, None))[1] for p in pids],
        "peak_100pct_mb": [rss_100.get(p, (None, None))[1] for p in pids],
        "peak_growth_mb": peak_growth,
    }


# --- targets ------------------------------------------------------------------------------


NAMES = {
    "random": "(a) MaCheX random access",
    "stream": "(b) MaCheX.stream",
    "original": "(c) original layout",
    "floor": "(d) decode floor",
}


def targets(results: dict[str, dict[int, dict]]) -> list[Target]:
    checks = []
    for method in ("random", "stream"):
        if method not in results:
            continue
        for workers, r in results[method].items():
            rate = r["images_per_second"]
            checks.append(
                Target(
                    f"{NAMES[method]}, num_workers={workers}: images/s / (d)",
                    rate / results["floor"][workers]["images_per_second"],
                    0.8,
                    True,
                )
            )
            checks.append(
                Target(
                    f"{NAMES[method]}, num_workers={workers}: images/s / (c)",
                    rate / results["original"][workers]["images_per_second"],
                    1.0,
                    True,
                )
            )
            if r["rss_growth_mb"]:
                checks.append(
                    Target(
                        f"{NAMES[method]}, num_workers={workers}: RSS growth 10%->100%, "
                        f"MB ({r['rss_pids']}, largest)",
                        max(r["rss_growth_mb"]),
                        MEMORY_GROWTH_MB,
                        False,
                    )
                )
    return checks


# --- report -------------------------------------------------------------------------------


def machine() -> dict[str, object]:

    model = cpu_model()

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", *sys.argv]),
        "platform": platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "start_method": torch.multiprocessing.get_start_method(),
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "code": code_version(),
    }


def print_table(results: dict[str, dict[int, dict]]) -> None:
    header = (
        f"{'method':<28} {'workers':>7} {'images/s':>9} {'/ (d)':>6} {'/ (c)':>6} | "
        f"{'RSS 10% MB':>13} {'RSS 100% MB':>13} {'growth':>12} {'HWM growth':>12}"
    )
    print(header)
    print("-" * len(header))
    for method, rows in results.items():
        for workers, r in rows.items():
            rate = r["images_per_second"]
            floor = results["floor"][workers]["images_per_second"]
            original = results["original"][workers]["images_per_second"]
            print(
                f"{NAMES[method]:<28} {workers:>7} {rate:9.1f} {rate / floor:6.2f} "
                f"{rate / original:6.2f} | {_join(r['rss_10pct_mb']):>13} "
                f"{_join(r['rss_100pct_mb']):>13} {_join(r['rss_growth_mb']):>12} "
                f"{_join(r['peak_growth_mb']):>12}"
            )


def _join(values: Iterable[object]) -> str:
    return ", ".join(str(v) for v in values)


def measure(
    methods: dict[str, tuple[Callable[[], Any], bool]], expected: int
) -> dict[str, dict[int, dict]]:
    """Each method at each ``num_workers``; within a ``num_workers`` the methods run back to
    back, so their ratios compare them under the same load from the machine's other tenants."""
    results: dict[str, dict[int, dict]] = {name: {} for name in methods}
    for workers in WORKERS:
        for name, (make, shuffle) in methods.items():
            results[name][workers] = time_epoch(make(), workers, shuffle, expected)
            r = results[name][workers]
            print(
                f"measured {name} num_workers={workers}: {r['images_per_second']} images/s",
                file=sys.stderr,
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images",
        type=int,
        default=2000,
        help="images in the collection (default 2000: an epoch of 5000 at every setting "
        "takes ~20 min on a 2-vCPU VM)",
    )
    parser.add_argument("--quick", action="store_true", help="a 640-image collection")
    parser.add_argument("--json-out", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args()
    images = 640 if args.quick else args.images

    info = machine()
    report: dict[str, object] = {"machine": info, "batch_size": BATCH_SIZE}
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="machex-bench-loader-") as scratch_name:
        scratch = Path(scratch_name)
        start = time.perf_counter()
        source_root = chexpert_1024(scratch, images, rng)
        out = scratch / "out"
        built = build_source("chexpert", source_root, out, BuildOptions(workers=2))
        export_index(out, scratch / "original")
        random = MaCheX(out, splits=None)
        member_kib = random.manifest["size"].to_numpy() / 1024
        report["collection"] = {
            "images": len(random),
            "built": built.built,
            "distinct_images": min(DISTINCT, images),
            "member_kib_mean": round(float(member_kib.mean()), 1),
            "original_jpeg_kib_mean": round(
                float(
                    np.mean([p.stat().st_size for p in (scratch / "original").rglob("*.jpg")])
                    / 1024
                ),
                1,
            ),
            "prepare_seconds": round(time.perf_counter() - start, 1),
        }
        print(f"collection: {report['collection']}", file=sys.stderr, flush=True)
        floor = DecodeFloor(random)
        methods: dict[str, tuple[Callable[[], Any], bool]] = {
            "random": (lambda: random, True),
        }
        if stream_dataset(out) is not None:
            methods["stream"] = (lambda: stream_dataset(out), False)
        methods["original"] = (lambda: OriginalLayout(scratch / "original" / "chexpert"), True)
        methods["floor"] = (lambda: floor, True)
        results = measure(methods, len(random))
        report["results"] = {m: {str(w): r for w, r in rows.items()} for m, rows in results.items()}
        print_table(results)
        if "stream" not in results:
            print("(b) MaCheX.stream: not available in this checkout (skipped)")
        checks = targets(results)
        report["targets"] = [asdict(t) | {"passed": t.passed} for t in checks]
        print()
        for check in checks:
            print(check.line())
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"\nload average: start {info['load_average_start']}, end {info['load_average_end']}")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
