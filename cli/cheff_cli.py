"""``cheff``: checkpoints, evaluation (training and sampling arrive with later issues).

Exit codes: 0 success, 2 bad usage or an unusable input (a checkpoint, a data folder).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cheff import __version__

app = typer.Typer(
    name="cheff",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Cheff: cascaded latent diffusion for chest X-rays.",
)
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models on a built MaCheX.")
app.add_typer(eval_app, name="eval")
train_app = typer.Typer(no_args_is_help=True, help="Train the Cheff models on a built MaCheX.")
app.add_typer(train_app, name="train")

stderr = Console(stderr=True, soft_wrap=True)
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout only.")]


def _fail(message: str) -> typer.Exit:
    stderr.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


@contextmanager
def _stopping_with_its_code() -> Iterator[None]:
    """A run stopped by a scheduler's signal (cheff.train.stopping) exits with the shell's
    code for that signal (143 for SIGTERM, 138 for SIGUSR1) after one line saying how to go
    on: a job script can requeue on it."""
    from cheff.train.stopping import TrainingStopped

    try:
        yield
    except TrainingStopped as stop:
        stderr.print(f"[yellow]stopped:[/] {stop}", highlight=False)
        raise typer.Exit(stop.exit_code) from None


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    logging.getLogger("cheff.train").setLevel(logging.INFO)  # what a run decided, and resumes


@app.command()
def version() -> None:
    """Print the cheff version."""
    typer.echo(__version__)


# The head split of an official LDM file: not stored in it, not readable off the shapes.
NumHeadChannels = Annotated[
    int | None,
    typer.Option(
        "--num-head-channels",
        help="Official LDM file: channels per attention head (not stored in the file; "
        "default 32, the released model's).",
    ),
]
NumHeads = Annotated[
    int | None,
    typer.Option(
        "--num-heads",
        help="Official report-model LDM file: attention heads (not stored in the file; "
        "default 8, the released model's).",
    ),
]


@app.command()
def convert(
    source: Annotated[
        Path, typer.Argument(help="An official checkpoint, e.g. cheff_autoencoder.pt")
    ],
    target: Annotated[Path, typer.Argument(help="Our checkpoint to write (.safetensors).")],
    kind: Annotated[
        str,
        typer.Option(
            help="What to take from the file: auto (the whole model it holds), autoencoder, "
            "ldm or sr."
        ),
    ] = "auto",
    num_head_channels: NumHeadChannels = None,
    num_heads: NumHeads = None,
) -> None:
    """Convert a released checkpoint into ours: safetensors weights plus the model config.

    The weights are checked against the model on the way (every key present, every shape
    right); training-only entries (the autoencoder's loss.*) are left behind. --kind auto
    converts the model the file holds (told from its keys); from a released LDM file,
    --kind autoencoder takes just its first_stage_model.
    """
    from cheff.checkpoints import CheckpointError, read_checkpoint, resolve_kind
    from cheff.checkpoints import convert as convert_file

    heads = {"num_head_channels": num_head_channels, "num_heads": num_heads}
    try:
        checkpoint = read_checkpoint(source)  # unpickled once, for the kind and the weights
        if kind == "auto":
            kind = resolve_kind(checkpoint)
            typer.echo(f"{source}: converting its {kind} (--kind auto)")
    except CheckpointError as error:
        raise _fail(str(error)) from None
    if kind != "ldm":
        if any(value is not None for value in heads.values()):
            raise _fail("--num-head-channels / --num-heads are for --kind ldm")
        heads = {}
    try:
        written = convert_file(checkpoint, target, kind=kind, **heads)
    except CheckpointError as error:
        raise _fail(str(error)) from None
    typer.echo(f"wrote {written}")


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Any checkpoint cheff reads.")],
    json_out: Json = False,
) -> None:
    """Say what a checkpoint holds: container, kind, config and tensor groups."""
    from cheff.checkpoints import CheckpointError, describe

    try:
        info = describe(checkpoint)
    except CheckpointError as error:
        raise _fail(str(error)) from None
    if json_out:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{info['path']}: {info['kind'] or 'unknown kind'} ({info['container']} file)")
    if info["config"]:
        typer.echo("config: " + json.dumps(info["config"], sort_keys=True))
    for name, group in info["groups"].items():
        typer.echo(f"  {name:<24} {group['entries']:>6} tensors {group['elements']:>14,} values")
    for key, value in info["metadata"].items():
        typer.echo(f"  {key}: {value}")


@eval_app.command("recon")
def eval_recon(
    data: Annotated[Path, typer.Option("--data", help="A built MaCheX folder (machex --out).")],
    ae: Annotated[
        Path | None,
        typer.Option("--ae", help="Autoencoder checkpoint (released or ours): ae and full."),
    ] = None,
    workflow: Annotated[
        str,
        typer.Option(
            "--workflow",
            help="ae (x -> E -> D at 256), sr (x_HR -> bicubic -> SR at 1024) or full "
            "(x_HR -> bicubic -> E -> D -> SR at 1024); sr and full run at the sizes an SR "
            "file trained by cheff records (released files: 256 -> 1024).",
        ),
    ] = "ae",
    sr: Annotated[
        Path | None, typer.Option("--sr", help="Super-resolution checkpoint: sr and full.")
    ] = None,
    sr_steps: Annotated[int, typer.Option("--sr-steps", help="SR DDIM steps (paper: 150).")] = 150,
    seed: Annotated[int, typer.Option(help="Seed of the SR noise (per held-out image).")] = 0,
    holdout: Annotated[
        str | None,
        typer.Option(help="Held-out set to evaluate on (default: the only one stored)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Folder for recon.json, the PNG and per-image rows."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 16,
    device: Annotated[
        str | None, typer.Option(help="cuda, cuda:1, cpu (default: cuda when available).")
    ] = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast (CUDA only).")] = False,
    limit: Annotated[
        int | None, typer.Option(help="Only the first N held-out images (a quick look).")
    ] = None,
    worst: Annotated[int, typer.Option(help="Rows in the worst-reconstructions PNG.")] = 16,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            help="ae workflow: the side to compare at (the paper's 256; another size is a "
            "quick look, e.g. a model trained at 32, and recon.json says so).",
        ),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="DataLoader workers.")] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: Json = False,
) -> None:
    """MSE, PSNR and SSIM of a Table 2 workflow on a held-out set, beside the paper's numbers.

    Protocol (also in the JSON): images in [0, 1], one channel (the mean of the decoder's
    three; SR's one), PSNR averaged per image, SSIM with an 11x11 Gaussian window (sigma 1.5).
    """
    from cheff.checkpoints import CheckpointError, load_autoencoder, load_sr
    from cheff.devices import resolve_device
    from cheff.eval.recon import (
        PAPER_TABLE2,
        WORKFLOWS,
        ReconOptions,
        evaluate_recon,
        evaluate_workflow,
        resolve_holdout,
        sizes_differ_from_paper,
        sr_sizes,
        sr_workflow,
        write_outputs,
    )

    if workflow not in WORKFLOWS:
        raise _fail(f"--workflow {workflow!r}: choose from {', '.join(WORKFLOWS)}")
    if workflow in ("ae", "full") and ae is None:
        raise _fail(f"--workflow {workflow} needs --ae CKPT (the autoencoder)")
    if workflow in ("sr", "full") and sr is None:
        raise _fail(f"--workflow {workflow} needs --sr CKPT (the super-resolution model)")
    if workflow != "ae" and image_size is not None:
        raise _fail(
            f"--image-size is for the ae workflow; {workflow} runs at the sizes the --sr file "
            "records (256 -> 1024 px for the released files)"
        )
    try:
        name = resolve_holdout(data, holdout)
        options = ReconOptions(
            batch_size=batch_size,
            device=device,
            bf16=bf16,
            worst=worst,
            limit=limit,
            num_workers=workers,
            image_size=image_size,
            progress=not quiet and not json_out,
        )
        if workflow == "ae":
            result = evaluate_recon(load_autoencoder(ae), data, name, options, checkpoint=ae)
        else:
            from cheff.upscale import Upscaler

            target = resolve_device(device)
            model = None if workflow == "sr" else load_autoencoder(ae).to(target)
            upscaler = Upscaler(load_sr(sr), device=target)
            high_size, low_size, sizes_from = sr_sizes(sr)  # after the load names a bad file
            run = sr_workflow(
                upscaler,
                model,
                image_size=high_size,
                low_size=low_size,
                steps=sr_steps,
                seed=seed,
                sizes_from=sizes_from,
            )
            files_used = {"ae": None if ae is None else str(ae), "sr": str(sr)}
            result = evaluate_workflow(run, data, name, options, checkpoint=files_used)
    except (CheckpointError, ValueError) as error:
        raise _fail(str(error)) from None
    default = f"recon-{name}" if workflow == "ae" else f"recon-{workflow}-{name}"
    files = write_outputs(result, out or Path(default))
    if json_out:
        typer.echo(json.dumps(json.loads(files["json"].read_text()), indent=2))
        return
    metrics = result.metrics
    paper = PAPER_TABLE2[workflow]
    rows = [("paper", paper)] if workflow == "ae" else [(f"paper {k}", v) for k, v in paper.items()]
    typer.echo(
        f"{workflow}: {result.n} images of {name!r}: MSE {metrics['mse']['mean']:.6f}, "
        f"PSNR {metrics['psnr']['mean']:.2f} dB, SSIM {metrics['ssim']['mean']:.4f}"
    )
    for label, row in rows:
        typer.echo(
            f"  {label}: MSE {row['mse']:.4f}, PSNR {row['psnr']:.2f}, SSIM {row['ssim']:.4f}"
        )
    differs = sizes_differ_from_paper(result.protocol, workflow)
    if differs is not None:
        typer.echo(
            f"  not the paper's Table 2 protocol ({differs}): the paper's numbers are not "
            "comparable"
        )
    for kind, path in files.items():
        typer.echo(f"  {kind}: {path}")


@eval_app.command("fid")
def eval_fid(
    real: Annotated[
        Path, typer.Option("--real", help="A built MaCheX (its held-out set) or an image folder.")
    ],
    fake: Annotated[Path, typer.Option("--fake", help="A folder of generated images.")],
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            "--inception-weights",
            help="pt_inception-2015-12-05-6726825d.pth (the standard FID Inception weights; "
            "fid.json records the file's SHA-256, and another file's scores are marked not "
            "comparable with published FIDs); with --extractor: that network's weights file.",
        ),
    ] = None,
    extractor: Annotated[
        str | None,
        typer.Option(
            "--extractor",
            help="Another feature network, e.g. for chest X-rays: package.module:function, "
            "called with the weights path, returning an nn.Module uint8 (N,3,H,W) -> (N,D).",
        ),
    ] = None,
    n: Annotated[int | None, typer.Option("--n", help="At most N images of each set.")] = None,
    holdout: Annotated[
        str | None, typer.Option(help="Held-out set of --real (default: the only one stored).")
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", help="Resolution of the real images (default: the fakes')."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    device: Annotated[str | None, typer.Option(help="cuda, cpu (default: cuda if any).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for fid.json (default: --fake).")
    ] = None,
    json_out: Json = False,
) -> None:
    """FID, KID, precision and recall of generated images (the paper: FID 11.58, KID 0.0099).

    Both sets go through the standard FID Inception (torch-fidelity's computation, no
    torchvision); the protocol is written into fid.json.
    """
    from cheff.checkpoints import CheckpointError
    from cheff.eval.fid import evaluate_fid, write_fid_json

    try:
        result = evaluate_fid(
            real,
            fake,
            inception_weights,
            extractor=extractor,
            n=n,
            holdout=holdout,
            image_size=image_size,
            batch_size=batch_size,
            device=device,
        )
    except (CheckpointError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    path = write_fid_json(result, out or fake)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    pr = (
        f"precision {result['precision']:.3f}, recall {result['recall']:.3f}"
        if result["precision"] is not None
        else "precision/recall need 4 images per set"
    )
    typer.echo(
        f"FID {result['fid']:.2f}, KID {result['kid_mean']:.4f} +- {result['kid_std']:.4f}, {pr} "
        f"({result['n_real']} real, {result['n_fake']} fake; paper: FID 11.58, KID 0.0099)"
    )
    if not result["comparable_with_published"]:
        typer.echo(f"  not comparable with published FIDs: {result['not_comparable_because']}")
    typer.echo(f"  json: {path}")


@eval_app.command("memorization")
def eval_memorization(
    real: Annotated[Path, typer.Option("--real", help="The built MaCheX the model trained on.")],
    fake: Annotated[Path, typer.Option("--fake", help="A folder of generated images.")],
    ae: Annotated[Path, typer.Option("--ae", help="Autoencoder checkpoint (the feature).")],
    holdout: Annotated[
        str | None,
        typer.Option(help="Held-out set to leave out of the search (default: the only one)."),
    ] = None,
    composition: Composition = None,
    k: Annotated[int, typer.Option("--k", help="Nearest training images per fake.")] = 5,
    pairs: Annotated[int, typer.Option(help="Closest pairs in closest_pairs.png.")] = 8,
    image_size: Annotated[
        int, typer.Option("--image-size", help="Side both sets are compared at (the AE's 256).")
    ] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    device: Annotated[str | None, typer.Option(help="cuda, cpu (default: cuda if any).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for the outputs (default: --fake).")
    ] = None,
) -> None:
    """For each generated image its nearest training images (AE latent, cosine distance).

    Writes neighbours.csv, memorization.json and closest_pairs.png (each fake beside its
    nearest training image, closest first): a copy of a training image shows at distance ~0.
    """
    from cheff.checkpoints import CheckpointError, load_autoencoder
    from cheff.devices import resolve_device
    from cheff.eval.memorization import ae_features, nearest_training_images, write_outputs

    try:
        excluded = _training_holdout(real, holdout)
        target = resolve_device(device)
        model = load_autoencoder(ae).to(target)
        result = nearest_training_images(
            ae_features(model),
            real,
            fake,
            exclude_holdout=excluded,
            composition=composition,
            k=k,
            image_size=image_size,
            batch_size=batch_size,
            device=target,
        )
        files = write_outputs(result, real, out or fake, pairs)
    except (CheckpointError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    nearest = result.summary()["nearest_distance"]
    typer.echo(
        f"{result.n_fake} fakes against {result.n_real} training images: nearest cosine "
        f"distance min {nearest['min']:.4f}, median {nearest['median']:.4f}, "
        f"{nearest['below_0.01']} below 0.01"
    )
    for name, path in files.items():
        typer.echo(f"  {name}: {path}")


TrainData = Annotated[
    Path, typer.Option("--data", help="A built MaCheX folder (machex --out), or latents (sdm).")
]
TrainRun = Annotated[
    Path,
    typer.Option(
        "--run",
        "--run-dir",
        help="Run folder: config, checkpoints, logs. Under torchrun write --run-dir (torchrun "
        "reads --run as its own --run-path).",
    ),
]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue the run from its last checkpoint.")
]
MaxSteps = Annotated[int | None, typer.Option("--max-steps")]
Epochs = Annotated[float | None, typer.Option("--epochs")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", "-b", help="Per device.")]
LearningRate = Annotated[float | None, typer.Option("--lr", help="Effective; never rescaled.")]
Sources = Annotated[str | None, typer.Option(help="Comma-separated sources (default: all).")]
Where = Annotated[str | None, typer.Option(help="A pandas query over the manifests.")]
Composition = Annotated[
    str | None,
    typer.Option(help="A named composition: paper-2023 is the paper's MaCheX (default: all)."),
]
Holdout = Annotated[
    str | None, typer.Option(help="Held-out set to exclude (default: the only one stored).")
]
TrainImageSize = Annotated[int | None, typer.Option("--image-size")]
Workers = Annotated[int | None, typer.Option("--workers", "-j")]
Device = Annotated[str | None, typer.Option(help="auto, cuda, cuda:1, mps, cpu.")]
Precision = Annotated[str | None, typer.Option(help="auto, bf16 or fp32.")]
Settings = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any config field, e.g. --set train.grad_clip=1.0."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def _loop_overrides(
    data: Path,
    *,
    max_steps: int | None,
    epochs: float | None,
    batch_size: int | None,
    lr: float | None,
    sources: str | None,
    where: str | None,
    holdout: str | None,
    image_size: int | None,
    workers: int | None,
    device: str | None,
    precision: str | None,
    machex: Path | None = None,
) -> dict[str, object]:
    """The options every ``cheff train`` command shares, as config overrides (``machex``:
    where a latents folder's MaCheX is now, for ``train sdm``)."""
    overrides = {
        "data.data": str(data),
        "train.max_steps": max_steps,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "train.lr": lr,
        "data.sources": sources,
        "data.where": where,
        "data.holdout": _training_holdout(data, holdout, machex),
        "data.machex": None if machex is None else str(machex),
        "data.image_size": image_size,
        "data.num_workers": workers,
        "train.device": device,
        "train.precision": precision,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if holdout is not None and holdout.lower() == "none":
        overrides["data.holdout"] = None
    if epochs is not None and max_steps is None:
        overrides["train.max_steps"] = None  # --epochs alone: the length comes from it
    return overrides


def _report_run(info, run: Path) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    typer.echo(
        f"trained {info.max_steps} steps on {info.device} ({info.precision}), effective batch "
        f"{info.effective_batch} ({info.batch_size} per device x {info.grad_accum} accumulated "
        f"x {info.world_size} devices), lr {info.lr:g}; checkpoints in {run / 'checkpoints'}"
    )


GradCheckpointing = Annotated[
    bool,
    typer.Option("--grad-checkpointing", help="Recompute activations in backward: less memory."),
]


@train_app.command("ae")
def train_ae(
    data: TrainData,
    run: TrainRun,
    preset: Annotated[str, typer.Option(help="paper or tiny (CPU, seconds).")] = "paper",
    resume: Resume = False,
    max_steps: MaxSteps = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: LearningRate = None,
    sources: Sources = None,
    where: Where = None,
    holdout: Holdout = None,
    image_size: TrainImageSize = None,
    workers: Workers = None,
    device: Device = None,
    precision: Precision = None,
    perceptual_weights: Annotated[
        Path | None,
        typer.Option(
            help="One file with both LPIPS halves, e.g. an official AE training checkpoint "
            "(loss.perceptual_loss.*); or give the two files below."
        ),
    ] = None,
    perceptual_vgg16: Annotated[
        Path | None, typer.Option(help="torchvision's ImageNet vgg16 weight file.")
    ] = None,
    perceptual_heads: Annotated[
        Path | None, typer.Option(help="LPIPS v0.1 linear layers (vgg.pth).")
    ] = None,
    settings: Settings = None,
    quiet: Quiet = False,
) -> None:
    """Train the KL autoencoder (L1 + LPIPS + KL + patch discriminator), as the paper.

    The resolved config is written to RUN/config.json; checkpoints to RUN/checkpoints/step-N/
    (weights as safetensors, optimiser/EMA/RNG/data state beside them); metrics to
    RUN/metrics.csv and RUN/tensorboard; reconstruction grids to RUN/images.
    """
    from cheff.config import apply_overrides, get_preset
    from cheff.train.ae import train_autoencoder
    from cheff.train.loop import TrainingError

    try:
        overrides = _loop_overrides(
            data,
            max_steps=max_steps,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            sources=sources,
            where=where,
            holdout=holdout,
            image_size=image_size,
            workers=workers,
            device=device,
            precision=precision,
        )
        for key, path in (
            ("loss.perceptual_vgg16", perceptual_vgg16 or perceptual_weights),
            ("loss.perceptual_heads", perceptual_heads or perceptual_weights),
        ):
            if path is not None:
                overrides[key] = str(path)
        overrides = _with_settings(overrides, settings)
        config = apply_overrides(get_preset(preset).train_ae, overrides)
        with _stopping_with_its_code():
            info, _ = train_autoencoder(config, run, resume=resume, progress=not quiet)
    except (TrainingError, ValueError) as error:
        raise _fail(str(error)) from None
    _report_run(info, run)


@train_app.command("sdm")
def train_sdm(
    data: TrainData,
    run: TrainRun,
    ae: Annotated[
        Path | None,
        typer.Option(
            "--ae",
            help="Autoencoder checkpoint (from latents.json when --data is a latents folder).",
        ),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            help="paper-uncond, paper-report (report-to-X-ray), paper-labels (14 findings), "
            "or their CPU-sized tiny, tiny-report, tiny-labels."
        ),
    ] = "paper-uncond",
    resume: Resume = False,
    max_steps: MaxSteps = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: LearningRate = None,
    sources: Sources = None,
    where: Where = None,
    holdout: Holdout = None,
    image_size: TrainImageSize = None,
    workers: Workers = None,
    device: Device = None,
    precision: Precision = None,
    vocab: Annotated[
        Path | None,
        typer.Option(
            "--vocab",
            help="Report models: the BERT-uncased vocab.txt (or a folder or cached hub name).",
        ),
    ] = None,
    report_text: Annotated[
        str | None,
        typer.Option(
            "--report-text",
            help="Report models: the reports-manifest text (text_v1, findings_impression, "
            "impression, findings, text; default text_v1, as the released model).",
        ),
    ] = None,
    cond_drop: Annotated[
        float | None,
        typer.Option(
            "--cond-drop",
            help="Conditioned models: probability a condition becomes the null one "
            "(classifier-free guidance; 0 = the paper).",
        ),
    ] = None,
    machex: Annotated[
        Path | None,
        typer.Option(
            "--machex",
            help="Latents: the MaCheX they were encoded from, where it is now (if it moved); "
            "its held-out sets, reports and labels are read there.",
        ),
    ] = None,
    grad_checkpointing: GradCheckpointing = False,
    settings: Settings = None,
    quiet: Quiet = False,
) -> None:
    """Train the latent diffusion model (noise-prediction MSE, uniform t, EMA of the U-Net).

    Report and label models (--preset paper-report, paper-labels) train their condition
    encoder with the U-Net, on the images that have a report (or a stated finding).

    --data is a built MaCheX (encoded by the frozen autoencoder every step) or a latents
    folder from `cheff encode` (encoded once). Checkpoints hold the whole model
    (ldm.safetensors, and ldm-ema.safetensors with the EMA weights): `cheff sample --sdm` reads
    either. Grids of decoded DDIM samples go to RUN/images.
    """
    from cheff.config import apply_overrides, get_sdm_preset
    from cheff.train.loop import TrainingError
    from cheff.train.sdm import train_sdm as run_training

    try:
        overrides = _loop_overrides(
            data,
            max_steps=max_steps,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            sources=sources,
            where=where,
            holdout=holdout,
            image_size=image_size,
            workers=workers,
            device=device,
            precision=precision,
            machex=machex,
        )
        if ae is not None:
            overrides["ae"] = str(ae)
        condition = {
            "condition.vocab": None if vocab is None else str(vocab),
            "condition.report_text": report_text,
            "condition.drop": cond_drop,
            "train.grad_checkpointing": True if grad_checkpointing else None,
        }
        overrides |= {key: value for key, value in condition.items() if value is not None}
        overrides = _with_settings(overrides, settings)
        config = apply_overrides(get_sdm_preset(preset), overrides)
        _check_latent_side(data, image_size)
        with _stopping_with_its_code():
            info, _ = run_training(config, run, resume=resume, progress=not quiet)
    except (TrainingError, ValueError) as error:
        raise _fail(str(error)) from None
    _report_run(info, run)


def _check_latent_side(data: Path, image_size: int | None) -> None:
    """Latents come at the side they were encoded at: another --image-size would be ignored."""
    from cheff.latents import is_latents, read_info

    if image_size is None or not is_latents(data):
        return
    encoded = int(read_info(data)["image_size"])
    if encoded != image_size:
        raise ValueError(
            f"--image-size {image_size}: the latents in {data} were encoded from {encoded} px "
            f"images; leave --image-size out, or encode again with --image-size {image_size}"
        )


@train_app.command("sr")
def train_sr(
    data: TrainData,
    run: TrainRun,
    preset: Annotated[str, typer.Option(help="paper (256 -> 1024) or tiny (16 -> 64, CPU).")] = (
        "paper"
    ),
    finetune_from: Annotated[
        Path | None,
        typer.Option(
            "--finetune-from",
            help="Start from this SR model (e.g. your base run's sr.safetensors, or "
            "cheff_sr_base.pt); with the paper preset: 500k steps at 2e-5 unless set.",
        ),
    ] = None,
    ae: Annotated[
        Path | None,
        typer.Option(
            "--ae", help="Fine-tune on D(E(x_LR)) through this autoencoder (the cascade's input)."
        ),
    ] = None,
    resume: Resume = False,
    max_steps: MaxSteps = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: LearningRate = None,
    sources: Sources = None,
    where: Where = None,
    holdout: Holdout = None,
    image_size: TrainImageSize = None,
    workers: Workers = None,
    device: Device = None,
    precision: Precision = None,
    grad_checkpointing: GradCheckpointing = False,
    settings: Settings = None,
    quiet: Quiet = False,
) -> None:
    """Train the super-resolution model (SR3-style noise prediction on 256 -> 1024 pairs).

    Base: inputs made by resizing each MaCheX image to 256 px. Fine-tuning (--finetune-from
    BASE --ae AE): inputs are the autoencoder's reconstructions, as in the cascade.
    Checkpoints hold sr.safetensors: `cheff sample --cascade --sr` and `cheff upscale` read it.
    """
    from cheff.config import SR_FINETUNE, apply_overrides, get_preset
    from cheff.train.loop import TrainingError
    from cheff.train.sr import train_sr as run_training

    try:
        overrides: dict[str, object] = {}
        if finetune_from is not None:
            overrides |= SR_FINETUNE.get(preset, {})
            overrides["finetune_from"] = str(finetune_from)
        overrides |= _loop_overrides(
            data,
            max_steps=max_steps,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            sources=sources,
            where=where,
            holdout=holdout,
            image_size=image_size,
            workers=workers,
            device=device,
            precision=precision,
        )
        if ae is not None:
            overrides["ae"] = str(ae)
        if grad_checkpointing:
            overrides["train.grad_checkpointing"] = True
        overrides = _with_settings(overrides, settings)
        config = apply_overrides(get_preset(preset).train_sr, overrides)
        with _stopping_with_its_code():
            info, _ = run_training(config, run, resume=resume, progress=not quiet)
    except (TrainingError, ValueError) as error:
        raise _fail(str(error)) from None
    _report_run(info, run)


@app.command()
def encode(
    ae: Annotated[Path, typer.Option("--ae", help="Autoencoder checkpoint (released or ours).")],
    data: Annotated[Path, typer.Option("--data", help="A built MaCheX folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The latents folder to write.")],
    holdout: Holdout = None,
    sources: Sources = None,
    where: Where = None,
    composition: Composition = None,
    image_size: Annotated[int, typer.Option("--image-size")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    shard_size: Annotated[int, typer.Option("--shard-size")] = 1000,
    workers: Annotated[int, typer.Option("--workers", "-j")] = 4,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """Encode a MaCheX once into autoencoder latents (posterior mean and log-variance, float16
    WebDataset shards with the same keys), so latent diffusion training skips the encoder.
    Run the same command again to resume an interrupted encoding."""
    from cheff.checkpoints import CheckpointError
    from cheff.latents import encode_collection, read_info
    from cheff.train.loop import TrainingError  # e.g. a --device that is not there

    try:
        excluded = _training_holdout(data, holdout)
        folder = encode_collection(
            ae,
            data,
            out,
            image_size=image_size,
            batch_size=batch_size,
            device=device,
            sources=sources.split(",") if sources else None,
            where=where,
            composition=composition,
            exclude_holdout=excluded,
            shard_size=shard_size,
            num_workers=workers,
            progress=not quiet,
        )
    except (CheckpointError, TrainingError, ValueError) as error:
        raise _fail(str(error)) from None
    info = read_info(folder)
    typer.echo(
        f"{info['count']} latents {tuple(info['latent_shape'])} in {folder} "
        f"(latent std {info['latent_std']:.4f}; training uses scale factor {info['scale_factor']})"
    )


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _with_settings(overrides: dict[str, object], settings: list[str] | None) -> dict[str, object]:
    """The shared options with the ``--set`` pairs over them. ``train.epochs`` set without a
    step count (no ``--max-steps``, no ``train.max_steps``) gives the run its length, as
    ``--epochs`` does: the sdm and sr presets set ``max_steps``, which would win silently."""
    pairs = _settings(settings or [])
    given_steps = "train.max_steps" in pairs or overrides.get("train.max_steps") is not None
    if "train.epochs" in pairs and not given_steps:
        pairs["train.max_steps"] = None
    return overrides | pairs


def _settings(settings: list[str]) -> dict[str, object]:
    """``--set key=value`` pairs as overrides (converted to each field's type later)."""
    overrides: dict[str, object] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise ValueError(f"--set {setting!r}: expected key=value, e.g. train.lr=1e-4")
        overrides[key.strip()] = value.strip()
    return overrides


def _training_holdout(data: Path, name: str | None, machex: Path | None = None) -> str | None:
    """The held-out set a training run leaves out: the one named, else the only one stored.
    Latents: of the MaCheX they were encoded from (``machex``: where it is now)."""
    from cheff.eval.recon import resolve_holdout
    from cheff.latents import is_latents, read_info, source_collection
    from machex.holdout import list_holdouts

    none = name is not None and name.lower() == "none"  # --holdout none: leave nothing out
    if is_latents(data):
        info = read_info(data)
        if none:
            return None
        try:
            data = source_collection(info, machex)
        except ValueError:
            # Not there: fine when the set was left out when encoding (nothing to read), else
            # an error (it let the held-out images into training without a word).
            encoded_without = info.get("exclude_holdout") or []
            if machex is None and encoded_without and (name is None or name in encoded_without):
                return name or encoded_without[0]
            raise
    elif machex is not None:
        raise ValueError(f"--machex is for a latents folder; {data} holds none")
    if none:
        return None
    if not (data / "manifests").is_dir():  # not a built collection: the data step says so
        return name
    if name is None and not list_holdouts(data):
        stderr.print(
            f"[yellow]warning:[/] {data} has no held-out set: every image is used, so "
            "`cheff eval` will have no unseen images (see `machex holdout`)",
            highlight=False,
        )
        return None
    chosen = resolve_holdout(data, name)  # the evaluation's rule: named, or the only one
    stderr.print(f"leaving out the held-out set {chosen!r}", highlight=False)
    return chosen


SamplerName = Annotated[
    str,
    typer.Option(
        "--sampler",
        help="ddim (official), ddpm (every step of the model's schedule: 1000 for the paper's "
        "LDMs) or dpm (DPM-Solver++).",
    ),
]


ImageSize = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        help="Image side in pixels (default: the side our trained file was trained at; 256 for "
        "the released models).",
    ),
]


Prompt = Annotated[
    str | None,
    typer.Option("--prompt", help="Report text for every image (report models)."),
]
Prompts = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="A text file of reports, one per line: one image each (--n is the line count).",
    ),
]
LabelsOption = Annotated[
    str | None,
    typer.Option(
        "--labels",
        help='Findings for every image (label models), e.g. "Cardiomegaly=1,Pleural Effusion=1"'
        " (1 positive, 0 negative, -1 uncertain; unnamed findings: not mentioned).",
    ),
]
GuidanceScale = Annotated[
    float,
    typer.Option(
        "--guidance-scale",
        "-w",
        help="Classifier-free guidance w: eps(null) + w (eps(cond) - eps(null)); 1 = plain "
        "conditional sampling (models trained with --cond-drop > 0 make use of w > 1).",
    ),
]
Vocab = Annotated[
    Path | None,
    typer.Option(
        "--vocab",
        help="BERT-uncased vocab.txt (or a folder holding it) for report models; our trained "
        "files carry their own, the released t2i model needs bert-base-uncased's.",
    ),
]


SRCheckpoint = Annotated[
    Path | None,
    typer.Option("--sr", help="Super-resolution checkpoint (cheff_sr_fine.pt or ours)."),
]
Cascade = Annotated[
    bool,
    typer.Option(
        "--cascade", help="The full cascade: LDM -> decode -> glue -> SR to 1024 px (needs --sr)."
    ),
]
SRSteps = Annotated[
    int, typer.Option("--sr-steps", help="SR DDIM steps (the paper: 150; official rule T//S).")
]
SREta = Annotated[float, typer.Option("--sr-eta", help="SR DDIM eta (the official default 0).")]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace an earlier run's images of the same numbers in --out."
    ),
]


