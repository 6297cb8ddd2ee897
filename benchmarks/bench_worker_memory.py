"""What ``keep_freed_memory`` buys a build worker: per-image time and page faults.

    python benchmarks/bench_worker_memory.py [--images 20] [--json-out FILE]

A build worker processes one image after another in one process. For the large inputs of
``bench_build.py`` (16-bit PNG, uncompressed and JPEG 2000 DICOM, large JPEG), this runs
``process_image`` on the same file ``--images`` times in a fresh interpreter pinned to one
core, once as the build workers do (``build_in_worker``: glibc keeps freed buffers) and once
with the allocator as it comes, and reports the median time per image and the minor page
faults per image after a warm-up of two images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_build import INPUTS, write_inputs
from bench_common import code_version, cpu_model

#: Runs in the child: argv = path, "tuned"|"untuned", images.
CHILD = """
import json, os, resource, statistics, sys, time
from pathlib import Path
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from machex.imaging import PixelOptions, process_image
from machex.imaging.memory import keep_freed_memory
path, mode, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
tuned = keep_freed_memory() if mode == "tuned" else False
for _ in range(2):
    process_image(path, PixelOptions())
times, faults = [], []
for _ in range(count):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    process_image(path, PixelOptions())
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "ms_per_image": round(statistics.median(times) * 1e3, 2),
                  "faults_per_image": statistics.median(faults)}))
"""

MEASURED = ("png16", "dicom_native", "dicom_j2k", "large_jpeg")


def measure(path: Path, mode: str, images: int) -> dict[str, object]:
    environment = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mode, str(images)],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20, help="timed images per run")
    parser.add_argument("--json-out", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args()
    report: dict[str, object] = {
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "code": code_version()},
        "images": args.images,
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="machex-bench-") as scratch:
        paths = write_inputs(Path(scratch), np.random.default_rng(0))
        labels = {spec.key: spec.label for spec in INPUTS}
        print(f"{'input':40} {'as it comes':>22} {'build worker':>22}")
        for key in MEASURED:
            images = max(2, args.images // 10) if key == "dicom_j2k" else args.images
            row = {mode: measure(paths[key][0], mode, images) for mode in ("untuned", "tuned")}
            report["results"][key] = row
            cells = [
                f"{row[m]['ms_per_image']:8.1f} ms {row[m]['faults_per_image']:6.0f} flt"
                for m in ("untuned", "tuned")
            ]
            print(f"{labels[key]:40} {cells[0]:>22} {cells[1]:>22}", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
