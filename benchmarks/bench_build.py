"""Per-image speed and fidelity of the image pipeline, against the original MaCheX code.

    python benchmarks/bench_build.py [--repeats 7] [--quick] [--json-out FILE]

For six realistic inputs (large 8-bit JPEG as in MIMIC-CXR-JPG, 16-bit PNG with 12-bit
values as in PadChest, 8-bit PNG already 1024x1024 as in ChestX-ray14, small JPEG as in
CheXpert-small, and a 16-bit DICOM with 12-bit values, uncompressed and JPEG 2000 lossless)
it times, on one pinned core with library threads off:

- (a) our pipeline, ``process_image(path, PixelOptions(png_decoder=pillow))``: Pillow alone;
- (a+) for PNGs, where imagecodecs is installed (``machex-cheff[fast]``), the same pipeline
  with imagecodecs decoding the PNG, and (c+) imagecodecs' decode alone;
- (b) the original MaCheX pipeline, ``machex_v1`` (``benchmarks/machex_v1_baseline.py``);
- (c) the decode-only floor (for DICOMs ``pydicom.dcmread(path).pixel_array``), and for
  large JPEGs also the floor at reduced DCT scale;
- (d) for the input already 1024x1024, its decode plus the JPEG q95 encode and nothing
  else, the least a pipeline writing MaCheX JPEGs can cost;

and scores (a) and (b) with SSIM/PSNR against a float64 Lanczos reference
(``benchmarks/fidelity.py``). Then, unless ``--quick``, whole builds of a CheXpert sample
at full-release size with 1 and 2 workers, with peak memory per worker. Prints a table and
the issue's targets as PASS/FAIL; ``--json-out`` keeps every figure.
"""

from __future__ import annotations

import os

# One core means one thread too: set before numpy/torch load their thread pools.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import PIL.features  # noqa: E402
from bench_common import Target, code_version, cpu_model  # noqa: E402
from machex_v1_baseline import machex_v1  # noqa: E402
from PIL import Image  # noqa: E402

from machex.imaging import OUTPUT_SIZE, PixelOptions, PngDecoder, process_image  # noqa: E402
from machex.imaging.memory import keep_freed_memory  # noqa: E402
from machex.imaging.png import imagecodecs_available  # noqa: E402
from machex.sample import synthetic_radiograph  # noqa: E402

REAL_IMAGES = Path(__file__).parents[2] / "shared" / "real" / "images"
#: Film-grain noise, in 8-bit grey levels; without it upscaled images compress unrealistically.
GRAIN_SIGMA = 2.0


@dataclass(frozen=True)
class InputSpec:
    """One benchmark input: what it stands for and how to make it."""

    key: str
    label: str
    real_source: str  # file in ../shared/real/images to start from
    width: int
    height: int
    bits: int  # value range; > 8 is stored as a 16-bit PNG or DICOM
    suffix: str
    #: DICOMs (``.dcm``) only: the ``pydicom.uid`` name of the compressed transfer syntax,
    #: or None for uncompressed (explicit VR little endian). pydicom is imported only where
    #: used, so the whole-build children (which import this module) do not carry it.
    compression: str | None = None

    @property
    def is_dicom(self) -> bool:
        return self.suffix == ".dcm"


INPUTS = (
    InputSpec(
        "large_jpeg", "8-bit JPEG q95 (MIMIC-CXR-JPG)", "16747_3_1.jpg", 2544, 3056, 8, ".jpg"
    ),
    InputSpec(
        "png16", "16-bit PNG, 12-bit values (PadChest)", "00000001_000.png", 2800, 2800, 12, ".png"
    ),
    InputSpec(
        "png8_1024", "8-bit PNG 1024x1024 (ChestX-ray14)", "00000001_000.png", 1024, 1024, 8, ".png"
    ),
    InputSpec(
        "small_jpeg", "small JPEG q95 (CheXpert-small)", "16747_3_1.jpg", 320, 390, 8, ".jpg"
    ),
    # The two DICOMs hold the same pixels (``write_inputs``); appended last so that the
    # inputs above draw the same grain as before they were added.
    InputSpec(
        "dicom_native",
        "16-bit DICOM, 12-bit, uncompressed",
        "16747_3_1.jpg",
        2400,
        3000,
        12,
        ".dcm",
    ),
    InputSpec(
        "dicom_j2k",
        "16-bit DICOM, 12-bit, J2K lossless",
        "16747_3_1.jpg",
        2400,
        3000,
        12,
        ".dcm",
        "JPEG2000Lossless",
    ),
)


