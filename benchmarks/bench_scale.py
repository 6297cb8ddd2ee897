"""Wall time and peak memory of the collection-level operations at the paper's scale.

    python benchmarks/bench_scale.py [--scale 1.0 | --quick] [--out DIR [--keep]] [--no-tars]
        [--jobs 2] [--json FILE]

What a user waits for before the first image: opening a ``MaCheX`` (every manifest read and
joined), a composition, a ``where=`` query, a holdout excluded or selected, a stream's epoch
order, ``make_holdout``, ``machex stats``/``verify``, ``load_manifest`` and cheff's
``load_conditions``. These grow with the number of images, not their pixels, so the bench
writes a synthetic collection of the paper's sizes (6 sources, ~680k images at ``--scale
1.0``, 1000 images per shard) with realistic manifest columns (keys, patients, studies,
labels with nulls, extras JSON, English and Spanish reports, boxes), tiny but valid tar shards
(a few bytes per image; ``--no-tars``: none), a ``build.json`` as ``machex build`` writes it,
and two holdouts (``by-patient``: 25k by patient, ``by-image``: 10k by image, both within
``paper-2023``; sizes times ``--scale``). The collection is deterministic (each shard seeded
by its name). Each operation then runs in a fresh process of this script, so its peak RSS is
its own (``VmHWM``, Linux): Python API rows time the call alone (imports excluded, their RSS
included), ``machex`` rows the command in-process, its imports included. Prints a table;
``--json`` keeps every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PER_SHARD = 1000
#: source: ({split: images}, images per patient (None: one patient per image), report language)
SOURCES = {
    "chestxray14": ({"train": 86523, "test": 25595}, 3.6, None),
    "chexpert": ({"train": 191027, "val": 234}, 2.9, None),
    "mimic": ({"train": 237000, "val": 1900, "test": 4434}, 3.7, "en"),
    "padchest": ({"train": 96278}, 1.42, "es"),
    "brax": ({"train": 19309}, 1.04, None),
    "vindr": ({"train": 15000, "test": 3000}, None, None),
}
EXTRAS = {
    "vindr": {"readers": ["R1", "R2", "R3"], "dicom": {"sex": "M", "age": 45}},
    "padchest": {"window_center": 2048, "window_width": 4096, "manufacturer": "Philips"},
    "brax": {"age_bin": "60-69", "manufacturer": "GE"},
}
REPORT = (
    "final report examination chest pa lat indication cough comparison findings the lungs are "
    "clear without focal consolidation pleural effusion or pneumothorax cardiomediastinal "
    "silhouette is within normal limits cardiomegalia sin hallazg patologic relev aument tram"
)
WORDS = np.array(REPORT.split() + [f"w{i}" for i in range(400)])
COMPOSITION = "paper-2023"
#: name: (images at scale 1, by)
HOLDOUTS = {"by-patient": (25_000, "patient"), "by-image": (10_000, "image")}
QUERY = "`Pleural Effusion` == 1"
#: operation: (table label, the reviewer's figure before this session's fixes, or "")
OPERATIONS = {
    "open": ("MaCheX(out)", "6.2 s / 1.69 GB"),
    "composition": (f"MaCheX(out, composition={COMPOSITION!r})", "6.5-7.6 s / 1.70 GB"),
    "where": (f"MaCheX(out, where={QUERY!r})", ""),
    "exclude-patient": ("... composition, exclude_holdout='by-patient'", "9.0-9.5 s / 2.0 GB"),
    "exclude-image": ("... composition, exclude_holdout='by-image'", ""),
    "holdout-split": ("MaCheX(out, splits='by-patient')", "6.7-7.2 s / 1.76 GB"),
    "stream": ("MaCheX.stream(composition, 8 ranks) + order()", ""),
    "make-holdout": ("make_holdout(25k by patient, composition)", ""),
    "stats": ("machex stats --json", "4.85 s / 0.32 GB"),
    "stats-composition": ("machex stats --json --composition paper-2023", "11.2 s / 0.72 GB"),
    "verify": ("machex verify --json", ""),
    "load-images": ("load_manifest(out, 'images')", "1.1-1.7 s / 0.85 GB"),
    "load-labels": ("load_manifest(out, 'labels')", ""),
    "load-reports": ("load_manifest(out, 'reports')", "4.3 s / 1.5 GB"),
    "conditions-labels": ("load_conditions(paper-labels condition)", "2.2 s / 0.78 GB"),
    "conditions-report": ("load_conditions(paper-report condition)", "8.1-8.7 s / 3.0-3.1 GB"),
}
VERIFY_BEFORE = {True: "51.8 s / 0.51 GB", False: "11.8 s / 0.48 GB"}  # tars / no tars


# --- the synthetic collection -------------------------------------------------------------


def shard_jobs(scale: float) -> list[tuple[str, str, int, int, int, int]]:
    """(source, split, shard index, first image, images, images of the source) per shard."""
    jobs = []
    for source, (splits, _, _) in SOURCES.items():
        sizes = {split: max(1, round(n * scale)) for split, n in splits.items()}
        for split in sorted(sizes):
            for index, start in enumerate(range(0, sizes[split], PER_SHARD)):
                n = min(PER_SHARD, sizes[split] - start)
                jobs.append((source, split, index, start, n, sum(sizes.values())))
    return jobs


def make_shard(out: Path, tars: bool, job: tuple[str, str, int, int, int, int]) -> str:
    """Write one shard's tar (unless not ``tars``) and its manifest fragments; its stem."""
    from machex.manifests import TABLES, fragment_path, write_fragment
    from machex.records import FINDINGS
    from machex.shards import ShardWriter
    from machex.shardwork import shard_path

    source, split, index, start, n, total = job
    _, per_patient, language = SOURCES[source]
    stem = f"{source}-{split}-{index:06d}"
    rng = np.random.default_rng(int(hashlib.sha256(stem.encode()).hexdigest()[:8], 16))
    ids = np.arange(n) + start + {"train": 0, "val": 10**7, "test": 2 * 10**7}[split]
    keys = [f"{source}-p{i:08d}-{hashlib.md5(str(i).encode()).hexdigest()[:8]}" for i in ids]
    if per_patient is None:  # VinDr-CXR: each image is its own patient
        patients = [k.rsplit("-", 1)[1] + str(i) for k, i in zip(keys, ids)]
    elif source in ("padchest", "brax"):  # the key order does not follow the patient
        patients = [str(p) for p in rng.integers(0, int(total / per_patient) + 1, n)]
    else:
        patients = [str(int(i / per_patient)) for i in ids]
    studies = [f"{p}-{int(i / 1.07)}" for p, i in zip(patients, ids)]
    ext = "png" if source in ("vindr", "padchest") else "jpg"
    members = [f"{k}.{ext}" for k in keys]
    payloads = [f"IMG:{k}".encode() * 2 for k in keys]
    extras = [
        json.dumps({"follow_up": int(rng.integers(0, 30))} if source == "chestxray14" else e)
        for e in [EXTRAS.get(source, {})] * n
    ]
    offsets = [512 * (3 * j + 1) for j in range(n)]
    if tars:
        with ShardWriter(shard_path(out, source, stem)) as writer:
            for j, (key, member) in enumerate(zip(keys, members)):
                offsets[j] = writer.add(member, payloads[j]).offset
                meta = {"key": key, "source": source, "split": split, "extras": extras[j]}
                writer.add(f"{key}.json", json.dumps(meta).encode())
            writer.commit()

    reports = []
    for study in dict.fromkeys(studies) if language else ():  # one per study
        chars = int(rng.integers(*(600, 2500) if language == "en" else (30, 250)))
        text = " ".join(rng.choice(WORDS, chars // 6 + 1))[:chars]
        sections = (text[:500], text[-200:], text[:700]) if language == "en" else (None,) * 3
        reports.append(
            {"study_id": study, "language": language, "text": text, "text_v1": text[:700]}
            | dict(zip(("findings", "impression", "findings_impression"), sections))
        )
    box = dict(label="Cardiomegaly", finding="Cardiomegaly", x=100.0, y=200.0, width=300.0,
               height=200.0, clipped=False, orig_x=300.0, orig_y=600.0, orig_width=900.0,
               orig_height=600.0, frame_width=3000, frame_height=3000)  # fmt: skip
    readers = [
        (k, r) for k in keys for r in ("R1", "R2", "R3") if source == "vindr" and rng.random() < 0.5
    ]
    rows = {
        "reports": reports,
        "bboxes": [box | {"key": k, "reader": r} for k, r in readers],
        "reader_labels": [box | {"key": k, "reader": r} for k, r in readers],
        "failures": [dict(key=keys[0] + "x", source_key="a/b.png", path="/data/a/b.png",
                          error_type="UnidentifiedImageError", message="cannot identify")]
        if index == 3 else [],
    }  # fmt: skip
    for table, table_rows in rows.items():
        write_fragment(fragment_path(out, table, source, stem), table, table_rows)

    uncertain = source in ("chexpert", "mimic", "brax")  # -9: not stated (null)
    values, p = ([-9, 1, 0, -1], [0.7, 0.15, 0.1, 0.05]) if uncertain else ([0, 1], [0.9, 0.1])
    labels = {}
    for finding in FINDINGS:
        v = rng.choice(values, n, p=p)
        labels[finding] = pa.array(v, pa.int8(), mask=v == -9)
    native = [["Cardiomegaly", "Edema"][:j] for j in rng.integers(0, 3, n)]
    ages = rng.normal(60, 18, n).clip(0, 100).astype(np.float32)
    ages[rng.random(n) < 0.03] = np.nan
    images = {
        "key": keys, "source_key": [f"files/{m}" for m in members], "patient_id": patients,
        "study_id": studies, "view": rng.choice(["PA", "AP"], n), "split": [split] * n,
        "shard": [f"shards/{source}/{stem}.tar"] * n, "member": members, "offset": offsets,
        "size": [len(p) for p in payloads],
        "sha256": [hashlib.sha256(p).hexdigest() for p in payloads],
        "encoding": ["png16" if ext == "png" else "jpeg"] * n,
        "orig_width": rng.integers(2000, 3000, n), "orig_height": rng.integers(2000, 3000, n),
        "bits": [12 if ext == "png" else 8] * n, "crop_x0": np.zeros(n), "crop_y0": np.zeros(n),
        "crop_x1": np.full(n, 2000.0), "crop_y1": np.full(n, 2000.0),
        "sex": rng.choice(np.array(["M", "F", None]), n, p=[0.5, 0.45, 0.05]),
        "age": pa.array(ages, pa.float32(), from_pandas=True), "extras": extras,
        "boxes_outside": np.zeros(n, np.int32),
    }  # fmt: skip
    arrays = {"labels": {"key": keys, **labels, "native_labels": native}, "images": images}
    for table, columns in arrays.items():  # images last, as a build writes them
        path = fragment_path(out, table, source, stem)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns, schema=TABLES[table]), path)
    return stem


