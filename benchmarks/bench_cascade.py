"""Seconds per 1024 px image of the whole Cheff cascade: latent diffusion at 256 px, decoding,
and super-resolution (SR) to 1024 px.

    python benchmarks/bench_cascade.py [--preset tiny|paper|both] [--batch-size N]
        [--device auto|cpu|cuda] [--bf16] [--calls N] [--whole LDM,SR] [--full]
        [--full-samplers ddim100,ddim150,dpm20] [--sr-size 1024] [--repeats N] [--threads N]
        [--json FILE]

What a user waits for per image of ``cheff.Pipeline(ldm, upscaler=Upscaler(sr, size=1024))``:
the LDM sampler (``steps`` network calls of the latent U-Net at batch B), the autoencoder's
decode of the batch, the official glue to 8-bit grey, then the SR sampler (DDIM over the SR
cosine schedule, each call the SR U-Net at 1024 x 1024 on [x_t, bicubic condition]) in batches
of the ``Upscaler``'s default 4 (``Pipeline`` does not pass its own batch size on). Random
weights of each preset's sizes (the cost does not depend on the values):

- ``paper``: the released unconditional U-Net (``cheff.models.unet.UNCOND_RELEASED``, channel
  mult (1, 2, 3, 4), 3 x 64 x 64 latents), ``AutoencoderKL()`` (the default config) at 256 px,
  and the released SR U-Net (``SRUNetConfig()``: dim 16, mults (1, 2, 4, 8, 16, 32, 32, 32)).
- ``tiny``: the tiny SDM preset's U-Net and the tiny autoencoder at 32 px (3 x 8 x 8 latents),
  and a small SR U-Net (``TINY_SR``: dim 8, mults (1, 1, 1, 1, 1, 2, 2), 3 attention layers)
  still at 1024 px, so its SR stage is the real output size with a much smaller network.

Two ways, one row each (column "how"):

- **extrapolated**: each stage's network timed alone: ``--calls`` calls of the LDM U-Net at
  batch B, and of the SR U-Net at 1024 px at the SR batch (each after one untimed call of the
  same shape), and one decode of the batch (after one untimed decode). Seconds per image =
  (LDM calls x per call + decode) / B + SR calls x SR per call / SR batch. Left out: the
  samplers' own arithmetic, noise draws, the glue and the bicubic condition (the whole tiny
  runs below show how much that is). Given for the paper's settings: SR DDIM 150 steps (the
  official rule takes every (2000 // 150) = 13th step: 154 calls, ``NoiseSchedule.sr_cosine()
  .ddim_timesteps(150)``), after the LDM with DDIM 100 (``Pipeline``'s default: 100 calls),
  DDIM 150 (the paper: every (1000 // 150)-th step, 167 calls) or DPM-Solver++(2M) 20.
- **measured**: ``Pipeline`` run whole (the median of ``--repeats`` runs, after one small
  untimed run): the LDM part (sampling, decode, glue) from ``pipe.last_run["seconds"]``, the SR
  part from ``pipe.last_run["sr_seconds"]``, the total the wall time of the call. ``tiny``
  always runs whole with the DDIM step counts of ``--whole`` (default 20 LDM and 10 SR steps:
  20 and 10 network calls), and is also extrapolated to those counts as a check of the
  extrapolation; ``--full`` also runs every preset whole at the paper's settings above (on a
  CPU the paper cascade takes hours per batch).

On a GPU: bf16 autocast for the LDM and SR U-Nets with ``--bf16`` (the decoder stays fp32, as
in ``Pipeline``), synchronised timing. Prints a Markdown table for ``docs/benchmarks.md``, the
parts (per-call and decode seconds), the machine, date, command and code version; ``--json``
writes all of it, rewritten after the parts (with every extrapolated row) and after each whole
run, ``complete`` false until the end. ``--full-samplers`` limits ``--full``'s whole runs to
some LDM samplers (``ddim100``, ``ddim150``, ``dpm20``); ``--sr-size`` (default 1024) is only
for testing the script at a smaller SR output.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sample import seconds_text, sync  # noqa: E402
from bench_train import count_parameters, machine  # noqa: E402

from cheff.config import TINY, AutoencoderConfig  # noqa: E402
from cheff.diffusion import solver_timesteps  # noqa: E402
from cheff.models import AutoencoderKL, LatentDiffusion, UNetModel  # noqa: E402
from cheff.models.sr import SR_SIZE, SuperResolution, sr_condition  # noqa: E402
from cheff.models.sr_unet import SRUNet, SRUNetConfig  # noqa: E402
from cheff.models.unet import UNCOND_RELEASED  # noqa: E402
from cheff.pipeline import Pipeline  # noqa: E402
from cheff.upscale import DEFAULT_SR_STEPS, Upscaler  # noqa: E402

TINY_SR = SRUNetConfig(dim=8, dim_mults=(1, 1, 1, 1, 1, 2, 2), attention_layers=3)
#: name -> (LDM U-Net, autoencoder, LDM image side, SR U-Net); SR output SR_SIZE (1024).
PRESETS = {
    "tiny": (TINY.train_sdm.model, TINY.autoencoder, 32, TINY_SR),
    "paper": (UNCOND_RELEASED, AutoencoderConfig(), 256, SRUNetConfig()),
}
GROUPS = {"both": ["tiny", "paper"]}
#: The paper's settings, extrapolated for every preset: label -> (LDM sampler, steps asked).
LDM_SAMPLERS = {
    "DDIM-100 (Pipeline default)": ("ddim", 100),
    "DDIM-150 (paper, official steps)": ("ddim", 150),
    "DPM-Solver++(2M), 20": ("dpm", 20),
}
#: Short names of LDM_SAMPLERS for ``--full-samplers``.
SAMPLER_KEYS = dict(zip(("ddim100", "ddim150", "dpm20"), LDM_SAMPLERS))
#: The SR batch of the cascade: Pipeline calls the Upscaler with its default batch size.
SR_BATCH = inspect.signature(Upscaler.__call__).parameters["batch_size"].default


def _pipeline(preset: str, device: torch.device, bf16: bool, sr_size: int = SR_SIZE) -> Pipeline:
    unet_config, ae_config, size, sr_config = PRESETS[preset]
    dtype = torch.bfloat16 if bf16 else None
    torch.manual_seed(0)
    ldm = LatentDiffusion(UNetModel(unet_config), AutoencoderKL(ae_config)).eval()
    sr = SuperResolution(SRUNet(sr_config)).eval()
    upscaler = Upscaler(sr, size=sr_size, device=device, dtype=dtype)
    return Pipeline(
        ldm.to(device), image_size=size, device=str(device), dtype=dtype, upscaler=upscaler
    )


def ldm_calls(pipe: Pipeline, sampler: str, steps: int) -> int:
    """Network calls of the LDM sampler, as ``Pipeline`` counts them."""
    if sampler == "ddim":
        return len(pipe.schedule.ddim_timesteps(steps))
    return len(solver_timesteps(pipe.schedule.alphas_cumprod, steps))


def sr_calls(pipe: Pipeline, steps: int) -> int:
    assert pipe.upscaler is not None
    return len(pipe.upscaler.schedule.ddim_timesteps(steps))


def _timed(fn: Any, device: torch.device, repeats: int) -> float:
    """Mean seconds of ``repeats`` calls of ``fn`` after one untimed call."""
    with torch.no_grad():
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
    return (time.perf_counter() - start) / repeats


def parts(pipe: Pipeline, batch: int, device: torch.device, calls: int) -> dict[str, float]:
    """Per-call seconds of the LDM U-Net (batch ``batch``), the decode of the batch, and the SR
    U-Net at 1024 px (batch ``min(batch, SR_BATCH)``)."""
    upscaler = pipe.upscaler
    assert upscaler is not None
    bf16 = pipe.dtype == torch.bfloat16

    def under_autocast(fn: Any) -> Any:  # as Pipeline and Upscaler run their U-Nets
        def run() -> Any:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return fn()

        return run

    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(batch, *pipe.latent_shape, generator=generator).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    ldm_s = _timed(under_autocast(lambda: pipe.ldm.eps(latent, t)), device, calls)
    print(f"  LDM U-Net call: {ldm_s:.3f} s (batch {batch})", file=sys.stderr, flush=True)
    decode_s = _timed(lambda: pipe.ldm.decode_latents(latent), device, 1)
    print(f"  decode: {decode_s:.3f} s (batch {batch})", file=sys.stderr, flush=True)

    sr_batch = min(batch, SR_BATCH)
    low = torch.rand(sr_batch, 1, pipe.image_size, pipe.image_size, generator=generator)
    condition = sr_condition(low.to(device), upscaler.size)
    x = torch.randn(sr_batch, 1, upscaler.size, upscaler.size, generator=generator).to(device)
    t_sr = torch.full((sr_batch,), 1000, dtype=torch.long, device=device)
    sr_s = _timed(
        under_autocast(lambda: upscaler.sr.eps(x, t_sr, condition).float()), device, calls
    )
    print(f"  SR U-Net call: {sr_s:.3f} s (batch {sr_batch})", file=sys.stderr, flush=True)
    return {
        "ldm_call_s": ldm_s,
        "decode_s": decode_s,
        "sr_call_s": sr_s,
        "sr_batch": sr_batch,
        "sr_size": upscaler.size,
    }


def whole(
    pipe: Pipeline,
    batch: int,
    device: torch.device,
    ldm: tuple[str, int],
    sr_steps: int,
    repeats: int,
) -> dict[str, Any]:
    """``Pipeline`` run whole ``repeats`` times: median seconds (total, LDM part, SR part)."""
    sampler, steps = ldm
    runs = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        pipe(
            batch, steps=steps, sampler=sampler, batch_size=batch, sr_steps=sr_steps, progress=False
        )
        sync(device)
        total = time.perf_counter() - start
        run = pipe.last_run
        assert run is not None
        runs.append((total, run["seconds"], run["sr_seconds"]))
    total, ldm_s, sr_s = (statistics.median(column) for column in zip(*runs))
    return {
        "total_s": total,
        "ldm_s": ldm_s,
        "sr_s": sr_s,
        "ldm_calls": run["network_calls"],
        "sr_calls": run["sr_network_calls"],
        "image_size": run["image_size"],
    }


def measure(
    preset: str,
    batch: int,
    device: torch.device,
    bf16: bool,
    calls: int,
    whole_steps: tuple[int, int],
    full: bool,
    repeats: int,
    full_samplers: tuple[str, ...] = tuple(LDM_SAMPLERS),
    progress: Any = None,
    sr_size: int = SR_SIZE,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and parts of ``preset``; ``progress(rows so far, parts)`` after the parts and after
    each whole run (``--full`` runs whole only the LDM samplers of ``full_samplers``)."""
    pipe = _pipeline(preset, device, bf16, sr_size)
    assert pipe.upscaler is not None
    print(f"{preset}:", file=sys.stderr, flush=True)
    part = parts(pipe, batch, device, calls)
    base = {
        "preset": preset,
        "batch_size": batch,
        "sr_batch": part["sr_batch"],
        "image_size": pipe.upscaler.size,
        "ldm_image_size": pipe.image_size,
        "device": str(device),
        "precision": "bf16 autocast" if bf16 else "fp32",
    }

    def extrapolated(label: str, ldm_n: int, sr_n: int, sr_label: str) -> dict[str, Any]:
        ldm_s = (ldm_n * part["ldm_call_s"] + part["decode_s"]) / batch
        sr_s = sr_n * part["sr_call_s"] / part["sr_batch"]
        return {
            **base,
            "ldm_sampler": label,
            "ldm_calls": ldm_n,
            "sr_sampler": sr_label,
            "sr_calls": sr_n,
            "ldm_s_per_image": ldm_s,
            "sr_s_per_image": sr_s,
            "seconds_per_image": ldm_s + sr_s,
            "how": f"extrapolated from {calls} call{'s' * (calls != 1)}",
        }

    def measured(label: str, ldm: tuple[str, int], sr_steps: int, sr_label: str) -> dict:
        got = whole(pipe, batch, device, ldm, sr_steps, repeats)
        print(f"  whole {label} + {sr_label}: {got['total_s']:.1f} s", file=sys.stderr, flush=True)
        return {
            **base,
            "ldm_sampler": label,
            "ldm_calls": got["ldm_calls"],
            "sr_sampler": sr_label,
            "sr_calls": got["sr_calls"],
            "ldm_s_per_image": got["ldm_s"] / batch,
            "sr_s_per_image": got["sr_s"] / batch,
            "seconds_per_image": got["total_s"] / batch,
            "how": "measured" + (f", median of {repeats}" if repeats > 1 else ""),
        }

    rows = []
    sr_paper = f"DDIM-{DEFAULT_SR_STEPS} (official steps)"
    sr_n = sr_calls(pipe, DEFAULT_SR_STEPS)
    run_whole = preset == "tiny" or full
    if run_whole:  # warm-up: one small whole run
        with torch.no_grad():
            pipe(batch, steps=2, sampler="dpm", batch_size=batch, sr_steps=1, progress=False)
    if preset == "tiny":
        ldm_steps, sr_steps = whole_steps
        label, sr_label = f"DDIM-{ldm_steps}", f"DDIM-{sr_steps}"
        rows.append(measured(label, ("ddim", ldm_steps), sr_steps, sr_label))
        ldm_n = ldm_calls(pipe, "ddim", ldm_steps)
        rows.append(extrapolated(label, ldm_n, sr_calls(pipe, sr_steps), sr_label))
    params = {
        "ldm unet": count_parameters(pipe.ldm.unet),
        "autoencoder": count_parameters(pipe.ldm.autoencoder),
        "sr unet": count_parameters(pipe.upscaler.sr.unet),
    }
    detail = {"preset": preset, **part, "params": params}
    # The extrapolated rows need only the parts: made (and reported) before any whole run.
    extra = {
        label: extrapolated(label, ldm_calls(pipe, sampler, steps), sr_n, sr_paper)
        for label, (sampler, steps) in LDM_SAMPLERS.items()
    }

    def report() -> None:
        if progress:
            progress(rows + [row for row in extra.values() if row not in rows], detail)

    report()
    for label, (sampler, steps) in LDM_SAMPLERS.items():
        if full and label in full_samplers:
            rows.append(measured(label, (sampler, steps), DEFAULT_SR_STEPS, sr_paper))
            report()
        rows.append(extra[label])
    return rows, detail


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | LDM sampler | LDM calls | SR sampler | SR calls | batch (SR) | image | "
        "device | precision | LDM + decode s/image | SR s/image | total s/image | how |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['ldm_sampler']} | {r['ldm_calls']} | {r['sr_sampler']} | "
            f"{r['sr_calls']} | {r['batch_size']} ({r['sr_batch']}) | {r['ldm_image_size']} -> "
            f"{r['image_size']} | {r['device']} | {r['precision']} | "
            f"{seconds_text(r['ldm_s_per_image'])} | {seconds_text(r['sr_s_per_image'])} | "
            f"{seconds_text(r['seconds_per_image'])} | {r['how']} |"
        )
    return "\n".join(lines)