# --- inputs -------------------------------------------------------------------------------


def base_image(spec: InputSpec, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """float32 pixels in ``[0, 2**bits - 1]`` at the spec's size, and where they came from.

    A real radiograph is centre-cropped to the target aspect and resized with bicubic in
    float; without ``../shared`` a synthetic radiograph stands in.
    """
    top = 2**spec.bits - 1
    real = REAL_IMAGES / spec.real_source
    if not real.is_file():
        pixels = synthetic_radiograph(rng, spec.width, spec.height, bits=spec.bits)
        return pixels.astype(np.float32), "machex.sample.synthetic_radiograph"
    with Image.open(real) as image:
        gray = np.asarray(image.convert("L"), dtype=np.float32)
    h, w = gray.shape
    aspect = spec.width / spec.height
    crop_w, crop_h = (round(h * aspect), h) if w / h > aspect else (w, round(w / aspect))
    left, upper = (w - crop_w) // 2, (h - crop_h) // 2
    resized = Image.fromarray(gray).resize(
        (spec.width, spec.height),
        Image.Resampling.BICUBIC,
        box=(left, upper, left + crop_w, upper + crop_h),
    )
    return np.asarray(resized) * np.float32(top / 255), f"{spec.real_source}, bicubic"


def grainy_pixels(spec: InputSpec, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """The spec's base image plus Gaussian grain, rounded and clipped (float32)."""
    top = 2**spec.bits - 1
    pixels, origin = base_image(spec, rng)
    grain = np.float32(GRAIN_SIGMA * top / 255)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * grain
    return np.clip(np.rint(pixels + noise), 0, top), origin


def write_inputs(folder: Path, rng: np.random.Generator) -> dict[str, tuple[Path, str]]:
    """Write every input file; inputs of the same source, size and depth (the two DICOMs)
    share one set of pixels. Returns ``key -> (path, origin)``."""
    made: dict[tuple[str, int, int, int], tuple[np.ndarray, str]] = {}
    paths = {}
    for spec in INPUTS:
        content = (spec.real_source, spec.width, spec.height, spec.bits)
        if content not in made:
            made[content] = grainy_pixels(spec, rng)
        values, origin = made[content]
        paths[spec.key] = write_input(spec, values, folder), origin
    return paths


def write_input(spec: InputSpec, values: np.ndarray, folder: Path) -> Path:
    """Write ``values`` (whole numbers in ``[0, 2**bits - 1]``) as the spec's file."""
    path = folder / f"{spec.key}{spec.suffix}"
    size = (spec.width, spec.height)
    if spec.is_dicom:
        write_dicom(spec, values.astype(np.uint16), path)
    elif spec.bits > 8:  # explicit little-endian 16-bit: fromarray's mode names vary by version
        Image.frombytes("I;16", size, values.astype("<u2").tobytes()).save(path)
    elif spec.suffix == ".jpg":
        Image.fromarray(values.astype(np.uint8)).save(path, quality=95)
    else:
        Image.fromarray(values.astype(np.uint8)).save(path)
    return path


def write_dicom(spec: InputSpec, pixels: np.ndarray, path: Path) -> None:
    """A minimal single-frame MONOCHROME2 DICOM (16 bits allocated, ``spec.bits`` stored,
    no rescale, no window), compressed as ``spec.compression`` says, with UIDs derived from
    the key (the same every run)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset

    def uid(kind: str) -> str:
        return pydicom.uid.generate_uid(entropy_srcs=["machex-bench", spec.key, kind])

    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    dataset.file_meta.MediaStorageSOPInstanceUID = uid("sop")
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = uid("study")
    dataset.SeriesInstanceUID = uid("series")
    dataset.Modality = "DX"
    dataset.ViewPosition = "PA"
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = spec.bits
    dataset.HighBit = spec.bits - 1
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.astype("<u2").tobytes()
    if spec.compression is not None:
        dataset.compress(getattr(pydicom.uid, spec.compression), pixels)
    dataset.save_as(path, enforce_file_format=True)


# --- what is timed ------------------------------------------------------------------------


def ours(path: Path) -> bytes:
    """(a) our pipeline with default options (grayscale JPEG q95, raw intensity), Pillow
    decoding everything."""
    return process_image(path, PixelOptions(png_decoder=PngDecoder.pillow)).data


def ours_fast(path: Path) -> bytes:
    """(a+) the same with the optional imagecodecs PNG decoder (``machex-cheff[fast]``)."""
    return process_image(path, PixelOptions(png_decoder=PngDecoder.imagecodecs)).data


def fast_decode_floor(path: Path) -> None:
    """(c+) imagecodecs' PNG decode alone, from the file's bytes."""
    import imagecodecs

    imagecodecs.png_decode(path.read_bytes())


def decode_floor(path: Path) -> None:
    """(c) decode only, at full scale, in the file's own mode (a DICOM's ``pixel_array``)."""
    if path.suffix == ".dcm":
        import pydicom

        pydicom.dcmread(path).pixel_array  # noqa: B018 - the decode is the point
        return
    with Image.open(path) as image:
        image.load()


def decode_and_encode(path: Path) -> bytes:
    """(d) for an input already at the output size: its decode plus the JPEG q95 encode the
    output needs, nothing else: the least any pipeline writing MaCheX JPEGs can cost."""
    with Image.open(path) as image:
        image.load()
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()


def reduced_decode_floor(path: Path) -> None:
    """(c) decode only, at the smallest DCT scale that keeps the short edge >= 1024."""
    with Image.open(path) as image:
        w, h = image.size
        short = min(w, h)
        image.draft("L", (math.ceil(w * OUTPUT_SIZE / short), math.ceil(h * OUTPUT_SIZE / short)))
        image.load()


def images_per_second(
    methods: dict[str, Callable[[], object]], repeats: int, loop_seconds: float
) -> dict[str, list[float]]:
    """images/s of each method in each of ``repeats`` rounds of timed loops.

    One warm-up call each (also sizing the loop to about ``loop_seconds``); within a round
    the methods' loops run back to back, so a ratio taken within a round compares them
    under the same load from the machine's other tenants.
    """
    counts = {}
    for name, method in methods.items():
        start = time.perf_counter()
        method()
        counts[name] = max(1, round(loop_seconds / (time.perf_counter() - start)))
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            for _ in range(counts[name]):
                method()
            rates[name].append(counts[name] / (time.perf_counter() - start))
    return rates


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of the within-round ratio (robust to load changing between rounds)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def measure_input(spec: InputSpec, path: Path, repeats: int, loop_seconds: float) -> dict:
    """Speed of (a), (b), (c) and fidelity of (a), (b) for one input file."""
    from fidelity import decode_gray, psnr, reference_image, ssim  # torch: not in build children

    methods: dict[str, Callable[[], object]] = {
        "ours": lambda: ours(path),
        "v1": lambda: machex_v1(path),
        "decode": lambda: decode_floor(path),
    }
    if spec.suffix == ".jpg" and min(spec.width, spec.height) >= 2 * OUTPUT_SIZE:
        methods["decode_reduced"] = lambda: reduced_decode_floor(path)
    if (spec.width, spec.height) == (OUTPUT_SIZE, OUTPUT_SIZE) and spec.bits == 8:
        methods["decode_encode"] = lambda: decode_and_encode(path)
    fast = spec.suffix == ".png" and imagecodecs_available()
    if fast:
        methods["ours_fast"] = lambda: ours_fast(path)
        methods["decode_fast"] = lambda: fast_decode_floor(path)
    rounds = images_per_second(methods, repeats, loop_seconds)
    floor = "decode_reduced" if "decode_reduced" in rounds else "decode"
    reference = reference_image(path)
    result: dict = {
        "input": spec.key,
        "label": spec.label,
        "size": f"{spec.width}x{spec.height}",
        "file_kib": round(path.stat().st_size / 1024, 1),
        "images_per_second": {k: round(statistics.median(v), 2) for k, v in rounds.items()},
        "images_per_second_rounds": {k: [round(x, 2) for x in v] for k, v in rounds.items()},
        "speedup_vs_v1": round(median_ratio(rounds["ours"], rounds["v1"]), 3),
        # (a)'s time / the floor's time
        "cost_vs_floor": round(median_ratio(rounds[floor], rounds["ours"]), 3),
        "floor": floor,
    }
    if "decode_encode" in rounds:  # (d)'s time / the floor's time
        result["decode_encode_vs_floor"] = round(
            median_ratio(rounds["decode"], rounds["decode_encode"]), 3
        )
    if fast:  # (a+)'s time over the Pillow floor, and over imagecodecs' own decode
        result["fast_cost_vs_floor"] = round(median_ratio(rounds["decode"], rounds["ours_fast"]), 3)
        result["fast_cost_vs_fast_floor"] = round(
            median_ratio(rounds["decode_fast"], rounds["ours_fast"]), 3
        )
        result["fast_same_bytes"] = ours_fast(path) == ours(path)
    for name, output in (("ours", ours(path)), ("v1", machex_v1(path))):
        pixels = decode_gray(output)
        result[f"ssim_{name}"] = round(ssim(pixels, reference), 5)
        result[f"psnr_{name}"] = round(psnr(pixels, reference), 2)
        result[f"output_kib_{name}"] = round(len(output) / 1024, 1)
    return result


# --- targets ------------------------------------------------------------------------------


def targets(results: dict[str, dict]) -> list[Target]:
    """The issue's targets, each read off the measured results."""
    jpeg, png16, png8, small = (
        results[k] for k in ("large_jpeg", "png16", "png8_1024", "small_jpeg")
    )
    native, j2k = results["dicom_native"], results["dicom_j2k"]
    return [
        Target("large JPEG: (a) / (b) images/s", jpeg["speedup_vs_v1"], 2.5, True),
        Target("large JPEG: (a) / (b) images/s, stretch", jpeg["speedup_vs_v1"], 3.0, True),
        Target(
            "large JPEG: (a) time / reduced-scale decode time", jpeg["cost_vs_floor"], 1.8, False
        ),
        Target("large JPEG: SSIM (a) vs reference", jpeg["ssim_ours"], 0.985, True),
        Target("large JPEG: PSNR (a) vs reference, dB", jpeg["psnr_ours"], 47.0, True),
        Target("16-bit PNG: (a) time / decode time", png16["cost_vs_floor"], 1.25, False),
        Target("16-bit PNG: SSIM (a) vs reference", png16["ssim_ours"], 0.99, True),
        Target("8-bit PNG 1024: (a) time / decode time", png8["cost_vs_floor"], 1.35, False),
        *(
            Target(
                f"{name}: (a+) imagecodecs time / decode time", r["fast_cost_vs_floor"], top, False
            )
            for name, r, top in (("16-bit PNG", png16, 1.25), ("8-bit PNG 1024", png8, 1.35))
            if "fast_cost_vs_floor" in r
        ),
        Target("small JPEG: (a) / (b) images/s", small["speedup_vs_v1"], 1.25, True),
        Target("DICOM uncompressed: (a) time / decode time", native["cost_vs_floor"], 1.25, False),
        Target("DICOM uncompressed: SSIM (a) vs reference", native["ssim_ours"], 0.99, True),
        Target("DICOM J2K lossless: (a) time / decode time", j2k["cost_vs_floor"], 1.25, False),
        Target("DICOM J2K lossless: SSIM (a) vs reference", j2k["ssim_ours"], 0.99, True),
    ]


# --- whole builds -------------------------------------------------------------------------


def _peak_rss_mib(pid: int | str = "self") -> float | None:
    """``VmHWM`` (peak resident memory) of a process, in MiB; ``None`` once it is gone.

    Read from /proc rather than ``ru_maxrss``: a process started by ``subprocess`` (vfork +
    exec) inherits its parent's ``ru_maxrss``, so a child of this torch-laden script would
    report at least the script's own size.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None
    )
    return None if kib is None else round(kib / 1024, 1)


def _loky_workers(parent: int) -> list[int]:
    """Live joblib/loky worker processes whose parent is ``parent``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                not entry.name.isdigit()
                or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent
            ):
                continue
            if b"popen_loky" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def build_child(root: str, out: str, workers: str, cpus: str) -> None:
    """Entry point of the fresh interpreter that runs one timed build; prints one JSON line.

    It imports the build but not torch, so its peak memory is a build's. A thread polls the
    loky workers' high-water marks while they live (the build shuts its pool down at the end).
    """
    from bench_plan_and_build import time_build

    os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    worker_peaks: dict[int, float] = {}
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.2):
            for pid in _loky_workers(os.getpid()):
                peak = _peak_rss_mib(pid)
                if peak is not None:
                    worker_peaks[pid] = max(peak, worker_peaks.get(pid, 0.0))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    figures: dict[str, object] = dict(time_build(Path(root), Path(out), int(workers)))
    finished.set()
    watcher.join()
    figures["main_process_peak_rss_mib"] = _peak_rss_mib()
    figures["worker_peak_rss_mib"] = sorted(worker_peaks.values())
    print(json.dumps(figures))


