"""Time the two things a user waits for in the foundation: a dry run over the complete real
metadata (ChestX-ray14, CheXpert) and a build's images/s at 1 and 2 workers.

    python benchmarks/bench_plan_and_build.py [--shared ../shared] [--images 64]

Prints one JSON document; paste the figures into docs/benchmarks.md with machine and date.
The build part uses the CheXpert sample re-encoded at full-release size (2000x2400 JPEG),
so it needs no dataset.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

from machex.build import BuildOptions, build_source, plan_source
from machex.sample import make_sample


def time_plan(source: str, root: Path, repeats: int = 3) -> dict[str, float | int]:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        plan = plan_source(source, root)
        best = min(best, time.perf_counter() - start)
    return {"seconds_best_of_3": round(best, 2), "rows_planned": plan.planned}


def real_roots(shared: Path, scratch: Path) -> dict[str, Path]:
    metadata = shared / "real" / "metadata"
    chexpert = scratch / "CheXpert-v1.0-small"
    chexpert.mkdir(parents=True)
    shutil.copy(metadata / "chexpert_train.csv.gz", chexpert / "train.csv.gz")
    nih = scratch / "ChestX-ray14"
    nih.mkdir()
    shutil.copy(metadata / "Data_Entry_2017_v2020.csv.gz", nih / "Data_Entry_2017_v2020.csv.gz")
    shutil.copy(metadata / "BBox_List_2017.csv.gz", nih / "BBox_List_2017.csv.gz")
    with gzip.open(metadata / "Data_Entry_2017_v2020.csv.gz", "rt") as handle:
        names = pd.read_csv(handle, usecols=["Image Index"])["Image Index"]
    # The official lists are not in ../shared; every image goes to the train list here.
    (nih / "train_val_list.txt").write_text("\n".join(names) + "\n")
    (nih / "test_list.txt").write_text("")
    return {"chexpert": chexpert, "chestxray14": nih}


def full_size_chexpert(scratch: Path, images: int) -> Path:
    root = make_sample(scratch / "sample", ["chexpert"])["chexpert"]
    frontal = sorted(root.glob("*/*/*/*frontal.jpg"))
    train = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    rows = []
    template = train[train["Frontal/Lateral"] == "Frontal"].iloc[0]
    for i in range(images):  # replicate frontal images as new patients, 2000x2400 like v1.0
        source = frontal[i % len(frontal)]
        target = root / "train" / f"patient{70000 + i:05d}" / "study1" / "view1_frontal.jpg"
        target.parent.mkdir(parents=True)
        with Image.open(source) as image:
            image.convert("L").resize((2000, 2400), Image.Resampling.BICUBIC).save(
                target, quality=90
            )
        rows.append(template.copy())
        rows[-1]["Path"] = f"CheXpert-v1.0-small/{target.relative_to(root)}"
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    (root / "valid.csv").write_text((root / "valid.csv").read_text().splitlines()[0] + "\n")
    return root


def time_build(root: Path, out: Path, workers: int) -> dict[str, float | int]:
    start = time.perf_counter()
    result = build_source("chexpert", root, out, BuildOptions(workers=workers), overwrite=True)
    seconds = time.perf_counter() - start
    return {
        "workers": workers,
        "images": result.built,
        "seconds": round(seconds, 2),
        "images_per_second": round(result.built / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path(__file__).parents[2] / "shared")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    report: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        if (args.shared / "real" / "metadata").is_dir():
            roots = real_roots(args.shared, scratch / "real")
            report["dry_run"] = {s: time_plan(s, r) for s, r in roots.items()}
        root = full_size_chexpert(scratch, args.images)
        report["build"] = [time_build(root, scratch / f"out{w}", w) for w in (1, 2)]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
