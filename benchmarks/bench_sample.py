"""Sampling speed of the unconditional LDM: seconds per image for DDIM-150 and DPM-Solver++.

    python benchmarks/bench_sample.py [--preset tiny|paper|both] [--batch-size N]
        [--device auto|cpu|cuda] [--bf16] [--calls N] [--threads N] [--json FILE]

What a user waits for per image: ``Pipeline`` sampling with random weights of the preset's
sizes (the cost does not depend on the values), decoding included. ``tiny`` runs the whole
samplers. For ``paper`` on a CPU a full DDIM-150 run takes tens of minutes, so the U-Net is
timed over ``--calls`` network calls and the decode once, and seconds per image are
``calls x per-call + decode`` (marked "extrapolated"); ``--full`` runs the samplers whole.

DDIM-150 is the paper's setting: the official DDIM takes every (1000 // 150)-th step, i.e.
167 network calls; DPM-Solver++(2M) at 20 calls is the fast solver. On a GPU: bf16 autocast
for the U-Net with ``--bf16``, synchronised timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import machine  # noqa: E402

from cheff.config import AutoencoderConfig  # noqa: E402
from cheff.diffusion import timesteps_for  # noqa: E402
from cheff.models import AutoencoderKL, LatentDiffusion, UNetConfig, UNetModel  # noqa: E402
from cheff.models.unet import PAPER as PAPER_UNET  # noqa: E402
from cheff.pipeline import Pipeline  # noqa: E402

SAMPLERS = {"DDIM-150 (official steps)": ("ddim", 150), "DPM-Solver++(2M), 20": ("dpm", 20)}
PRESETS = {
    "tiny": (
        UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)),
        AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
        32,
    ),
    "paper": (PAPER_UNET, AutoencoderConfig(), 256),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pipeline(preset: str, device: torch.device, bf16: bool) -> Pipeline:
    unet_config, ae_config, size = PRESETS[preset]
    torch.manual_seed(0)
    ldm = LatentDiffusion(UNetModel(unet_config), AutoencoderKL(ae_config)).eval()
    dtype = torch.bfloat16 if bf16 else None
    return Pipeline(ldm.to(device), image_size=size, device=str(device), dtype=dtype)


def measure(preset: str, batch: int, device: torch.device, bf16: bool, calls: int, full: bool):
    pipe = _pipeline(preset, device, bf16)
    rows: list[dict[str, Any]] = []
    whole = full or preset == "tiny"
    factor = pipe.ldm.autoencoder.config.downsampling
    latent = torch.randn(batch, 3, pipe.image_size // factor, pipe.image_size // factor)
    latent = latent.to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    with torch.no_grad():
        pipe(batch, steps=2, sampler="dpm", batch_size=batch, progress=False)  # warm-up
        if not whole:
            autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                with autocast:
                    pipe.ldm.eps(latent, t)
            _sync(device)
            per_call = (time.perf_counter() - start) / calls
            start = time.perf_counter()
            pipe.ldm.decode_latents(latent)
            _sync(device)
            decode = time.perf_counter() - start
    for label, (sampler, steps) in SAMPLERS.items():
        network_calls = len(timesteps_for(steps)) if sampler == "ddim" else steps
        if whole:
            _sync(device)
            start = time.perf_counter()
            pipe(batch, steps=steps, sampler=sampler, batch_size=batch, progress=False)
            _sync(device)
            seconds = time.perf_counter() - start
            network_calls = pipe.last_run["network_calls"]
            how = "measured"
        else:
            seconds = network_calls * per_call + decode
            how = f"extrapolated from {calls} calls"
        rows.append(
            {
                "preset": preset,
                "sampler": label,
                "network_calls": network_calls,
                "batch_size": batch,
                "image_size": pipe.image_size,
                "device": str(device),
                "precision": "bf16 autocast" if bf16 else "fp32",
                "seconds_per_image": seconds / batch,
                "how": how,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | sampler | network calls | batch | image | device | precision | s/image | how |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['sampler']} | {r['network_calls']} | {r['batch_size']} | "
            f"{r['image_size']} | {r['device']} | {r['precision']} | "
            f"{r['seconds_per_image']:.3g} | {r['how']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "paper", "both"], default="both")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 CPU, 16 GPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--calls", type=int, default=3, help="timed U-Net calls (paper, CPU)")
    parser.add_argument("--full", action="store_true", help="run the paper samplers whole")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    batch = args.batch_size or (16 if device.type == "cuda" else 4)
    info = machine(device)
    presets = ["tiny", "paper"] if args.preset == "both" else [args.preset]
    rows = [
        row
        for preset in presets
        for row in measure(preset, batch, device, args.bf16, args.calls, args.full)
    ]
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(markdown(rows))
    print(
        f"\nMachine: {info['cpu']}, {info['cpus']} CPUs, {info['threads']} torch threads"
        f"{', GPU ' + info['gpu'] if 'gpu' in info else ''}; torch {info['torch']}. "
        f"Date: {info['date']}. Command: `{info['command']}`. Commit "
        f"`{info['code']['commit']}`. Load average {info['load_average_start']} -> "
        f"{info['load_average_end']}."
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
