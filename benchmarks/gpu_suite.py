"""One prepared GPU benchmark run: the bench scripts as subprocesses, in priority order, under
one time budget, every figure kept as it comes in.

    python benchmarks/gpu_suite.py [--out DIR] [--budget SECONDS] [--only NAME,...]
        [--skip NAME,...] [--smoke [--smoke-compile]] [--dry-run]

For issue 14 (GPU efficiency) and the GPU rows of docs/benchmarks.md's "Report model (issue
11)" and "Super-resolution and the cascade (issue 12)": training images/s, peak memory
(``torch.cuda.max_memory_allocated``) and MFU of the AE, the SDM (``paper``, ``paper-report``)
and the SR at paper configurations in bf16 autocast, walking batch lists up to the first CUDA
out-of-memory; the efficiency options (fp32 against bf16, channels-last, ``torch.compile``,
gradient checkpointing, the SDPA backend: the fused kernels that ran are recorded in every
training row, and one row forces the unfused math path); DDIM sampling (``bench_sample.py``)
and the cascade (``bench_cascade.py``) in bf16. A probe first records the machine (``nvidia-smi
-L``, the GPU's name, torch and CUDA versions, the SDPA and TF32 settings) and a measured
8192^3 bf16 matmul rate for context. The SDM rows also profile a step or two
(``bench_train.py --profile``: kernel time by kind, the GPU's busy share) and time their steps
back to back as training runs them (the steady MFU, judged beside the per-step one). MFU is
the scripts' ``flop_counter()`` FLOPs per step / the measured step time / the GPU's dense bf16
peak (``bench_train.PEAK_BF16_TFLOPS``: 989 TFLOP/s for an H100 SXM); the target checked: MFU
>= 35 % for the SDM at the paper configuration in bf16.

Each command writes its ``--json`` into a temporary folder (the bench scripts rewrite it after
every row, so a command cut short keeps its finished rows). After EVERY command the suite
rewrites ``OUT/gpu_results.json`` (the machine, every command line, return code, wall time,
status, its JSON, and its output's tail when it failed) and ``OUT/gpu_summary.md`` (the compact
tables), and the commands' output streams into ``OUT/gpu_log.txt`` line by line as it comes. A
command that would not fit the remaining ``--budget`` (by its estimate) is skipped and recorded
as such; each runs under ``min(its own timeout, the budget left)``; SIGTERM to the suite ends
the running command and writes what was collected. ``OUT`` defaults to ``$OUT``.

``--dry-run`` prints the command list with estimated seconds (from each model's FLOPs per image
and assumed GPU rates: see ``RATE_TFLOPS``) and stops. ``--smoke`` runs the same list with the
tiny presets on the CPU (``--device cpu``, small batches, one warm-up and one timed step, one torch
thread (two threads on a shared 2-core VM slow down tens of times), the cascade's SR output at
128 px; fp32 except the first SDM command and the bf16 GroupNorm rows, which change nothing
in fp32: bf16 autocast is emulated and slow on a CPU without bf16 instructions) to test the
driver and the scripts' options before the GPU run; the compile rows are skipped there
(minutes of C++ compilation on a small CPU) unless ``--smoke-compile``.

The repository need not be installed: the suite puts the repo root on the children's
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import step_profile

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: The MFU target of issue 14 for the SDM at the paper configuration in bf16.
MFU_TARGET = 0.35
#: Assumed seconds a child spends before its first row on the GPU machine (interpreter, torch
#: and cheff imports, CUDA context, the scripts' priming step).
STARTUP_S = 10.0
#: model/preset -> (GFLOP per image of a training step (forward and backward, measured on the
#: CPU: docs/benchmarks.md), seconds to build one model on the CPU and move it).
TRAIN_COST = {
    ("sdm", "paper"): (709.0, 4.0),
    ("sdm", "paper-report"): (1430.0, 8.0),
    ("ae", "paper"): (4287.0, 1.5),
    ("sr", "paper"): (650.0, 1.5),
}
#: Assumed achieved TFLOP/s on an H100 for the estimates (precision -> model -> rate).
RATE_TFLOPS = {
    "bf16": {"sdm": 300.0, "ae": 200.0, "sr": 100.0},
    "fp32": {"sdm": 100.0, "ae": 80.0, "sr": 50.0},
}
#: Assumed torch.compile time (forward and backward graphs) of a paper U-Net, with what a
#: compiled row spends beyond the estimate's steps (the eager FLOP count, the sync check, the
#: profile), seconds, on a fresh H100 machine of this workplace: about 145 s (the first run's
#: 103 s and 126 s compiles; the second run's 142.7 s row less its steps), and about 180 s with
#: cudnn.benchmark, which also times cuDNN's algorithms (the third run's rows: 208.9 s with a
#: profile and 202 s without, 132 s of it the compile, against 27.5 s estimated for the rest).
COMPILE_S = 145.0
COMPILE_CUDNN_S = 180.0
#: The SDM paper batch the rows that follow ``sdm_paper_bf16`` use when it has not run (with
#: ``--only``): its best on an H100, 2026-11-27 (docs/benchmarks.md).
BEST_SDM_BATCH = 256


@dataclass
class Command:
    """One bench-script run. ``args`` may depend on the results collected so far (e.g. the
    best batch of an earlier command)."""

    name: str
    script: str  # file under benchmarks/, or "probe" (this file's --probe)
    args: Callable[[dict[str, Any]], list[str]] | list[str]
    estimate_s: float
    timeout_s: float
    what: str
    skip_reason: str | None = None  # set: recorded as skipped without running
    meta: dict[str, Any] = field(default_factory=dict)

    def argv(self, done: dict[str, Any]) -> list[str]:
        return list(self.args(done) if callable(self.args) else self.args)


# --- what to run ----------------------------------------------------------------------------


def _train_estimate(
    model: str,
    preset: str,
    batches: list[int],
    precision: str = "bf16",
    warmup: int = 2,
    steps: int = 8,
    factor: float = 1.0,
    extra: float = 0.0,
    profile: int = 0,
) -> float:
    """Seconds of one bench_train command: start-up, and per batch the build, the FLOP-counting
    first step (~2 s of Python dispatch), the warm-up steps, the timed steps twice (each
    synchronised, then back to back) and the profiled steps at the assumed rate."""
    gflop, build = TRAIN_COST[(model, preset)]
    rate = RATE_TFLOPS[precision][model] * 1e3  # GFLOP/s
    total = STARTUP_S + extra
    for batch in batches:
        total += build + 2.0 + (warmup + 2 * steps + profile) * batch * gflop * factor / rate
    return round(total, 1)


def best_batch(done: dict[str, Any], name: str, default: int) -> int:
    """The batch of the most images/s among the measured rows of command ``name``."""
    rows = [
        r
        for r in (done.get(name) or {}).get("results", [])
        if "oom" not in r and "images_per_s" in r
    ]
    return max(rows, key=lambda r: r["images_per_s"])["batch_size"] if rows else default


def _batches(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def gpu_commands() -> list[Command]:
    """The GPU list, in priority order: the SDM paper bf16 MFU rows, the paper steps of the
    report model, the SR and the AE, the efficiency options, sampling and the cascade."""
    steps = ["--warmup", "2", "--steps", "8"]  # one FLOP-counting + one plain warm-up step

    def sdm_best(done: dict[str, Any]) -> list[str]:
        return ["--batch-size", str(best_batch(done, "sdm_paper_bf16", BEST_SDM_BATCH))]

    def train(model: str, preset: str, batches: list[int], *options: str) -> list[str]:
        flag = "--batch-sizes" if len(batches) > 1 else "--batch-size"
        return [model, "--preset", preset, *options, flag, _batches(batches), *steps]

    def at_best(*options: str) -> Callable[[dict[str, Any]], list[str]]:
        return lambda done: ["sdm", "--preset", "paper", *options, *sdm_best(done), *steps]

    sdm_batches = [32, 64, 128, 256, 384, 512]
    report_batches = [32, 64, 128, 256]
    sr_batches = [8, 16, 32, 64]
    ae_batches = [8, 16, 32]
    return [
        Command(
            "probe",
            "probe",
            [],
            STARTUP_S + 3,
            90,
            "machine, versions, SDPA/TF32 settings, 8192^3 bf16 matmul TFLOP/s",
        ),
        Command(
            "sdm_paper_bf16",
            "bench_train.py",
            train("sdm", "paper", sdm_batches, "--profile", "1"),
            _train_estimate("sdm", "paper", sdm_batches[:5], profile=1),
            200,
            "SDM paper, bf16: images/s, memory, MFU by batch until OOM (MFU >= 35 % target), "
            "and one profiled step per batch: where the time goes",
        ),
        Command(
            "sdm_paper_bf16_eager",
            "bench_train.py",
            at_best("--profile", "1"),
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH], profile=1),
            120,
            "SDM paper bf16 eager at the best batch, one profiled step: the baseline of the rows "
            "below when sdm_paper_bf16 does not run (--only)",
        ),
        Command(
            "sdm_paper_bf16_norm",
            "bench_train.py",
            at_best("--norm-in-compute-dtype", "--profile", "1"),
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH], profile=1),
            120,
            "efficiency: the U-Net's GroupNorms in bf16 (train.norm_in_compute_dtype), eager; "
            "roofline.py predicts 36 % fewer bytes moved",
        ),
        Command(
            "sdm_paper_bf16_compile",
            "bench_train.py",
            at_best("--compile", "--profile", "2"),
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH], extra=COMPILE_S, profile=2),
            240,
            "efficiency: torch.compile (default mode) at the best bf16 batch, compile_s apart; "
            "two profiled steps: the compiled step's kernels by kind, the GPU's busy share",
        ),
        Command(
            "sdm_paper_bf16_compile_all",
            "bench_train.py",
            at_best("--compile", "--cudnn-benchmark", "--profile", "1"),
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH], extra=COMPILE_CUDNN_S, profile=1),
            300,
            "efficiency: compile + cudnn.benchmark at the best bf16 batch, one profiled step "
            "(33.3 % MFU steady on an H100 with fused Adam; cuDNN's layout transposes took 15 % "
            "of the GPU time: the baseline of sdm_paper_bf16_compile_channels_last)",
        ),
        Command(
            "sdm_paper_bf16_compile_channels_last",
            "bench_train.py",
            at_best("--compile", "--cudnn-benchmark", "--compile-channels-last", "--profile", "1"),
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH], extra=COMPILE_CUDNN_S, profile=1),
            300,
            "efficiency: sdm_paper_bf16_compile_all with Inductor's channels-last layout forced "
            "(train.compile_channels_last; the best measured: 35.1 % MFU steady on an H100), "
            "one profiled step: are cuDNN's NCHW <-> NHWC transposes (15 % of the GPU time "
            "without it) gone, and what replaced them",
        ),
        Command(
            "sdm_paper_bf16_compile_foreach",
            "bench_train.py",
            at_best("--compile", "--cudnn-benchmark", "--optimizer-impl", "foreach"),
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH], extra=COMPILE_S / 4),
            240,
            "efficiency: sdm_paper_bf16_compile_all with Adam's foreach kernels (the loop's "
            "choice on CUDA before train.optimizer_impl; the fused ones move 10.5 against 25.0 "
            "GB by the roofline); a short compile after the row above, from Inductor's cache",
        ),
        Command(
            "sdm_paper_bf16_compile_tuned",
            "bench_train.py",
            at_best(
                "--compile",
                "--cudnn-benchmark",
                "--compile-channels-last",
                "--inductor",
                "coordinate_descent_tuning=True",
                "--profile",
                "1",
            ),
            _train_estimate(
                "sdm", "paper", [BEST_SDM_BATCH], extra=COMPILE_CUDNN_S + COMPILE_S, profile=1
            ),
            420,
            "efficiency: sdm_paper_bf16_compile_channels_last with Inductor's coordinate-descent "
            "tuning of its pointwise and reduction kernels (the memory-bound part of the step; "
            "a longer compile: at batch 384 the row did not finish in 341 s on an H100)",
        ),
        Command(
            "sdm_paper_bf16_compile_large",
            "bench_train.py",
            lambda done: [
                "sdm",
                "--preset",
                "paper",
                "--compile",
                "--cudnn-benchmark",
                "--compile-channels-last",
                "--batch-size",
                str(best_batch(done, "sdm_paper_bf16", BEST_SDM_BATCH) * 3 // 2),
                *steps,
            ],  # fmt: skip
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH * 3 // 2], extra=COMPILE_CUDNN_S),
            300,
            "efficiency: sdm_paper_bf16_compile_channels_last at 1.5x the best bf16 batch "
            "(compiled steps hold 38 % less memory than eager ones)",
        ),
        Command(
            "sdm_report_bf16",
            "bench_train.py",
            train("sdm", "paper-report", report_batches),
            _train_estimate("sdm", "paper-report", report_batches[:3]),
            180,
            "issue 11: report model's paper step, bf16, batches until OOM",
        ),
        Command(
            "sr_paper_bf16",
            "bench_train.py",
            train("sr", "paper", sr_batches),
            _train_estimate("sr", "paper", sr_batches[:3]),
            150,
            "issue 12: SR paper step, bf16, batches until OOM",
        ),
        Command(
            "ae_paper_bf16",
            "bench_train.py",
            train("ae", "paper", ae_batches),
            _train_estimate("ae", "paper", ae_batches),
            150,
            "issue 14: AE paper step (discriminator on, random-init LPIPS), bf16",
        ),
        Command(
            "sdm_paper_fp32",
            "bench_train.py",
            train("sdm", "paper", [64], "--precision", "fp32"),
            _train_estimate("sdm", "paper", [64], "fp32"),
            120,
            "efficiency: fp32 (torch defaults: TF32 convolutions, fp32 matmuls) against bf16",
        ),
        Command(
            "sdm_paper_bf16_channels_last",
            "bench_train.py",
            at_best("--channels-last"),
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH]),
            120,
            "efficiency: channels-last at the best bf16 batch",
        ),
        Command(
            "sample_report_bf16",
            "bench_sample.py",
            ["--preset", "paper-report", "--bf16", "--full", "--batch-size", "16"],
            STARTUP_S + 10 + 20,
            150,
            "issue 11: report sampling, DDIM-150 and DPM-20 whole, w = 1 and 3, bf16, batch 16",
        ),
        Command(
            "cascade_paper_bf16",
            "bench_cascade.py",
            ["--preset", "paper", "--bf16", "--batch-size", "16", "--calls", "3"],
            STARTUP_S + 12,
            120,
            "issue 12: cascade s per 1024 px image, extrapolated from 3 calls per U-Net, bf16",
        ),
        Command(
            "sdm_report_bf16_ckpt",
            "bench_train.py",
            train("sdm", "paper-report", [128, 256], "--grad-checkpointing"),
            _train_estimate("sdm", "paper-report", [128, 256], factor=1.3),
            150,
            "issue 11: report model with gradient checkpointing, bf16",
        ),
        Command(
            "sr_paper_bf16_ckpt",
            "bench_train.py",
            train("sr", "paper", [32, 64], "--grad-checkpointing"),
            _train_estimate("sr", "paper", [32, 64], factor=1.3),
            150,
            "issue 12: SR with gradient checkpointing, bf16",
        ),
        Command(
            "sdm_paper_bf16_autotune",
            "bench_train.py",
            at_best("--compile", "--compile-mode", "max-autotune-no-cudagraphs"),
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH], extra=3 * COMPILE_S),
            420,
            "efficiency: torch.compile max-autotune (kernel tuning, no CUDA graphs) at the best "
            "bf16 batch; compile_s apart",
        ),
        Command(
            "sample_paper_bf16",
            "bench_sample.py",
            ["--preset", "paper", "--bf16", "--full", "--batch-size", "16"],
            STARTUP_S + 12,
            120,
            "sampling, the unconditional paper LDM: DDIM-150 and DPM-20 whole, bf16, batch 16",
        ),
        Command(
            "sdm_paper_bf16_sdpa_math",
            "bench_train.py",
            train("sdm", "paper", [64], "--sdpa", "math"),
            _train_estimate("sdm", "paper", [64], factor=1.3),
            120,
            "efficiency: unfused attention (SDPA math backend) against the fused default",
        ),
        Command(
            "sdm_paper_bf16_ckpt",
            "bench_train.py",
            at_best("--grad-checkpointing"),
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH], factor=1.3),
            120,
            "efficiency: gradient checkpointing on the SDM paper step",
        ),
        Command(
            "ae_paper_fp32",
            "bench_train.py",
            train("ae", "paper", [8], "--precision", "fp32"),
            _train_estimate("ae", "paper", [8], "fp32"),
            120,
            "efficiency: the AE in fp32",
        ),
        Command(
            "cascade_paper_bf16_whole",
            "bench_cascade.py",
            ["--preset", "paper", "--bf16", "--batch-size", "16", "--calls", "3", "--full"]
            + ["--full-samplers", "ddim150"],
            STARTUP_S + 12 + 45,
            150,
            "issue 12: the cascade run whole (LDM DDIM-150 + SR DDIM-150, SR batch 4), bf16",
        ),
        Command(
            "sdm_paper_bf16_cudnn_benchmark",
            "bench_train.py",
            at_best("--cudnn-benchmark"),
            _train_estimate("sdm", "paper", [BEST_SDM_BATCH], extra=5),
            120,
            "efficiency: cudnn.benchmark autotuning",
        ),
    ]


def smoke_commands(compile_: bool) -> list[Command]:
    """The same list, tiny presets on the CPU: small batches, one or two steps."""
    cpu = ["--device", "cpu"]
    tiny = ["--warmup", "1", "--steps", "1"]
    commands = []
    for command in gpu_commands():
        name = command.name
        if command.script == "probe":
            args: Any = ["--device", "cpu"]
        elif command.script == "bench_train.py":
            gpu_args = command.argv({})
            model = gpu_args[0]
            preset = gpu_args[gpu_args.index("--preset") + 1]
            small = {"paper": "tiny", "paper-report": "tiny-report"}[preset]
            keep = []  # the options under test, without batches and steps
            skip_next = False
            for value in gpu_args[1:]:
                if skip_next:
                    skip_next = False
                    continue
                if value in ("--preset", "--batch-sizes", "--batch-size", "--warmup", "--steps"):
                    skip_next = True
                    continue
                keep.append(value)
            # bf16 autocast on this CPU is emulated and slow: only the first command keeps it,
            # and the bf16 GroupNorm rows (in fp32 the option changes nothing)
            bf16 = name == "sdm_paper_bf16" or "--norm-in-compute-dtype" in keep
            precision = [] if "--precision" in keep else ["--precision", "bf16" if bf16 else "fp32"]
            batches = "2,4" if "--batch-sizes" in gpu_args else "2"
            dynamic = callable(command.args)  # best batch of the first command: keep that

            def args(
                done: dict[str, Any],
                keep=keep,
                precision=precision,
                model=model,
                small=small,
                batches=batches,
                dynamic=dynamic,
            ) -> list[str]:
                batch = str(best_batch(done, "sdm_paper_bf16", 2)) if dynamic else batches
                return [model, "--preset", small, *keep, *precision, "--batch-sizes", batch,
                        *cpu, *tiny, "--threads", "1"]  # fmt: skip

        elif command.script == "bench_sample.py":
            preset = "tiny-report" if "paper-report" in command.argv({}) else "tiny"
            args = ["--preset", preset, "--batch-size", "2", *cpu, "--threads", "1"]
        else:  # the cascade: the tiny LDM at 32 px, the SR output at 128 px instead of 1024
            args = ["--preset", "tiny", "--batch-size", "2", "--calls", "1"]
            args += ["--whole", "2,1", "--sr-size", "128", *cpu, "--threads", "1"]
            if "--full" in command.argv({}):
                args += ["--full", "--full-samplers", "dpm20"]
        skip = None
        if "--compile" in command.argv({}) and not compile_:
            skip = "smoke: torch.compile on this CPU takes minutes (--smoke-compile runs it)"
        commands.append(
            Command(
                name,
                command.script,
                args,
                10.0,
                240.0,
                command.what,
                skip_reason=skip,
                meta={"dynamic": callable(command.args)},
            )
        )
    return commands


# --- the probe (run as a child: CUDA is initialised there, not in the driver) -------------


def probe(device_name: str, out: Path) -> None:
    """Machine facts and a matmul rate; written to ``out`` as JSON."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    imports = {}
    for module in ("cheff.pipeline", "cheff.train.sdm", "cheff.train.ae", "cheff.train.sr"):
        try:
            __import__(module)
            imports[module] = "ok"
        except Exception as error:  # recorded, not fatal: the commands fail on their own
            imports[module] = f"{type(error).__name__}: {error}"
    info["imports"] = imports
    import torch

    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        properties = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": torch.cuda.get_device_name(device),
            "gpu_memory_gib": round(properties.total_memory / 2**30, 2),
            "sm_count": properties.multi_processor_count,
            "capability": f"{properties.major}.{properties.minor}",
            "cudnn": torch.backends.cudnn.version(),
            "sdp_enabled": {
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
    out.write_text(json.dumps(info, indent=2) + "\n")  # the facts, even if the matmuls fail
    n = 8192 if cuda else 256
    rates = {}
    for label, dtype, tf32 in (
        ("bf16", torch.bfloat16, False),
        ("fp32_tf32", torch.float32, True),
        ("fp32", torch.float32, False),
    ):
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        repeats = 0
        start = time.perf_counter()
        while True:  # at least 10 products and 0.5 s
            a @ b
            repeats += 1
            if cuda and repeats % 10 == 0:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if repeats >= 10 and (not cuda or repeats % 10 == 0) and elapsed > 0.5:
                break
        rates[label] = float(f"{2 * n**3 * repeats / elapsed / 1e12:.4g}")
        del a, b
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = info["matmul_allow_tf32"]
    info["matmul"] = {"n": n, "tflops": rates}
    sys.path.insert(0, str(HERE))
    try:
        from bench_train import PEAK_BF16_TFLOPS

        name = info.get("gpu", "")
        peak = next((v for k, v in PEAK_BF16_TFLOPS if k.lower() in name.lower()), None)
        info["peak_bf16_tflops_spec"] = peak
        if peak:
            info["matmul_bf16_of_spec_peak"] = round(rates["bf16"] / peak, 4)
    except Exception as error:
        info["peak_bf16_tflops_spec"] = f"unavailable: {type(error).__name__}: {error}"
    out.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


# --- the driver -----------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_text(text)
    partial.replace(path)


def _nvidia_smi(*arguments: str) -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", *arguments], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable: {type(error).__name__}"
    return done.stdout.strip() or done.stderr.strip()


#: nvidia-smi's facts that bear on the rates: the board's power limit and clocks, the driver.
GPU_QUERY = (
    "--query-gpu=name,memory.total,power.limit,clocks.max.sm,clocks.max.mem,driver_version,"
    "mig.mode.current,temperature.gpu,utilization.gpu"
)


class Suite:
    def __init__(self, out: Path, budget: float, smoke: bool) -> None:
        self.out = out
        self.budget = budget
        self.smoke = smoke
        self.start = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.log = open(out / "gpu_log.txt", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.records: list[dict[str, Any]] = []
        self.done: dict[str, Any] = {}  # name -> the command's JSON
        self.process: subprocess.Popen | None = None
        self.current: tuple[dict[str, Any], Path] | None = None  # the running command's record
        self.env = dict(os.environ)
        path = [str(ROOT), *filter(None, self.env.get("PYTHONPATH", "").split(os.pathsep))]
        self.env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        self.env["PYTHONUNBUFFERED"] = "1"
        if smoke:
            self.env.setdefault("OMP_NUM_THREADS", "2")
        self.header = {
            "suite": "benchmarks/gpu_suite.py",
            "mode": "smoke (CPU, tiny presets)" if smoke else "gpu",
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "argv": sys.argv,
            "budget_s": budget,
            "host": platform.node(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "nvidia_smi_L": None if smoke else _nvidia_smi("-L"),
            "nvidia_smi_query": None if smoke else _nvidia_smi(GPU_QUERY, "--format=csv"),
            "repo_root": str(ROOT),
            "pythonpath": self.env["PYTHONPATH"],
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        line = f"[suite {self.elapsed():7.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def save(self) -> None:
        document = {
            **self.header,
            "elapsed_s": round(self.elapsed(), 1),
            "commands": self.records,
        }
        _write(self.out / "gpu_results.json", json.dumps(document, indent=2, default=str) + "\n")
        summary = summarize(document)
        _write(self.out / "gpu_summary.md", summary + "\n")
        return None

    def run(self, command: Command) -> None:
        record: dict[str, Any] = {"name": command.name, "what": command.what}
        self.records.append(record)
        remaining = self.budget - self.elapsed()
        if command.skip_reason:
            record |= {"status": "skipped", "reason": command.skip_reason}
            self.say(f"skip {command.name}: {command.skip_reason}")
            self.save()
            return
        if command.estimate_s > remaining:
            reason = f"budget: estimate {command.estimate_s:.0f} s > {remaining:.0f} s left"
            record |= {"status": "skipped", "reason": reason}
            self.say(f"skip {command.name}: {reason}")
            self.save()
            return
        json_path = self.work / f"{command.name}.json"
        try:
            extra = command.argv(self.done)
        except Exception as error:  # a bad dynamic argument: recorded, the suite goes on
            record |= {"status": "failed", "reason": f"arguments: {error!r}"}
            self.save()
            return
        if command.script == "probe":
            argv = [sys.executable, str(Path(__file__).resolve()), "--probe", *extra]
        else:
            argv = [sys.executable, str(HERE / command.script), *extra]
        argv += ["--json", str(json_path)]
        timeout = max(1.0, min(command.timeout_s, remaining))
        shown = shlex.join(["python", *argv[1:]])
        record |= {
            "argv": shown,
            "estimate_s": command.estimate_s,
            "timeout_s": round(timeout, 1),
            "started_at_s": round(self.elapsed(), 1),
        }
        self.say(f"run {command.name} (timeout {timeout:.0f} s): {shown}")
        self.current = (record, json_path)
        self.save()  # killed without a signal it can catch, the record still says what ran
        tail: collections.deque[str] = collections.deque(maxlen=40)
        start = time.monotonic()
        self.process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: a timeout ends compile workers too
        )

        def pump(stream: Any) -> None:
            for line in stream:
                tail.append(line.rstrip("\n"))
                self.log.write(f"  {command.name}| {line}")

        reader = threading.Thread(target=pump, args=(self.process.stdout,), daemon=True)
        reader.start()
        status = "ok"
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = "timeout"
            self._stop()
        reader.join(timeout=10)
        rc = self.process.returncode
        self.process = self.current = None
        if status == "ok" and rc != 0:
            status = "failed"
        record |= {"status": status, "rc": rc, "wall_s": round(time.monotonic() - start, 1)}
        if json_path.is_file():
            try:
                self.done[command.name] = json.loads(json_path.read_text())
                record["json"] = self.done[command.name]
            except json.JSONDecodeError as error:
                record["json_error"] = str(error)
        if status != "ok":
            record["output_tail"] = list(tail)
        self.say(f"{status} {command.name}: rc {rc}, {record['wall_s']} s")
        self.save()

    def _stop(self) -> None:
        """End the running command's process group: SIGTERM, then SIGKILL after 10 s."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def terminated(self, signum: int, frame: Any) -> None:
        self.say(f"signal {signum}: ending the running command, keeping what was collected")
        self._stop()
        if self.current is not None:  # what the running command had written so far
            record, json_path = self.current
            record["status"] = f"killed (signal {signum})"
            record["wall_s"] = round(self.elapsed() - record["started_at_s"], 1)
            if json_path.is_file():
                try:
                    record["json"] = json.loads(json_path.read_text())
                except json.JSONDecodeError as error:
                    record["json_error"] = str(error)
        self.header["ended_by_signal"] = signum
        self.save()
        self.log.close()
        os._exit(128 + signum)


# --- summary --------------------------------------------------------------------------------


def _options(row: dict[str, Any]) -> str:
    step = row.get("step", "")
    parts = [p.strip() for p in step.split(",")]
    if parts and parts[0] == "full":
        parts = parts[1:]
    return ", ".join(parts) or "-"


def summarize(document: dict[str, Any]) -> str:
    commands = document.get("commands", [])
    lines = [
        f"# GPU suite ({document.get('mode')}), started {document.get('started')}",
        "",
    ]
    probe_info = next(
        (c.get("json") for c in commands if c.get("name") == "probe" and c.get("json")), None
    )
    if probe_info:
        rates = probe_info.get("matmul", {}).get("tflops", {})
        n = probe_info.get("matmul", {}).get("n")
        lines.append(
            f"Machine: {probe_info.get('gpu', 'no GPU')} ({probe_info.get('gpu_memory_gib', '-')}"
            f" GiB), torch {probe_info.get('torch')}, CUDA {probe_info.get('cuda')}, cuDNN "
            f"{probe_info.get('cudnn', '-')}, Python {probe_info.get('python')}, "
            f"{probe_info.get('cpus')} CPUs; {probe_info.get('date')}."
        )
        if rates:
            spec = probe_info.get("peak_bf16_tflops_spec")
            lines.append(
                f"Matmul {n}^3: bf16 {rates.get('bf16')} TFLOP/s"
                + (f" ({100 * rates['bf16'] / spec:.0f} % of the {spec:g} spec peak)"
                   if isinstance(spec, (int, float)) and rates.get("bf16") else "")
                + f", fp32+TF32 {rates.get('fp32_tf32')}, fp32 {rates.get('fp32')}."
            )  # fmt: skip
        if probe_info.get("sdp_enabled"):
            lines.append(f"SDPA backends enabled: {probe_info['sdp_enabled']}.")
        failed = {k: v for k, v in probe_info.get("imports", {}).items() if v != "ok"}
        if failed:
            lines.append(f"Import failures: {failed}.")
        lines.append("")
    if document.get("nvidia_smi_L"):
        lines += [f"nvidia-smi -L: {document['nvidia_smi_L']}", ""]
    if document.get("nvidia_smi_query"):
        lines += ["```", document["nvidia_smi_query"], "```", ""]

    train = []
    for c in commands:
        for row in (c.get("json") or {}).get("results", []):
            if "model" in row:
                train.append((c["name"], row))
    # Model FLOPs per image without recompute, for the MFU of checkpointed rows.
    plain = {}
    for _, r in train:
        if "oom" not in r and not r.get("grad_checkpointing"):
            plain.setdefault((r["model"], r["preset"], r.get("image_size")), r["gflop_per_image"])
    if train:
        lines += [
            "## Training steps",
            "",
            "| command | model | preset | precision | options | batch | images/s | step s | "
            "peak GiB | TFLOP/s | MFU | steady images/s | MFU steady | notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in train:
            head = (
                f"| {name} | {r['model']} | {r['preset']} | {r['precision']} | {_options(r)} | "
                f"{r['batch_size']} |"
            )
            if "oom" in r:
                lines.append(f"{head} OOM | - | - | - | - | - | - | {r['oom'][:60]} |")
                continue
            notes = []
            tflops = r["achieved_tflops"]
            peak = r.get("peak_bf16_tflops")
            mfu = r.get("mfu")
            if r.get("grad_checkpointing"):
                model_gflop = plain.get((r["model"], r["preset"], r.get("image_size")))
                if model_gflop and peak:
                    mfu = model_gflop * r["images_per_s"] / 1e3 / peak
                    notes.append(f"MFU from model FLOPs; HFU {100 * r['mfu']:.1f}%")
                else:
                    notes.append("MFU counts the recompute (HFU)")
            if r.get("compile_s") is not None:
                notes.append(f"compile {r['compile_s']:.0f} s")
            waits = r.get("host_waits_per_step")
            if waits is not None:  # the loop's step should make the host wait for nothing
                notes.append(
                    f"host waits {len(waits)}" + (f" ({', '.join(waits[:3])})" if waits else "")
                )
            ops = r.get("attention_ops") or {}
            fused = sorted({op.replace("_backward", "") for op in ops})
            if r["device_type"] == "cuda" or fused:
                notes.append("attn: " + ("/".join(fused) if fused else "unfused (math)"))
            mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "-"
            steady = r.get("steady_images_per_s")
            steady_mfu = None if r.get("grad_checkpointing") else r.get("mfu_steady")
            lines.append(
                f"{head} {r['images_per_s']:.1f} | {r['step_s_mean']:.3f} | "
                f"{r['memory']['peak_mib'] / 1024:.3g} | {tflops:.3g} | {mfu_text} | "
                f"{'-' if steady is None else f'{steady:.1f}'} | "
                f"{'-' if steady_mfu is None else f'{100 * steady_mfu:.1f}%'} | "
                f"{'; '.join(notes)} |"
            )
        lines.append("")
        sdm = [
            r
            for _, r in train
            if r["model"] == "sdm" and r["preset"] == "paper" and "oom" not in r
            and r["precision"].startswith("bf16") and r.get("mfu") is not None
            and not r.get("grad_checkpointing")
        ]  # fmt: skip
        plain_sdm = [r for r in sdm if _options(r) == "-"]
        timings = (("mfu", "achieved_tflops", "each step synchronised"),
                   ("mfu_steady", "steady_tflops", "steady, as training runs"))  # fmt: skip
        for label, rows in (("eager, no options", plain_sdm), ("any option", sdm)):
            for key, rate, how in timings:
                timed = [r for r in rows if r.get(key) is not None]
                if not timed:
                    continue
                best = max(timed, key=lambda r: r[key])
                verdict = "PASS" if best[key] >= MFU_TARGET else "FAIL"
                lines.append(
                    f"{verdict}  SDM paper bf16 MFU, {label}, {how}: {100 * best[key]:.1f}% "
                    f"(batch {best['batch_size']}, options {_options(best)}, "
                    f"{best[rate]:.0f} TFLOP/s of {best.get('peak_bf16_tflops')}; "
                    f"target >= {100 * MFU_TARGET:.0f}%)"
                )
        if sdm:
            lines.append("")
        fits: dict[tuple[str, str, str], list[int]] = {}
        for _, r in train:
            if "oom" not in r:
                key = (r["model"], r["preset"], _options(r))
                fits.setdefault(key, []).append(r["batch_size"])
        ooms = {(r["model"], r["preset"], _options(r)): r["batch_size"] for _, r in train
                if "oom" in r}  # fmt: skip
        if fits:
            lines.append("Largest batch measured (first OOM):")
            for key, sizes in fits.items():
                oom = ooms.get(key)
                lines.append(
                    f"- {' '.join(key[:2])} [{key[2]}]: {max(sizes)}"
                    + (f" (OOM at {oom})" if oom else " (no OOM seen)")
                )
            lines.append("")

    profiled = [(name, r) for name, r in train if "profile" in r]
    if profiled:
        lines += ["## Where the step's time goes (bench_train.py --profile)", ""]
        for name, r in profiled:
            profile = r["profile"]
            lines += [
                f"### {name}: {r['model']} {r['preset']} batch {r['batch_size']}, {r['step']}",
                "",
                f"The profile failed: {profile['error']}"
                if "error" in profile
                else step_profile.markdown(profile),
                "",
            ]
    sample = [(c["name"], r) for c in commands if c["name"].startswith("sample")
              for r in (c.get("json") or {}).get("results", [])]  # fmt: skip
    if sample:
        lines += [
            "## Sampling (bench_sample.py)",
            "",
            "| preset | sampler | w | calls | batch | precision | s/image | how |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for _, r in sample:
            w = "-" if r.get("guidance_scale") is None else f"{r['guidance_scale']:g}"
            lines.append(
                f"| {r['preset']} | {r['sampler']} | {w} | {r['network_calls']} | "
                f"{r['batch_size']} | {r['precision']} | {r['seconds_per_image']:.4g} | "
                f"{r['how']} |"
            )
        lines.append("")
    cascade = [(c["name"], r) for c in commands if c["name"].startswith("cascade")
               for r in (c.get("json") or {}).get("results", [])]  # fmt: skip
    if cascade:
        lines += [
            "## Cascade (bench_cascade.py)",
            "",
            "| preset | LDM sampler | SR sampler | batch (SR) | image | precision | LDM+decode "
            "s/img | SR s/img | total s/img | how |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _, r in cascade:
            lines.append(
                f"| {r['preset']} | {r['ldm_sampler']} | {r['sr_sampler']} ({r['sr_calls']}) | "
                f"{r['batch_size']} ({r['sr_batch']}) | {r['ldm_image_size']} -> "
                f"{r['image_size']} | {r['precision']} | {r['ldm_s_per_image']:.4g} | "
                f"{r['sr_s_per_image']:.4g} | {r['seconds_per_image']:.4g} | {r['how']} |"
            )
        lines.append("")
    lines += [
        "## Commands",
        "",
        "| command | status | rc | wall s | note |",
        "|---|---|---|---|---|",
    ]
    for c in commands:
        note = c.get("reason") or ""
        if c.get("status") not in ("ok", "skipped") and c.get("output_tail"):
            note = (c["output_tail"][-1] if c["output_tail"] else "")[:100]
        lines.append(
            f"| {c['name']} | {c.get('status', 'running')} | {c.get('rc', '-')} | "
            f"{c.get('wall_s', '-')} | {note.replace('|', '/')} |"
        )
    lines.append(f"\nSuite time {document.get('elapsed_s')} s of a {document.get('budget_s')} s "
                 "budget.")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default $OUT)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all commands")
    parser.add_argument("--only", default="", help="run only these commands (comma-separated)")
    parser.add_argument("--skip", default="", help="leave these commands out (comma-separated)")
    parser.add_argument(
        "--first",
        default="",
        help="run these commands first, in this order, after the probe (comma-separated)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny presets on the CPU")
    parser.add_argument("--smoke-compile", action="store_true", help="--smoke: compile rows too")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", help=argparse.SUPPRESS)  # --probe only
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # --probe only
    args = parser.parse_args()
    if args.probe:
        probe(args.device, args.json or Path("probe.json"))
        return

    commands = smoke_commands(args.smoke_compile) if args.smoke else gpu_commands()
    names = [c.name for c in commands]
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    first = [n for n in args.first.split(",") if n]
    unknown = [n for n in only + skip + first if n not in names]
    if unknown:
        parser.error(f"unknown commands {unknown}; the list: {', '.join(names)}")
    only = only and ["probe", *only]  # the probe (the machine record) runs unless --skip probe
    commands = [c for c in commands if (not only or c.name in only) and c.name not in skip]
    rank = {name: index for index, name in enumerate(["probe", *first])}
    commands.sort(key=lambda c: rank.get(c.name, len(rank)))  # stable: the rest keep their order

    if args.dry_run:
        total = planned = 0.0  # planned: what the budget rule would run if estimates held
        for c in commands:
            total += c.estimate_s
            fits = not c.skip_reason and planned + c.estimate_s <= args.budget
            planned += c.estimate_s if fits else 0.0
            argv = c.argv({})
            script = "gpu_suite.py --probe" if c.script == "probe" else c.script
            dynamic = c.meta.get("dynamic", callable(c.args))
            dynamic = " (batch: best of sdm_paper_bf16)" if dynamic else ""
            print(
                f"{'run ' if fits else 'SKIP'} {c.name:32s} est {c.estimate_s:6.1f} s  "
                f"planned {planned:6.1f} s  timeout "
                f"{c.timeout_s:4.0f} s  python benchmarks/{script} {shlex.join(argv)}{dynamic}"
                + (f"  [skipped: {c.skip_reason}]" if c.skip_reason else "")
            )
            print(f"{'':37s} {c.what}")
        print(
            f"estimated: all {total:.0f} s; within the budget of {args.budget:.0f} s by the "
            f"estimates {planned:.0f} s (commands that finish early leave room for the SKIPs)"
        )
        return

    out = args.out or Path(os.environ.get("OUT") or "gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(out, args.budget, args.smoke)
    signal.signal(signal.SIGTERM, suite.terminated)
    signal.signal(signal.SIGINT, suite.terminated)
    suite.say(f"{len(commands)} commands, budget {args.budget:.0f} s, out {out}")
    suite.save()
    for command in commands:
        suite.run(command)
    suite.header["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    suite.save()
    summary = (out / "gpu_summary.md").read_text()
    suite.log.write("\n" + summary + "\n")
    print(summary)
    failed = [r["name"] for r in suite.records if r.get("status") not in ("ok", "skipped")]
    suite.say(f"done in {suite.elapsed():.0f} s; not ok: {failed or 'none'}")
    suite.log.close()


if __name__ == "__main__":
    main()