def _pair(text: str) -> tuple[int, int]:
    try:
        ldm, sr = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give LDM,SR DDIM steps as 20,10") from None
    if min(ldm, sr) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: steps must be at least 1")
    return ldm, sr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*PRESETS, *GROUPS], default="both")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 CPU, 16 GPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per U-Net (parts)")
    parser.add_argument(
        "--whole", type=_pair, default=(20, 10), help="tiny: LDM,SR DDIM steps run whole (20,10)"
    )
    parser.add_argument("--full", action="store_true", help="also run the paper settings whole")
    parser.add_argument(
        "--full-samplers",
        default=",".join(SAMPLER_KEYS),
        help="with --full: the LDM samplers run whole, of " + ",".join(SAMPLER_KEYS) + " (all)",
    )
    parser.add_argument(
        "--sr-size",
        type=int,
        default=SR_SIZE,
        help=f"SR output side (default {SR_SIZE}, the paper's; smaller only to test the script)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="whole runs, median")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.repeats < 1 or args.calls < 1:
        parser.error("--repeats and --calls must be at least 1")
    keys = [key.strip() for key in args.full_samplers.split(",") if key.strip()]
    unknown = [key for key in keys if key not in SAMPLER_KEYS]
    if unknown:
        parser.error(f"--full-samplers: unknown {unknown}; choose from {list(SAMPLER_KEYS)}")
    full_samplers = tuple(SAMPLER_KEYS[key] for key in keys)
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    batch = args.batch_size or (16 if device.type == "cuda" else 4)
    info = machine(device)
    rows: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []

    def save(got: list[dict[str, Any]], detail: dict[str, Any] | None, complete: bool) -> None:
        if args.json:  # after the parts and each whole run: a killed run keeps what it measured
            document = {
                "machine": info,
                "parts": details + ([detail] if detail else []),
                "results": rows + got,
                "complete": complete,
            }
            partial = args.json.with_name(args.json.name + ".part")
            partial.write_text(json.dumps(document, indent=2) + "\n")
            partial.replace(args.json)

    for preset in GROUPS.get(args.preset, [args.preset]):
        got, detail = measure(
            preset,
            batch,
            device,
            args.bf16,
            args.calls,
            args.whole,
            args.full,
            args.repeats,
            full_samplers,
            lambda got, detail: save(got, detail, False),
            args.sr_size,
        )
        rows += got
        details.append(detail)
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(markdown(rows))
    print()
    for d in details:
        params = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in d["params"].items())
        print(
            f"- {d['preset']}: parameters {params}; LDM U-Net call {d['ldm_call_s']:.3g} s at "
            f"batch {batch}, decode {d['decode_s']:.3g} s per batch, SR U-Net call "
            f"{d['sr_call_s']:.3g} s at batch {d['sr_batch']} ({d['sr_size']} px)."
        )
    print(
        f"\nMachine: {info['cpu']}, {info['cpus']} CPUs, {info['threads']} torch threads"
        f"{', GPU ' + info['gpu'] if 'gpu' in info else ''}; torch {info['torch']}. "
        f"Date: {info['date']}. Command: `{info['command']}`. Commit "
        f"`{info['code']['commit']}`. Load average {info['load_average_start']} -> "
        f"{info['load_average_end']}."
    )
    save([], None, True)


if __name__ == "__main__":
    main()