def _pipeline(
    sdm: Path,
    ae: Path | None,
    device: str | None,
    bf16: bool,
    use_ema: bool,
    size: int | None,
    vocab: Path | None = None,
    sr: Path | None = None,
    cascade: bool = False,
    num_head_channels: int | None = None,
    num_heads: int | None = None,
):
    import torch

    from cheff.pipeline import Pipeline

    if cascade and sr is None:
        raise ValueError("--cascade needs --sr CKPT (the super-resolution model)")
    if sr is not None and not cascade:
        raise ValueError("--sr is used by the cascade: add --cascade")
    dtype = torch.bfloat16 if bf16 else None
    return Pipeline.from_checkpoints(
        sdm,
        ae,
        sr,
        device=device,
        dtype=dtype,
        use_ema=use_ema,
        image_size=size,
        vocab=vocab,
        num_head_channels=num_head_channels,
        num_heads=num_heads,
    )


GRID_MAX = 64  # images in grid.png: a preview, not a 12,500-image mosaic


def _out_folder(out: Path) -> Path:
    """Create ``--out`` before any sampling, so a bad folder fails in a second, not after
    an hour of work (``FolderError`` is a ``ValueError``)."""
    from machex.folders import make_folder

    make_folder(out, "--out")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: not writable")
    return out