def whole_builds(scratch: Path, images: int, cpus: set[int]) -> list[dict[str, object]]:
    """images/s and peak memory of whole builds with 1 and 2 workers, each in a fresh
    interpreter on all of ``cpus``.

    With 1 worker joblib runs in-process, so the process's peak *is* one worker's peak;
    with 2 workers the main process's peak and each loky worker's peak are reported.
    """
    from bench_plan_and_build import full_size_chexpert

    root = full_size_chexpert(scratch, images)
    here = str(Path(__file__).resolve().parent)
    environment = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    }
    entry = "import sys, bench_build; bench_build.build_child(*sys.argv[1:])"
    figures = []
    for workers in (1, 2):
        command = [
            sys.executable,
            "-c",
            entry,
            str(root),
            str(scratch / f"out{workers}"),
            str(workers),
            ",".join(map(str, sorted(cpus))),
        ]
        done = subprocess.run(command, env=environment, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"build with {workers} worker(s) failed:\n{done.stderr}")
        figures.append(json.loads(done.stdout.splitlines()[-1]))
    return figures


# --- report -------------------------------------------------------------------------------


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, object]:
    import pydicom
    import torch

    model = cpu_model()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python", *sys.argv]),
        "platform": platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "pydicom": pydicom.__version__,
        "imagecodecs": _version_of("imagecodecs"),
        "zlib_loaded_by_pillow": PIL.features.version("zlib"),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "code": code_version(),
    }


