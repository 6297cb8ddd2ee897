"""Sampling speed of the LDM: seconds per image for DDIM-150 and DPM-Solver++, unconditional or
report-conditioned with and without classifier-free guidance.

    python benchmarks/bench_sample.py [--preset tiny|paper|both|tiny-report|paper-report|report]
        [--guidance 1,3] [--batch-size N] [--device auto|cpu|cuda] [--bf16] [--calls N]
        [--full] [--repeats N] [--threads N] [--json FILE]

What a user waits for per image: ``Pipeline`` sampling with random weights of the preset's
sizes (the cost does not depend on the values), decoding included. ``tiny`` and
``tiny-report`` run the whole samplers (the median of ``--repeats`` runs, default 1). For
``paper`` and ``paper-report`` on a CPU a full DDIM-150 run takes tens of minutes, so the U-Net
is timed over ``--calls`` network calls (after one untimed call) and the decode once, and
seconds per image are ``calls x per-call + decode`` (+ the report encoder, below; marked
"extrapolated"); ``--full`` runs the samplers whole.

Report models (``tiny-report``, ``paper-report``: the U-Net with cross-attention and the text
encoder of ``cheff.config.SDM_PRESETS``, the released sizes for ``paper-report``: 518 M U-Net
parameters with context 1280, a 582 M-parameter encoder over 150 tokens; scale factor as the
preset) sample under ``prompt=``, one synthetic report per image
(``bench_train.synthetic_reports``, ~134 WordPiece tokens, over a synthetic 30522-line
vocabulary: the released embedding size), once per guidance scale of ``--guidance`` (default
1 and 3). ``w == 1`` runs the conditional branch only; ``w != 1`` runs the conditional and the
null branch as one U-Net batch of 2B per network call (about twice the U-Net work for the same
number of calls), and the encoder also encodes the null report. The encoder runs once per
batch of images, before the sampler; in the extrapolated rows its time (tokenisation and
encoder forward, measured once) is added.

DDIM-150 is the paper's setting: the official DDIM takes every (1000 // 150)-th step, i.e.
167 network calls; DPM-Solver++(2M) at 20 calls is the fast solver. On a GPU: bf16 autocast
for the U-Net with ``--bf16``, synchronised timing. ``--json`` is rewritten after every row
(``complete`` false until the end), so a run cut short keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import machine, synthetic_reports, synthetic_vocab  # noqa: E402

from cheff.conditioning import Conditioner  # noqa: E402
from cheff.config import PAPER, SDM_PRESETS, TINY, AutoencoderConfig  # noqa: E402
from cheff.diffusion import classifier_free, timesteps_for  # noqa: E402
from cheff.models import AutoencoderKL, LatentDiffusion, UNetConfig, UNetModel  # noqa: E402
from cheff.models.text_encoder import TextEncoder  # noqa: E402
from cheff.models.unet import PAPER as PAPER_UNET  # noqa: E402
from cheff.pipeline import Pipeline  # noqa: E402

SAMPLERS = {"DDIM-150 (official steps)": ("ddim", 150), "DPM-Solver++(2M), 20": ("dpm", 20)}
#: name -> (U-Net, autoencoder, image side, the report preset of cheff.config or None).
PRESETS = {
    "tiny": (
        UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)),
        AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),
        32,
        None,
    ),
    "paper": (PAPER_UNET, AutoencoderConfig(), 256, None),
    "tiny-report": (SDM_PRESETS["tiny-report"].model, TINY.autoencoder, 32, "tiny-report"),
    "paper-report": (SDM_PRESETS["paper-report"].model, PAPER.autoencoder, 256, "paper-report"),
}
GROUPS = {"both": ["tiny", "paper"], "report": ["tiny-report", "paper-report"]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pipeline(preset: str, device: torch.device, bf16: bool) -> Pipeline:
    unet_config, ae_config, size, report = PRESETS[preset]
    dtype = torch.bfloat16 if bf16 else None
    torch.manual_seed(0)
    if report is None:
        ldm = LatentDiffusion(UNetModel(unet_config), AutoencoderKL(ae_config)).eval()
        return Pipeline(ldm.to(device), image_size=size, device=str(device), dtype=dtype)
    config = SDM_PRESETS[report]
    encoder = config.condition.encoder
    assert encoder is not None  # a report preset has one
    with tempfile.TemporaryDirectory() as folder:
        vocab = synthetic_vocab(Path(folder))
        conditioner = Conditioner.create("report", str(vocab), max_length=encoder.max_seq_len)
    encoder = dataclasses.replace(encoder, vocab_size=conditioner.vocab_size)
    ldm = LatentDiffusion(
        UNetModel(unet_config),
        AutoencoderKL(ae_config),
        scale_factor=config.scale_factor,
        conditioning_key="crossattn",
        text_encoder=TextEncoder(encoder),
        condition="report",
    ).eval()
    return Pipeline(
        ldm.to(device), image_size=size, device=str(device), dtype=dtype, conditioner=conditioner
    )


def measure(
    preset: str,
    batch: int,
    device: torch.device,
    bf16: bool,
    calls: int,
    full: bool,
    guidance: tuple[float, ...],
    repeats: int = 1,
    rows: list[dict[str, Any]] | None = None,
    progress: Any = None,
):
    """Rows of ``preset``, appended to ``rows`` (``progress()`` called after each)."""
    pipe = _pipeline(preset, device, bf16)
    rows = [] if rows is None else rows
    whole = full or preset.startswith("tiny")
    report = PRESETS[preset][3] is not None
    prompts = synthetic_reports(batch) if report else None
    factor = pipe.ldm.autoencoder.config.downsampling
    latent = torch.randn(batch, 3, pipe.image_size // factor, pipe.image_size // factor)
    latent = latent.to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    for scale in guidance if report else (None,):
        condition = {} if scale is None else {"prompt": prompts, "guidance_scale": scale}
        encode = 0.0  # the report encoder's time, once per batch (extrapolated rows)
        with torch.no_grad():
            # warm-up
            pipe(batch, steps=2, sampler="dpm", batch_size=batch, progress=False, **condition)
            if not whole:
                eps = pipe.ldm.eps
                if scale is not None:  # as Pipeline does it: tokenise, encode, guide
                    assert pipe.conditioner is not None
                    sync(device)
                    start = time.perf_counter()
                    with autocast:
                        ids = pipe.conditioner.ids(prompts).to(device)
                        context = pipe.ldm.context(ids)
                        null = pipe.conditioner.null_ids(1).to(device)
                        null = pipe.ldm.context(null) if scale != 1.0 else context
                    sync(device)
                    encode = time.perf_counter() - start
                    eps = classifier_free(pipe.ldm.eps, context, null, scale)
                with autocast:
                    eps(latent, t)  # untimed: the first call of this batch shape
                sync(device)
                start = time.perf_counter()
                for _ in range(calls):
                    with autocast:
                        eps(latent, t)
                sync(device)
                per_call = (time.perf_counter() - start) / calls
                start = time.perf_counter()
                pipe.ldm.decode_latents(latent)
                sync(device)
                decode = time.perf_counter() - start
        for label, (sampler, steps) in SAMPLERS.items():
            network_calls = len(timesteps_for(steps)) if sampler == "ddim" else steps
            if whole:
                runs = []
                for _ in range(repeats):
                    sync(device)
                    start = time.perf_counter()
                    pipe(
                        batch,
                        steps=steps,
                        sampler=sampler,
                        batch_size=batch,
                        progress=False,
                        **condition,
                    )
                    sync(device)
                    runs.append(time.perf_counter() - start)
                seconds = statistics.median(runs)
                network_calls = pipe.last_run["network_calls"]
                how = "measured" + (f", median of {repeats}" if repeats > 1 else "")
            else:
                seconds = network_calls * per_call + decode + encode
                how = f"extrapolated from {calls} calls"
            rows.append(
                {
                    "preset": preset,
                    "sampler": label,
                    "guidance_scale": scale,
                    "unet_batch": batch if scale in (None, 1.0) else 2 * batch,
                    "network_calls": network_calls,
                    "batch_size": batch,
                    "image_size": pipe.image_size,
                    "device": str(device),
                    "precision": "bf16 autocast" if bf16 else "fp32",
                    "seconds_per_image": seconds / batch,
                    "how": how,
                    **({} if whole else {"per_call_s": per_call, "decode_s": decode}),
                    **({"encode_s": encode} if report and not whole else {}),
                }
            )
            if progress:
                progress()
        print(f"measured {preset} w={scale}", file=sys.stderr, flush=True)
    return rows


def seconds_text(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"  # 1,151, not 1.15e+03


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| preset | sampler | guidance w | network calls | batch | image | device | precision | "
        "s/image | how |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        scale = r.get("guidance_scale")
        w = "-" if scale is None else f"{scale:g} (U-Net batch {r['unet_batch']})"
        lines.append(
            f"| {r['preset']} | {r['sampler']} | {w} | {r['network_calls']} | {r['batch_size']} | "
            f"{r['image_size']} | {r['device']} | {r['precision']} | "
            f"{seconds_text(r['seconds_per_image'])} | {r['how']} |"
        )
    return "\n".join(lines)


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give guidance scales as 1,3") from None
    if not scales or min(scales) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: guidance scales must be >= 0")
    return scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=[*PRESETS, *GROUPS], default="both")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 CPU, 16 GPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--calls", type=int, default=3, help="timed U-Net calls (paper, CPU)")
    parser.add_argument("--full", action="store_true", help="run the paper samplers whole")
    parser.add_argument(
        "--guidance", type=_scales, default=(1.0, 3.0), help="report presets: scales w (1,3)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="whole runs, median (tiny)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.repeats < 1 or args.calls < 1:
        parser.error("--repeats and --calls must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    batch = args.batch_size or (16 if device.type == "cuda" else 4)
    info = machine(device)
    presets = GROUPS.get(args.preset, [args.preset])
    rows: list[dict[str, Any]] = []

    def save(complete: bool) -> None:  # after every row: a killed run keeps what it measured
        if args.json:
            document = {"machine": info, "results": rows, "complete": complete}
            partial = args.json.with_name(args.json.name + ".part")
            partial.write_text(json.dumps(document, indent=2) + "\n")
            partial.replace(args.json)

    for preset in presets:
        measure(
            preset,
            batch,
            device,
            args.bf16,
            args.calls,
            args.full,
            args.guidance,
            args.repeats,
            rows,
            lambda: save(False),
        )
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(markdown(rows))
    print(
        f"\nMachine: {info['cpu']}, {info['cpus']} CPUs, {info['threads']} torch threads"
        f"{', GPU ' + info['gpu'] if 'gpu' in info else ''}; torch {info['torch']}. "
        f"Date: {info['date']}. Command: `{info['command']}`. Commit "
        f"`{info['code']['commit']}`. Load average {info['load_average_start']} -> "
        f"{info['load_average_end']}."
    )
    save(True)


if __name__ == "__main__":
    main()