def _fresh_names(out: Path, prefix: str, start: int, n: int, overwrite: bool) -> None:
    """Refuse a run whose PNGs or record would replace an earlier run's in ``--out``: two runs
    half mixed in one folder, with a record of only the last, cannot be told apart."""
    if overwrite:
        return
    record = f"{prefix}_{start:05d}.json" if start else f"{prefix}.json"
    names = [f"{prefix}_{i:05d}.png" for i in range(start, start + n)]
    taken = [name for name in [*names, record] if (out / name).exists()]
    if taken:
        more = f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        raise ValueError(
            f"--out {out} already holds {', '.join(taken[:3])}{more} from an earlier run; "
            "give another --out, --start past them, or --overwrite"
        )


@contextmanager
def _keeping_finished(stopped: Callable[[str], str]) -> Iterator[None]:
    """A long run stopped by Ctrl-C (exit 130) or an error (exit 2): one line that says what
    ``stopped(why)`` reports (the finished images, how to finish), never a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        stderr.print(stopped("interrupted"), highlight=False)
        raise typer.Exit(130) from None
    except (ValueError, OSError) as error:  # CheckpointError, ConditionError are ValueErrors
        raise _fail(stopped(str(error))) from None


class _RunWriter:
    """Writes a sampling run batch by batch (``Pipeline``'s ``on_batch``): the PNGs with their
    provenance and a cascade's LDM stage in OUT/SIDE/ (OUT/256/ at the paper's size) as each
    batch finishes, so an interrupted run keeps its finished images; then grid.png (the first
    GRID_MAX images) and PREFIX.json (the run record plus ``extra``)."""

    def __init__(self, pipe, out: Path, prefix: str, chunks: dict[str, str] | None = None) -> None:
        self.pipe, self.out, self.prefix = pipe, out, prefix
        self.chunks = dict(chunks or {})  # more provenance for every image (inpaint's inputs)
        self.paths: list[Path] = []
        self._grid: list = []

    def __call__(self, offset: int, samples) -> None:
        from cheff.pipeline import save_images

        first = int(self.pipe.last_run.get("start", 0)) + offset
        count = samples.images.shape[0]
        text = [c | self.chunks for c in self.pipe.image_text(range(offset, offset + count))]
        if samples.low_res is not None:
            side = samples.low_res.shape[-1]  # 256 at the paper's size
            stage = {"cheff:stage": f"{side} px before super-resolution"}
            stage["cheff:image_size"] = str(side)  # the run's is the SR output's
            low_text = [chunks | stage for chunks in text]
            low_out = self.out / str(side)
            save_images(samples.low_res, low_out, self.prefix, text=low_text, start=first)
        self.paths += save_images(samples.images, self.out, self.prefix, text=text, start=first)
        room = GRID_MAX - sum(len(images) for images in self._grid)
        if room > 0:
            self._grid.append(samples.images[:room])

    def finish(self, extra: dict[str, object]) -> None:
        import torch

        from cheff.pipeline import save_grid

        first = int(self.pipe.last_run.get("start", 0))
        grid = self.out / (f"grid_{first:05d}.png" if first else "grid.png")
        save_grid(torch.cat(self._grid), grid)
        info = dict(self.pipe.last_run) | extra
        record = f"{self.prefix}_{first:05d}.json" if first else f"{self.prefix}.json"
        (self.out / record).write_text(json.dumps(info, indent=2, default=str) + "\n")

    def stopped(self, why: str, rerun: str | None) -> str:
        """What an interrupted run leaves, and how to finish it (images depend only on the
        seed and their number, so the rest can be sampled apart)."""
        done = f"{len(self.paths)} finished images are in {self.out}"
        return f"{why}; {done}" + (f"; {rerun}" if rerun and self.paths else "")


def _prompt_lines(prompts: Path) -> list[str]:
    """The lines of a --prompts file as an editor numbers them: UTF-8 (a byte-order mark
    dropped), split at line ends only (``str.splitlines`` also splits at U+2028, form feeds
    and the like, which a pasted report may hold)."""
    try:
        text = prompts.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{prompts}: not UTF-8 text ({error}); save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _line_of_prompt(prompts: Path, count: int) -> int:
    """The line number of the ``count``-th prompt of a --prompts file (1-based)."""
    numbers = [number for number, line in enumerate(_prompt_lines(prompts), 1) if line.strip()]
    return numbers[count - 1] if 0 < count <= len(numbers) else 0


def _condition_args(
    prompt: str | None, prompts: Path | None, labels: str | None
) -> dict[str, object]:
    """--prompt / --prompts / --labels as the pipeline's prompt= / labels= (at most one)."""
    options = (("--prompt", prompt), ("--prompts", prompts), ("--labels", labels))
    given = [name for name, value in options if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one of --prompt, --prompts and --labels, not {' and '.join(given)}")
    if prompts is not None:
        texts = [line.strip() for line in _prompt_lines(prompts) if line.strip()]
        if not texts:
            raise ValueError(f"{prompts}: no report text (one per line)")
        return {"prompt": texts}
    if prompt is not None:
        return {"prompt": prompt}
    if labels is not None:
        return {"labels": labels}
    return {}


@app.command()
def sample(
    sdm: Annotated[Path, typer.Option("--sdm", help="LDM checkpoint (released or ours).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs.")],
    ae: Annotated[
        Path | None, typer.Option("--ae", help="Autoencoder (default: the one in --sdm).")
    ] = None,
    n: Annotated[int, typer.Option("--n", help="Images to generate.")] = 16,
    steps: Annotated[
        int | None,
        typer.Option(help="Sampler steps (default: ddim 100, ddpm 1000, dpm 20)."),
    ] = None,
    sampler: SamplerName = "ddim",
    eta: Annotated[float, typer.Option(help="DDIM eta (the official default 1.0).")] = 1.0,
    exact_steps: Annotated[
        bool,
        typer.Option(help="Exactly --steps network calls (official DDIM: every T//S-th step)."),
    ] = False,
    seed: Annotated[int, typer.Option(help="Images depend only on the seed and index.")] = 0,
    start: Annotated[
        int,
        typer.Option(help="Number of the first image: split a run over devices by ranges."),
    ] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 16,
    device: Annotated[str | None, typer.Option(help="cuda, cpu (default: cuda if any).")] = None,
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast for the U-Net.")] = False,
    use_ema: Annotated[bool, typer.Option("--ema", help="The EMA weights of the U-Net.")] = False,
    image_size: ImageSize = None,
    prompt: Prompt = None,
    prompts: Prompts = None,
    labels: LabelsOption = None,
    guidance_scale: GuidanceScale = 1.0,
    vocab: Vocab = None,
    cascade: Cascade = False,
    sr: SRCheckpoint = None,
    sr_steps: SRSteps = 150,
    sr_eta: SREta = 0.0,
    num_head_channels: NumHeadChannels = None,
    num_heads: NumHeads = None,
    overwrite: Overwrite = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Generate chest X-rays: PNGs, grid.png and sample.json (settings, timing).

    256 px from the LDM, or 1024 px with --cascade --sr (the LDM's stage in OUT/256/, named
    by its side). A report model samples from --prompt (every image) or --prompts FILE (one
    image a line), a label model from --labels; --guidance-scale sets classifier-free
    guidance. Every PNG carries its provenance (cheff:* text chunks: synthetic, checkpoint
    hashes, seed, ...).
    """
    from cheff.checkpoints import CheckpointError
    from cheff.conditioning import ConditionError

    try:
        conditions = _condition_args(prompt, prompts, labels)
        if prompts is not None:
            n = len(conditions["prompt"])  # type: ignore[arg-type]
        _out_folder(out)
        heads = {"num_head_channels": num_head_channels, "num_heads": num_heads}
        pipe = _pipeline(sdm, ae, device, bf16, use_ema, image_size, vocab, sr, cascade, **heads)
        _fresh_names(out, "sample", start, n, overwrite)
    except (CheckpointError, ConditionError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    writer = _RunWriter(pipe, out, "sample")

    def rerun() -> str:
        done = len(writer.paths)
        if prompts is not None:
            last = _line_of_prompt(prompts, done)  # blank lines hold no prompt
            return f"to finish, delete lines 1-{last} of {prompts} and add --start {start + done}"
        return f"to finish, run again with --start {start + done} --n {n - done}"

    with _keeping_finished(lambda why: writer.stopped(why, rerun())):
        pipe(
            n,
            guidance_scale=guidance_scale,
            **conditions,  # type: ignore[arg-type]
            seed=seed,
            steps=steps,
            sampler=sampler,
            eta=eta,
            exact_steps=exact_steps,
            batch_size=batch_size,
            start=start,
            progress=not quiet,
            sr_steps=sr_steps,
            sr_eta=sr_eta,
            on_batch=writer,
        )
    files = {"sdm": str(sdm), "ae": _path(ae), "sr": _path(sr)}
    writer.finish(files | conditions)
    info = pipe.last_run
    typer.echo(
        f"{len(writer.paths)} images of {info['image_size']} px in {out} "
        f"({info['network_calls']} network calls each, {info['seconds']:.1f} s"
        + (f"; SR {info['sr_network_calls']} calls, {info['sr_seconds']:.1f} s)" if sr else ")")
    )


@app.command()
def inpaint(
    sdm: Annotated[Path, typer.Option("--sdm", help="LDM checkpoint (released or ours).")],
    image: Annotated[Path, typer.Option("--image", help="The radiograph (any size; 256 used).")],
    mask: Annotated[
        Path, typer.Option("--mask", help="White = keep, black = generate (see --invert-mask).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the results.")],
    ae: Annotated[Path | None, typer.Option("--ae")] = None,
    n: Annotated[int, typer.Option("--n", help="Variants to generate.")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 16,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 100,
    eta: Annotated[float, typer.Option(help="DDIM eta (the official default 1.0).")] = 1.0,
    paste_back: Annotated[
        bool,
        typer.Option(help="Keep the encoded input exactly where the mask keeps (official: no)."),
    ] = True,
    invert_mask: Annotated[bool, typer.Option(help="Black = keep instead.")] = False,
    scaled_known: Annotated[
        bool,
        typer.Option(
            help="Blend the input's latent in the model's scale at each step (official: "
            "unscaled, a quirk on the report model, whose scale factor is 0.18215)."
        ),
    ] = False,
    exact_steps: Annotated[bool, typer.Option(help="Exactly --steps network calls.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str | None, typer.Option()] = None,
    bf16: Annotated[bool, typer.Option("--bf16")] = False,
    use_ema: Annotated[bool, typer.Option("--ema", help="The EMA weights of the U-Net.")] = False,
    image_size: ImageSize = None,
    prompt: Prompt = None,
    labels: LabelsOption = None,
    guidance_scale: GuidanceScale = 1.0,
    vocab: Vocab = None,
    cascade: Cascade = False,
    sr: SRCheckpoint = None,
    sr_steps: SRSteps = 150,
    sr_eta: SREta = 0.0,
    num_head_channels: NumHeadChannels = None,
    num_heads: NumHeads = None,
    overwrite: Overwrite = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """In- and out-painting: regenerate the masked part of a radiograph (e.g. a support device).

    Conditioned models take --prompt or --labels (and --guidance-scale) as `cheff sample`;
    --cascade --sr gives the result at 1024 px, as the paper's figures."""
    from cheff.checkpoints import CheckpointError
    from cheff.conditioning import ConditionError
    from cheff.pipeline import load_image, load_mask

    try:
        conditions = _condition_args(prompt, None, labels)
        _same_shape(image, mask)
        _out_folder(out)
        heads = {"num_head_channels": num_head_channels, "num_heads": num_heads}
        pipe = _pipeline(sdm, ae, device, bf16, use_ema, image_size, vocab, sr, cascade, **heads)
        _fresh_names(out, "inpaint", 0, n, overwrite)
        side = pipe.image_size  # the model's, unless --image-size
        picture = load_image(image, side).expand(n, -1, -1, -1)
        keep = load_mask(mask, side, invert=invert_mask).expand(n, -1, -1, -1)
    except (CheckpointError, ConditionError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    inputs = {"cheff:source_image": str(image), "cheff:mask": str(mask)}
    writer = _RunWriter(pipe, out, "inpaint", inputs)
    with _keeping_finished(lambda why: writer.stopped(why, None)):
        pipe.inpaint(
            picture,
            keep,
            seed=seed,
            steps=steps,
            eta=eta,
            paste_back=paste_back,
            scaled_known=scaled_known,
            exact_steps=exact_steps,
            batch_size=batch_size,
            progress=not quiet,
            guidance_scale=guidance_scale,
            **conditions,  # type: ignore[arg-type]
            sr_steps=sr_steps,
            sr_eta=sr_eta,
            on_batch=writer,
        )
    files = {"sdm": str(sdm), "ae": _path(ae), "sr": _path(sr), "image": str(image)}
    writer.finish(files | {"mask": str(mask)} | conditions)
    typer.echo(f"{len(writer.paths)} images of {pipe.last_run['image_size']} px in {out}")


def _same_shape(image: Path, mask: Path) -> None:
    """The mask must be drawn on the image (same aspect ratio) or on its centre square (a
    square mask): both are centre-cropped and resized on their own, so any other mask would
    land elsewhere than drawn."""
    from PIL import Image, UnidentifiedImageError

    sizes = []
    for path in (image, mask):
        try:
            with Image.open(path) as opened:
                sizes.append(opened.size)
        except UnidentifiedImageError:
            raise ValueError(f"{path}: not an image file") from None
    (width, height), (mask_width, mask_height) = sizes
    if width * mask_height != height * mask_width and mask_width != mask_height:
        raise ValueError(
            f"--mask {mask} is {mask_width}x{mask_height} but --image {image} is "
            f"{width}x{height}: draw the mask on the image (the same aspect ratio) or on "
            "its centre square (a square mask)"
        )


@app.command()
def upscale(
    images: Annotated[list[Path], typer.Argument(help="256 px images (PNG, JPEG, ...).")],
    sr: Annotated[Path, typer.Option("--sr", help="Super-resolution checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the 1024 px PNGs.")],
    steps: Annotated[int, typer.Option(help="DDIM steps (the paper: 150).")] = 150,
    eta: Annotated[float, typer.Option(help="DDIM eta (the official default 0).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Image i uses the seed's 'sr' stream i.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 4,
    size: Annotated[
        int | None,
        typer.Option("--size", help="Output side (default: the model's, 1024 if released)."),
    ] = None,
    device: Annotated[str | None, typer.Option()] = None,
    bf16: Annotated[bool, typer.Option("--bf16")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Super-resolve existing images to 1024 px with the SR model (as the cascade's last stage).

    Each input is read grey, centre-cropped to a square and resized to the model's input side
    (256 px; our trained files record theirs); outputs keep the input's name (NAME.png) and
    carry their provenance (cheff:* PNG text chunks)."""
    import torch

    from cheff.checkpoints import CheckpointError
    from cheff.models.sr import LR_SIZE
    from cheff.pipeline import load_image, save_images
    from cheff.provenance import checkpoint_hashes, image_text
    from cheff.upscale import Upscaler

    names = [path.stem for path in images]
    if len(set(names)) != len(names):
        raise _fail("two inputs share a file name; the outputs would overwrite each other")
    replaced = [p for p in images if (out / f"{p.stem}.png").resolve() == p.resolve()]
    if replaced:  # --out the inputs' own folder: the 256 px originals would be lost
        raise _fail(
            f"--out {out} would replace the input {replaced[0]}"
            + (f" and {len(replaced) - 1} more" if len(replaced) > 1 else "")
            + " with its upscaled image; give another --out"
        )
    try:
        _out_folder(out)
        dtype = torch.bfloat16 if bf16 else None
        upscaler = Upscaler.from_checkpoint(sr, size=size, device=device, dtype=dtype)
        low_size = upscaler.low_size or LR_SIZE  # the released file at another --size: 256
        low = torch.cat([load_image(path, low_size) for path in images])
    except (CheckpointError, ValueError, OSError) as error:
        raise _fail(str(error)) from None
    hashes = checkpoint_hashes({"sr": sr})
    written: list[Path] = []

    def write(first: int, high: torch.Tensor) -> None:  # each batch as it finishes
        run = dict(upscaler.last_run or {}) | {"task": "upscale", "seed": seed}
        rows = range(first, first + high.shape[0])
        text = [
            image_text(run, k, None, hashes | {"cheff:source_image": str(images[k])}) for k in rows
        ]
        written.extend(save_images(high, out, text=text, names=[names[k] for k in rows]))

    def stopped(why: str) -> str:
        return f"{why}; {len(written)} of {len(images)} images are in {out}"

    with _keeping_finished(stopped):
        upscaler(
            low,
            seed=seed,
            steps=steps,
            eta=eta,
            batch_size=batch_size,
            progress=not quiet,
            on_batch=write,
        )
    run = dict(upscaler.last_run or {}) | {"task": "upscale", "seed": seed}
    (out / "upscale.json").write_text(
        json.dumps(run | {"sr": str(sr), "images": [str(p) for p in images]}, indent=2) + "\n"
    )
    typer.echo(f"{len(images)} images of {upscaler.size} px in {out} ({run['sr_seconds']:.1f} s)")


weights_app = typer.Typer(help="The weights files cheff can use.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("verify")
def weights_verify(
    folder: Annotated[Path, typer.Argument(help="The folder holding the weights files.")],
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Check only these file names.")
    ] = None,
) -> None:
    """Check a folder against docs/weights.md: each known file loaded with its loader and
    compared with the released layout; missing files and their sources are listed.
    Exit 0 when every file checked is present and right, 1 otherwise."""
    from cheff.weights import verify

    try:
        results = verify(folder, only)
    except ValueError as error:
        raise _fail(str(error)) from None
    for result in results:
        mark = "ok     " if result.ok else ("missing" if result.path is None else "FAILED ")
        typer.echo(f"{mark} {result.file.name:40} {result.detail}")
        if result.sha256:
            typer.echo(f"        sha256 {result.sha256}")
    if not all(result.ok for result in results):
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
