"""What ``keep_freed_memory`` buys a build worker: per-image time and page faults.

    python benchmarks/bench_worker_memory.py [--images 20] [--only KEY,...]
        [--png-decoder pillow|imagecodecs|auto] [--json-out FILE]

A build worker processes one image after another in one process. For the large inputs of
``bench_build.py`` (16-bit PNG, uncompressed and JPEG 2000 DICOM, large JPEG), this runs
``process_image`` on the same file ``--images`` times in a fresh interpreter pinned to one
core, once as the build workers do (``build_in_worker``: glibc keeps freed buffers) and once
with the allocator as it comes, and reports the median time per image, the minor page
faults per image after a warm-up of two images, and the process's peak resident memory.
PNGs are decoded by Pillow unless ``--png-decoder`` says otherwise (``machex.imaging.png``).
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

#: Runs in the child: argv = path, "tuned"|"untuned", images, PNG decoder.
CHILD = """
import json, os, resource, statistics, sys, time
from pathlib import Path
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from machex.imaging import PixelOptions, PngDecoder, process_image
from machex.imaging.memory import keep_freed_memory
path, mode, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
options = PixelOptions(png_decoder=PngDecoder(sys.argv[4]))
tuned = keep_freed_memory() if mode == "tuned" else False
for _ in range(2):
    process_image(path, options)
times, faults = [], []
for _ in range(count):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    process_image(path, options)
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# VmHWM, not ru_maxrss: a child started by subprocess (vfork + exec) inherits the parent's.
status = Path("/proc/self/status").read_text()
peak = int(status.split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"tuned": tuned, "ms_per_image": round(statistics.median(times) * 1e3, 2),
                  "faults_per_image": statistics.median(faults), "peak_rss_mib": round(peak, 1)}))
"""

MEASURED = ("png16", "dicom_native", "dicom_j2k", "large_jpeg")


def measure(path: Path, mode: str, images: int, png_decoder: str) -> dict[str, object]:
    environment = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), mode, str(images), png_decoder],
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
    parser.add_argument(
        "--only", help=f"comma-separated inputs to measure (default: {','.join(MEASURED)})"
    )
    parser.add_argument(
        "--png-decoder",
        choices=("pillow", "imagecodecs", "auto"),
        default="pillow",
        help="who decodes the PNG input (default pillow, as in the figures of docs/)",
    )
    parser.add_argument("--json-out", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args()
    measured = tuple(args.only.split(",")) if args.only else MEASURED
    unknown = set(measured) - set(MEASURED)
    if unknown:
        parser.error(f"unknown input(s) {sorted(unknown)}; choose from {MEASURED}")
    report: dict[str, object] = {
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "code": code_version()},
        "command": " ".join(["python", *sys.argv]),
        "png_decoder": args.png_decoder,
        "images": args.images,
        "results": {},
    }
    with tempfile.TemporaryDirectory(prefix="machex-bench-") as scratch:
        paths = write_inputs(Path(scratch), np.random.default_rng(0))
        labels = {spec.key: spec.label for spec in INPUTS}
        print(f"{'input':40} {'as it comes':>33} {'build worker':>33}")
        for key in measured:
            images = max(2, args.images // 10) if key == "dicom_j2k" else args.images
            row = {
                mode: measure(paths[key][0], mode, images, args.png_decoder)
                for mode in ("untuned", "tuned")
            }
            report["results"][key] = row
            cells = [
                f"{row[m]['ms_per_image']:8.1f} ms {row[m]['faults_per_image']:6.0f} flt "
                f"{row[m]['peak_rss_mib']:6.1f} MiB"
                for m in ("untuned", "tuned")
            ]
            print(f"{labels[key]:40} {cells[0]:>33} {cells[1]:>33}", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