def _make_shard(arguments: tuple) -> str:
    return make_shard(*arguments)


def generate(out: Path, scale: float, tars: bool, jobs: int) -> dict[str, object]:
    """The synthetic collection in ``out``, with ``build.json`` and the two holdouts."""
    from machex.build import BuildOptions, _options_record, update_build_file
    from machex.holdout import make_holdout

    start = time.perf_counter()
    work = shard_jobs(scale)
    with Pool(jobs) as pool:
        stems = pool.map(_make_shard, [(out, tars, job) for job in work], chunksize=4)
    options = _options_record(BuildOptions(), jobs)
    for source, (_, _, language) in SOURCES.items():
        mine = sorted(s for s in stems if s.startswith(f"{source}-"))
        by_split: dict[str, int] = {}
        for job_source, split, _, _, images, _ in work:
            if job_source == source:
                by_split[split] = by_split.get(split, 0) + images
        n = sum(by_split.values())
        update_build_file(out, source, {
            "root": f"/data/{source}", "licence": "synthetic", "options": options,
            "status": "complete", "plan_fingerprint": hashlib.sha256(source.encode()).hexdigest(),
            "shard_fingerprints": {s: hashlib.sha256(s.encode()).hexdigest()[:16] for s in mine},
            "planned": n, "to_build": n, "built": n, "failed": 0, "failure_rate": 0.0,
            "shards": len(mine), "shards_written": len(mine), "by_split": by_split,
            "by_view": {"AP": n // 2, "PA": n - n // 2}, "skipped": {"lateral": 1234},
            "known_bad": 3, "missing_files": 0, "studies": int(n / 1.07),
            "reports": {language: int(n / 1.07)} if language else {}, "boxes": 0,
            "boxes_outside": 0, "finished": "2024-01-01T00:00:00+00:00",
        })  # fmt: skip
    for name, (size, by) in HOLDOUTS.items():
        make_holdout(out, name, max(1, round(size * scale)), by=by, composition=COMPOSITION)
    return {
        "images": sum(job[4] for job in work),
        "shards": len(work),
        "tars": tars,
        "seconds": round(time.perf_counter() - start, 1),
        "mib_on_disk": round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20),
    }