def print_table(results: dict[str, dict]) -> None:
    header = (
        f"{'input':<38} {'size':>9} {'KiB':>6} | {'(a) ours':>8} {'(b) v1':>7} "
        f"{'(c) dec':>7} {'(c) 1/2':>7} | {'a/b':>5} {'a/floor':>7} | "
        f"{'SSIM a':>7} {'PSNR a':>6} {'SSIM b':>7} {'PSNR b':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results.values():
        ips = r["images_per_second"]
        reduced = f"{ips['decode_reduced']:7.1f}" if "decode_reduced" in ips else f"{'-':>7}"
        print(
            f"{r['label']:<38} {r['size']:>9} {r['file_kib']:>6.0f} | {ips['ours']:8.1f} "
            f"{ips['v1']:7.1f} {ips['decode']:7.1f} {reduced} | {r['speedup_vs_v1']:5.2f} "
            f"{r['cost_vs_floor']:7.2f} | {r['ssim_ours']:7.4f} {r['psnr_ours']:6.2f} "
            f"{r['ssim_v1']:7.4f} {r['psnr_v1']:6.2f}"
        )
    print(
        "images/s: median of the rounds, one pinned core. a/b and a/floor ((a)'s time over the\n"
        "floor's, the reduced-scale decode where given): median of within-round ratios.\n"
        "SSIM/PSNR: decoded output against the float64 Lanczos reference."
    )
    for r in results.values():
        if "fast_cost_vs_floor" in r:
            ips = r["images_per_second"]
            print(
                f"{r['label']}: (a+) with imagecodecs {ips['ours_fast']:.1f} images/s, time / "
                f"Pillow decode {r['fast_cost_vs_floor']:.3f}, / imagecodecs decode "
                f"({ips['decode_fast']:.1f} images/s) {r['fast_cost_vs_fast_floor']:.3f}; "
                f"same bytes as (a): {r['fast_same_bytes']}"
            )
        if "decode_encode_vs_floor" in r:
            print(
                f"{r['label']}: (d) decode + JPEG q95 encode alone, time / decode time: "
                f"{r['decode_encode_vs_floor']:.3f} (what the output format costs at least)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per method (median)")
    parser.add_argument(
        "--quick", action="store_true", help="3 short loops per method, no whole builds"
    )
    parser.add_argument(
        "--build-images", type=int, default=120, help="images in each whole build (default 120)"
    )
    parser.add_argument("--json-out", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    loop_seconds = 0.25 if args.quick else 0.6

    info = machine()
    report: dict[str, object] = {
        "machine": info,
        "timing": {"repeats": repeats, "loop_seconds": loop_seconds, "statistic": "median"},
    }
    all_cpus = os.sched_getaffinity(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="machex-bench-") as scratch_name:
        scratch = Path(scratch_name)
        paths = write_inputs(scratch, rng)
        report["inputs"] = {
            spec.key: {"origin": paths[spec.key][1], "grain_sigma_8bit": GRAIN_SIGMA}
            | ({"dicom_compression": spec.compression or "none"} if spec.is_dicom else {})
            for spec in INPUTS
        }
        os.sched_setaffinity(0, {min(all_cpus)})  # one core; children are given all back
        # (a) runs as in a build worker, which keeps freed image buffers for the next image;
        # (b) and (c) are timed in the same process, so they profit alike.
        report["keep_freed_memory"] = keep_freed_memory()
        import torch

        torch.set_num_threads(1)
        results = {}
        for spec in INPUTS:
            results[spec.key] = measure_input(spec, paths[spec.key][0], repeats, loop_seconds)
            print(f"measured {spec.key}", file=sys.stderr, flush=True)
        report["per_image"] = results
        print_table(results)
        checks = targets(results)
        report["targets"] = [asdict(t) | {"passed": t.passed} for t in checks]
        print()
        for check in checks:
            print(check.line())
        if not args.quick:
            builds = whole_builds(scratch, args.build_images, all_cpus)
            report["whole_build"] = builds
            print()
            for build in builds:
                workers = ", ".join(f"{peak} MiB" for peak in build["worker_peak_rss_mib"])
                print(
                    f"whole build, workers={build['workers']}: {build['images']} images, "
                    f"{build['images_per_second']} images/s; peak RSS main process "
                    f"{build['main_process_peak_rss_mib']} MiB"
                    + (f", loky workers {workers}" if workers else "")
                )
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
