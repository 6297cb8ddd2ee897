"""PNG decoders, inflate libraries and JPEG encoders on the benchmark's PNGs, one pinned core.

    python benchmarks/bench_codecs.py [--rounds 15] [--json-out FILE]

Why ``machex.imaging.png`` uses imagecodecs and not another package: for the 8-bit
1024x1024 (ChestX-ray14) and the 16-bit 2800x2800 (PadChest) inputs of
``bench_build.py`` (written the same way, same seed), it times the decode from bytes in
memory by every decoder that is importable (Pillow always; imagecodecs' libpng and libspng,
pyspng, OpenCV where installed), checks each gives Pillow's pixels, and times the inflate
alone of the file's IDAT data by each zlib-compatible library at hand (``zlib``, and
``isal``, ``zlib_ng`` where installed): the inflate is most of a PNG decode, so it says what
a decoder built on a faster inflate could gain. For the 8-bit image, already at the output
size, it also times the grayscale JPEG q95 encode that the output needs by each encoder at
hand (Pillow; simplejpeg and OpenCV where installed). Missing packages are reported, not
installed: ``pip install pyspng opencv-python-headless isal zlib-ng simplejpeg`` adds the
candidates.
Each figure is the median of ``--rounds`` rounds in which every method runs back to back.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import PIL.features  # noqa: E402
from bench_build import INPUTS, grainy_pixels, images_per_second, write_input  # noqa: E402
from bench_common import code_version, cpu_model  # noqa: E402
from PIL import Image  # noqa: E402

from machex.imaging.memory import keep_freed_memory  # noqa: E402

PNG_KEYS = ("png8_1024", "png16")


def optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def at_hand(
    candidates: list[tuple[str, str, Callable[[object], dict[str, Callable]]]],
) -> tuple[dict[str, Callable], list[str]]:
    """From ``(pip package, module, module -> {name: function})`` candidates, the functions
    of the importable ones, and the pip names of the others."""
    found: dict[str, Callable] = {}
    missing = []
    for package, module_name, functions in candidates:
        module = optional(module_name)
        if module is None:
            missing.append(package)
        else:
            found |= functions(module)
    return found, missing


def _cv2_decode(cv2) -> dict[str, Callable]:
    cv2.setNumThreads(1)
    return {
        f"opencv {cv2.__version__}": lambda data: cv2.imdecode(
            np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED
        )
    }


def decoders() -> tuple[dict[str, Callable[[bytes], np.ndarray]], list[str]]:
    """``name -> decode(bytes) -> array`` for every importable decoder; the missing ones."""

    def pillow(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image)

    found, missing = at_hand(
        [
            (
                "imagecodecs",
                "imagecodecs",
                lambda m: {
                    "imagecodecs png (libpng)": m.png_decode,
                    "imagecodecs spng (libspng)": m.spng_decode,
                },
            ),
            ("pyspng", "pyspng", lambda m: {"pyspng (libspng)": m.load}),
            ("opencv-python-headless", "cv2", _cv2_decode),
        ]
    )
    return {"pillow": pillow} | found, missing


def inflaters() -> tuple[dict[str, Callable[[bytes], bytes]], list[str]]:
    found, missing = at_hand(
        [
            ("isal", "isal.isal_zlib", lambda m: {"isal (ISA-L)": m.decompress}),
            ("zlib-ng", "zlib_ng.zlib_ng", lambda m: {"zlib_ng": m.decompress}),
        ]
    )
    return {f"zlib {zlib.ZLIB_RUNTIME_VERSION}": zlib.decompress} | found, missing


def jpeg_encoders(pixels: np.ndarray) -> tuple[dict[str, Callable[[], bytes]], list[str]]:
    """Grayscale JPEG q95 of a 2-D uint8 array by every encoder at hand."""
    image = Image.fromarray(pixels)
    column = np.ascontiguousarray(pixels[:, :, None])

    def pillow() -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    found, missing = at_hand(
        [
            (
                "simplejpeg",
                "simplejpeg",
                lambda m: {
                    "simplejpeg": lambda: m.encode_jpeg(column, 95, colorspace="GRAY"),
                },
            ),
            (
                "opencv-python-headless",
                "cv2",
                lambda m: {
                    f"opencv {m.__version__}": lambda: m.imencode(
                        ".jpg", pixels, [m.IMWRITE_JPEG_QUALITY, 95]
                    )[1].tobytes()
                },
            ),
        ]
    )
    return {"pillow": pillow} | found, missing


def idat_stream(data: bytes) -> bytes:
    """The concatenated IDAT chunk data of a PNG: one zlib stream."""
    position, parts = 8, []
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        if kind == b"IDAT":
            parts.append(data[position + 8 : position + 8 + length])
        position += length + 12
    return b"".join(parts)


def time_methods(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms per call over ``rounds`` rounds of ~0.3 s loops, the methods back to back
    (``bench_build.images_per_second``)."""
    rates = images_per_second(methods, rounds, 0.3)
    return {name: round(1e3 / statistics.median(v), 2) for name, v in rates.items()}


def measure(path: Path, rounds: int) -> dict[str, object]:
    data = path.read_bytes()
    found, _ = decoders()
    reference = found["pillow"](data)
    decode_methods, refused = {}, {}
    for name, decode in found.items():
        try:
            same = np.array_equal(decode(data), reference)
        except Exception as error:  # noqa: BLE001 - a candidate that refuses the file is a result
            refused[name] = f"{type(error).__name__}: {error}"[:120]
            continue
        if not same:
            refused[name] = "decodes to other pixels than Pillow"
            continue
        decode_methods[name] = lambda decode=decode: decode(data)
    stream = idat_stream(data)
    inflate_found, _ = inflaters()
    inflate_methods = {name: (lambda f=f: f(stream)) for name, f in inflate_found.items()}
    result = {
        "file_kib": round(len(data) / 1024, 1),
        "decode_ms": time_methods(decode_methods, rounds),
        "refused": refused,
        "inflate_ms": time_methods(inflate_methods, rounds),
    }
    if reference.dtype == np.uint8:
        result["jpeg_encode_ms"] = time_methods(jpeg_encoders(reference)[0], rounds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    report: dict[str, object] = {
        "machine": {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["python", *sys.argv]),
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "pillow": PIL.__version__,
            "zlib_loaded_by_pillow": PIL.features.version("zlib"),
            "load_average_start": [round(v, 2) for v in os.getloadavg()],
            "code": code_version(),
        },
        "missing": sorted(
            set(decoders()[1] + inflaters()[1] + jpeg_encoders(np.zeros((8, 8), np.uint8))[1])
        ),
    }
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    keep_freed_memory()  # as in a build worker
    rng = np.random.default_rng(0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="machex-codecs-") as scratch:
        for spec in INPUTS:  # every input draws its grain, in bench_build's order
            values, _ = grainy_pixels(spec, rng)
            if spec.key in PNG_KEYS:
                path = write_input(spec, values, Path(scratch))
                results[spec.key] = measure(path, args.rounds)
                print(f"{spec.label} ({results[spec.key]['file_kib']} KiB)")
                for kind in ("decode_ms", "inflate_ms", "jpeg_encode_ms"):
                    for name, ms in results[spec.key].get(kind, {}).items():
                        print(f"  {kind[:-3]:<12} {name:<28} {ms:8.2f} ms")
                for name, why in results[spec.key]["refused"].items():
                    print(f"  refused      {name:<28} {why}")
            if set(results) == set(PNG_KEYS):
                break
    report["results"] = results
    report["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    if report["missing"]:
        print("not installed:", ", ".join(report["missing"]))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
