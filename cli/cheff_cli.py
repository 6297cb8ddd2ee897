"""``cheff``: checkpoints, evaluation (training and sampling arrive with later issues).

Exit codes: 0 success, 2 bad usage or an unusable input (a checkpoint, a data folder).
"""

from __future__ import annotations

import json
import logging
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


@app.command()
def convert(
    source: Annotated[
        Path, typer.Argument(help="An official checkpoint, e.g. cheff_autoencoder.pt")
    ],
    target: Annotated[Path, typer.Argument(help="Our checkpoint to write (.safetensors).")],
    kind: Annotated[str, typer.Option(help="What to take from the file.")] = "autoencoder",
) -> None:
    """Convert a released checkpoint into ours: safetensors weights plus the model config.

    The weights are checked against the model on the way (every key present, every shape
    right); training-only entries (the autoencoder's loss.*) are left behind. From a released
    LDM file, --kind autoencoder takes its first_stage_model.
    """
    from cheff.checkpoints import CheckpointError
    from cheff.checkpoints import convert as convert_file

    try:
        written = convert_file(source, target, kind=kind)
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
    ae: Annotated[Path, typer.Option("--ae", help="Autoencoder checkpoint (released or ours).")],
    workflow: Annotated[
        str, typer.Option("--workflow", help="What to reconstruct through: ae (x -> E -> D).")
    ] = "ae",
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
    workers: Annotated[int, typer.Option("--workers", "-j", help="DataLoader workers.")] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: Json = False,
) -> None:
    """MSE, PSNR and SSIM of x -> E -> D at 256 px on a held-out set (the paper's Table 2).

    Protocol (also in the JSON): images in [0, 1], one channel (the mean of the decoder's
    three), PSNR averaged per image, SSIM with an 11x11 Gaussian window (sigma 1.5).
    """
    from cheff.checkpoints import CheckpointError, load_autoencoder
    from cheff.eval.recon import ReconOptions, evaluate_recon, resolve_holdout, write_outputs

    if workflow != "ae":
        raise _fail(f"--workflow {workflow!r}: only 'ae' is available in this release")
    try:
        name = resolve_holdout(data, holdout)
        options = ReconOptions(
            batch_size=batch_size,
            device=device,
            bf16=bf16,
            worst=worst,
            limit=limit,
            num_workers=workers,
            progress=not quiet and not json_out,
        )
        model = load_autoencoder(ae)
        result = evaluate_recon(model, data, name, options, checkpoint=ae)
    except (CheckpointError, ValueError) as error:
        raise _fail(str(error)) from None
    files = write_outputs(result, out or Path(f"recon-{name}"))
    if json_out:
        typer.echo(json.dumps(json.loads(files["json"].read_text()), indent=2))
        return
    metrics = result.metrics
    typer.echo(
        f"{result.n} images of {name!r}: MSE {metrics['mse']['mean']:.6f}, "
        f"PSNR {metrics['psnr']['mean']:.2f} dB, SSIM {metrics['ssim']['mean']:.4f} "
        f"(paper: MSE 0.0005, PSNR 36.80, SSIM 0.9926)"
    )
    for kind, path in files.items():
        typer.echo(f"  {kind}: {path}")


@train_app.command("ae")
def train_ae(
    data: Annotated[Path, typer.Option("--data", help="A built MaCheX folder (machex --out).")],
    run: Annotated[Path, typer.Option("--run", help="Run folder: config, checkpoints, logs.")],
    preset: Annotated[str, typer.Option(help="paper or tiny (CPU, seconds).")] = "paper",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run from its last checkpoint.")
    ] = False,
    max_steps: Annotated[int | None, typer.Option("--max-steps")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help="Per device.")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Effective; never rescaled.")] = None,
    sources: Annotated[
        str | None, typer.Option(help="Comma-separated sources (default: all built).")
    ] = None,
    where: Annotated[str | None, typer.Option(help="A pandas query over the manifests.")] = None,
    holdout: Annotated[
        str | None,
        typer.Option(help="Held-out set to exclude (default: the only one stored)."),
    ] = None,
    image_size: Annotated[int | None, typer.Option("--image-size")] = None,
    workers: Annotated[int | None, typer.Option("--workers", "-j")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cuda, cuda:1, mps, cpu.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, bf16 or fp32.")] = None,
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
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any config field, e.g. --set loss.disc_start=10001."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train the KL autoencoder (L1 + LPIPS + KL + patch discriminator), as the paper.

    The resolved config is written to RUN/config.json; checkpoints to RUN/checkpoints/step-N/
    (weights as safetensors, optimiser/EMA/RNG/data state beside them); metrics to
    RUN/metrics.csv and RUN/tensorboard; reconstruction grids to RUN/images.
    """
    from cheff.config import AETrainConfig, apply_overrides, get_preset
    from cheff.train.ae import train_autoencoder
    from cheff.train.loop import TrainingError

    try:
        config: AETrainConfig = get_preset(preset).train_ae
        overrides = _train_overrides(
            {
                "data.data": str(data),
                "train.max_steps": max_steps,
                "train.epochs": epochs,
                "train.batch_size": batch_size,
                "train.lr": lr,
                "data.sources": sources,
                "data.where": where,
                "data.holdout": _training_holdout(data, holdout),
                "data.image_size": image_size,
                "data.num_workers": workers,
                "train.device": device,
                "train.precision": precision,
                "loss.perceptual_vgg16": _path(perceptual_vgg16 or perceptual_weights),
                "loss.perceptual_heads": _path(perceptual_heads or perceptual_weights),
            },
            settings or [],
        )
        if epochs is not None and max_steps is None:
            overrides["train.max_steps"] = None
        config = apply_overrides(config, overrides)
        info, _ = train_autoencoder(config, run, resume=resume, progress=not quiet)
    except (TrainingError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(
        f"trained {info.max_steps} steps on {info.device} ({info.precision}), effective batch "
        f"{info.effective_batch}, lr {info.lr:g}; checkpoints in {run / 'checkpoints'}"
    )


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _train_overrides(options: dict[str, object], settings: list[str]) -> dict[str, object]:
    """Command-line options that were given, then ``--set key=value`` pairs."""
    overrides = {key: value for key, value in options.items() if value is not None}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise ValueError(f"--set {setting!r}: expected key=value, e.g. train.lr=1e-4")
        overrides[key.strip()] = value.strip()
    return overrides


def _training_holdout(data: Path, name: str | None) -> str | None:
    """The held-out set a training run leaves out: the one named, else the only one stored."""
    from machex.holdout import list_holdouts

    stored = list_holdouts(data) if (data / "manifests").is_dir() else []
    if name is not None:
        if name.lower() == "none":
            return None
        if name not in stored:
            raise ValueError(f"{data} has no held-out set {name!r}; stored: {stored or 'none'}")
        return name
    if len(stored) > 1:
        raise ValueError(
            f"{data} has several held-out sets ({', '.join(stored)}); name the one to leave "
            "out with --holdout NAME (or --holdout none)"
        )
    if not stored:
        stderr.print(
            f"[yellow]warning:[/] {data} has no held-out set: training on every image, so "
            "`cheff eval` will have no unseen images (see `machex holdout`)",
            highlight=False,
        )
        return None
    stderr.print(f"leaving out the held-out set {stored[0]!r}", highlight=False)
    return stored[0]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