# --- one operation, in a fresh process ----------------------------------------------------


def _peak_mib() -> float:
    """This process's peak RSS, ``VmHWM``: ``getrusage`` would report at least the parent's
    RSS at the fork (Linux keeps the peak of the address space that ``exec`` replaced)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def run_operation(name: str, out: str, scale: float) -> dict[str, object]:
    """Run ``name`` on ``out`` in this process: its seconds, peak RSS and result size."""
    if name.startswith(("stats", "verify")):  # the command, its imports included
        command = [name.split("-")[0], out, "--json"]
        command += ["--composition", COMPOSITION] if name == "stats-composition" else []
        start = time.perf_counter()
        from cli.machex_cli import app

        with contextlib.redirect_stdout(io.StringIO()) as printed:
            try:
                app(command)
            except SystemExit as exit:
                code = exit.code
        seconds = time.perf_counter() - start
        result = f"{len(printed.getvalue()) / 1024:.1f} KiB JSON, exit {code}"
        if name == "verify":
            report = json.loads(printed.getvalue())
            result += f", {report['hashed']:,} hashed, {len(report['problems'])} problems"
        return {"seconds": seconds, "peak_mib": _peak_mib(), "imports_mib": None, "result": result}

    import pandas as pd

    from machex.dataset import MaCheX
    from machex.holdout import make_holdout
    from machex.manifests import load_manifest

    if name.startswith("conditions"):  # cheff's model code, imported before the clock
        from cheff.config import get_sdm_preset
        from cheff.train.conditions import load_conditions

        config = get_sdm_preset(f"paper-{name.removeprefix('conditions-')}").condition

    def frame(df: pd.DataFrame) -> str:
        mib = df.memory_usage(deep=True).sum() / 2**20
        return f"{df.shape[0]:,} x {df.shape[1]}, {mib:.0f} MiB in pandas"

    def operation() -> str:
        if name == "open":
            return f"{len(MaCheX(out)):,} images"
        if name == "composition":
            return f"{len(MaCheX(out, composition=COMPOSITION)):,} images"
        if name == "where":
            return f"{len(MaCheX(out, where=QUERY)):,} images"
        if name.startswith("exclude"):
            held = f"by-{name.removeprefix('exclude-')}"
            return f"{len(MaCheX(out, composition=COMPOSITION, exclude_holdout=held)):,} images"
        if name == "holdout-split":
            return f"{len(MaCheX(out, splits='by-patient')):,} images"
        if name == "stream":
            stream = MaCheX.stream(
                out, composition=COMPOSITION, batch_size=32, world_size=8, rank=0
            )
            start = time.perf_counter()
            order = stream.order()
            return f"{len(order):,} in order ({time.perf_counter() - start:.3f} s of it)"
        if name == "make-holdout":
            size = max(1, round(HOLDOUTS["by-patient"][0] * scale))
            held = make_holdout(out, "bench", size, composition=COMPOSITION, overwrite=True)
            return f"{held.size:,} images held out"
        if name.startswith("load"):
            return frame(load_manifest(out, name.removeprefix("load-")))
        if name.startswith("conditions"):
            return f"{len(load_conditions(out, config)):,} conditions"
        raise ValueError(f"unknown operation {name!r}")

    imports = _peak_mib()
    start = time.perf_counter()
    result = operation()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": _peak_mib(), "imports_mib": imports, "result": result}


def measure(name: str, out: Path, scale: float) -> dict[str, object]:
    """``run_operation`` in a fresh process of this script."""
    command = [sys.executable, __file__, "--operation", name, "--out", str(out)]
    done = subprocess.run([*command, "--scale", str(scale)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"}
    return json.loads(done.stdout.splitlines()[-1])


# --- report -------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    import pandas as pd
    import torch
    from bench_common import code_version, cpu_model

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join(["python", *sys.argv]),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "torch": torch.__version__,
        "code": code_version(),
    }


def print_table(results: dict[str, dict[str, object]], tars: bool, scale: float) -> None:
    """One row per operation; at scale 1 with the reviewer's figure before the fixes."""
    header = f"{'operation':<52} {'wall s':>7} {'peak MiB':>9}  {'result':<48} "
    print(header + ("before" if scale == 1 else "") + "\n" + "-" * len(header))
    for name, r in results.items():
        label, before = OPERATIONS[name]
        before = VERIFY_BEFORE[tars] if name == "verify" else before
        before = before if scale == 1 else ""
        if "error" in r:
            print(f"{label:<52} FAILED: {r['error']}")
        else:
            print(
                f"{label:<52} {r['seconds']:7.2f} {r['peak_mib']:9.0f}  {r['result']:<48} {before}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="the collection (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary collection")
    parser.add_argument("--scale", type=float, default=1.0, help="of the paper's sizes (1.0)")
    parser.add_argument("--quick", action="store_true", help="--scale 0.05 (~34k images)")
    parser.add_argument("--no-tars", action="store_true", help="manifests only, no tar shards")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="to generate")
    parser.add_argument(
        "--only", nargs="+", choices=OPERATIONS, metavar="OP", help=f"of {', '.join(OPERATIONS)}"
    )
    parser.add_argument("--json", "--json-out", type=Path, help="write every figure here")
    parser.add_argument("--operation", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    scale = 0.05 if args.quick else args.scale
    if args.operation:
        print(json.dumps(run_operation(args.operation, str(args.out), scale)))
        return

    report: dict[str, object] = {"machine": machine(), "scale": scale}
    print(json.dumps(report["machine"], indent=2), flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="machex-bench-scale-")) / "out"
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty: give a new folder")
    try:
        report["collection"] = generate(out, scale, not args.no_tars, args.jobs)
        print(f"collection: {report['collection']}", flush=True)
        results = {}
        for name in args.only or OPERATIONS:
            results[name] = measure(name, out, scale)
            print(f"measured {name}: {results[name]}", file=sys.stderr, flush=True)
        report["results"] = results
        print_table(results, not args.no_tars, scale)
        imports = [r["imports_mib"] for r in results.values() if r.get("imports_mib")]
        if imports:
            print(f"of each Python API row's peak, up to {max(imports):.0f} MiB is the imports")
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(out.parent)
        elif args.out is None:
            print(f"kept {out}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
