"""Reconstruction quality on a held-out set: the paper's Table 2, its three workflows.

| workflow | what is scored | at |
|---|---|---|
| ``ae`` | x -> Encoder -> Decoder | 256 px |
| ``sr`` | x_HR -> bicubic to 256 -> SR | 1024 px |
| ``full`` | x_HR -> bicubic to 256 -> Encoder -> Decoder -> glue -> SR | 1024 px |

Each is a :class:`ReconWorkflow`: a function from target images to reconstructions, scored
per image with MSE, PSNR and SSIM by :func:`evaluate_workflow` (the paper's numbers in
:data:`PAPER_TABLE2`). The ``ae`` protocol, fixed here and written into the JSON:

- images from ``MaCheX(OUT, splits=<holdout>, image_size=256)`` in [0, 1], one channel;
- into the model: mapped to [-1, 1] and replicated to 3 channels; the latent is the posterior
  mean (``AutoencoderKL.reconstruct``);
- out of the model: mapped back to [0, 1], the mean of the 3 channels, clamped to [0, 1];
- metrics per image (``cheff.eval.metrics``), then averaged over images.

The SR workflows: the low resolution is ``machex.resize`` (antialiased bicubic) of the target
to 256 (the paper's sizes; a file written by ``cheff train sr`` is evaluated at the sides it
records, see :func:`sr_sizes`, and the JSON says the sizes are then not the paper's), the SR
model samples with DDIM (150 steps, eta 0, each image's noise from the
``"sr"`` stream of its number in the held-out set, so runs are reproducible), its output is
clamped to [-1, 1] and mapped to [0, 1]; ``full`` hands the decoder's output to SR through
the official glue (8-bit truncation, ITU-R 601 luma), as the cascade does.

Only the running per-image numbers and the ``worst`` images with the highest MSE are kept, so a
25,000-image held-out set costs a few megabytes of host memory.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from cheff.devices import resolve_device
from cheff.eval.metrics import (
    SSIM_K1,
    SSIM_K2,
    SSIM_KERNEL_SIZE,
    SSIM_SIGMA,
    image_metrics,
    psnr_of_mean_mse,
    summarize,
)
from cheff.eval.subsets import SUBSET_SEED

log = logging.getLogger(__name__)

WORKFLOW = "ae"
WORKFLOWS = ("ae", "sr", "full")
IMAGE_SIZE = 256
HR_SIZE = 1024
DATA_RANGE = 1.0
#: The paper's Table 2 (Cheff, Weber et al. 2023); the SR rows for the base and the
#: fine-tuned SR model.
PAPER_TABLE2: dict[str, dict[str, Any]] = {
    "ae": {"mse": 0.0005, "psnr": 36.80, "ssim": 0.9926},
    "sr": {
        "base": {"mse": 0.0035, "psnr": 24.59, "ssim": 0.9540},
        "fine": {"mse": 0.0025, "psnr": 26.09, "ssim": 0.9559},
    },
    "full": {
        "base": {"mse": 0.0039, "psnr": 24.05, "ssim": 0.9512},
        "fine": {"mse": 0.0026, "psnr": 25.77, "ssim": 0.9510},
    },
}
#: The sides of the paper's SR rows, (target, input): the released SR models' 1024 and 256.
PAPER_SR_SIZES = (HR_SIZE, IMAGE_SIZE)
METRICS = ("mse", "psnr", "ssim")

JSON_NAME = "recon.json"
PNG_NAME = "recon_worst.png"
ROWS_STEM = "recon_images"
#: The PNG's |difference| column is scaled by this (and clipped), so that the errors of a good
#: autoencoder (RMS ~0.02) are visible; fixed, so rows can be compared with each other.
DIFF_GAIN = 10.0
CAPTION_HEIGHT = 14
HEADER_HEIGHT = 14
PANEL_GAP = 4

#: A reconstruction function: (B, 3, H, W) in [-1, 1] -> (B, 3, H, W), as ``reconstruct``.
Reconstructor = Callable[[Tensor], Tensor]


class HoldoutChoiceError(ValueError):
    """No usable held-out set for the evaluation; the message says which command makes one."""


@dataclass(frozen=True)
class ReconOptions:
    """How to run the evaluation; none of these change the protocol except ``image_size``,
    which exists for quick runs and tests (the paper's numbers are at 256)."""

    batch_size: int = 16
    device: str | None = None  # None: "cuda" when available, else "cpu"
    bf16: bool = False  # bf16 autocast around the model (CUDA only); metrics stay float32
    worst: int = 16  # rows of the worst-reconstructions PNG
    limit: int | None = None  # evaluate N held-out images, a seeded draw (a quick look)
    num_workers: int = 0  # DataLoader workers decoding images
    image_size: int | None = None  # the target side; None: the workflow's (256 ae, 1024 SR)
    progress: bool = True  # a tqdm bar on stderr

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.worst < 0:
            raise ValueError(f"worst must be 0 or more, got {self.worst}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1 (or None for all), got {self.limit}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {self.num_workers}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")


DEFAULT_OPTIONS = ReconOptions()


@dataclass(frozen=True)
class WorstImage:
    """One of the worst reconstructions: its scores and both images, (H, W) in [0, 1]."""

    rank: int  # 1 = the highest MSE (the lowest PSNR)
    key: str
    source: str
    mse: float
    psnr: float
    ssim: float
    original: np.ndarray = field(repr=False)
    reconstruction: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "key": self.key,
            "source": self.source,
            "mse": self.mse,
            "psnr": self.psnr,
            "ssim": self.ssim,
        }


@dataclass(frozen=True, eq=False)
class ReconResult:
    """What ``evaluate_recon`` measured; ``to_dict`` is the JSON document (without rows)."""

    workflow: str
    data: str
    holdout: str
    holdout_images: int  # rows of the held-out set
    n: int  # images evaluated (fewer with a limit, or when a source is no longer built)
    metrics: dict[str, dict[str, float | int | None]]
    rows: pd.DataFrame = field(repr=False)  # key, source, mse, psnr, ssim in dataset order
    worst: list[WorstImage] = field(repr=False)
    protocol: dict[str, Any] = field(repr=False)
    paper: dict[str, float] = field(repr=False)
    checkpoint: str | None
    device: str
    dtype: str
    batch_size: int
    limit: int | None
    elapsed_s: float
    # per checkpoint file: the held-out set it records being trained without, and whether that
    # is the set scored here as it is now (None: no file records one)
    trained_without: dict[str, dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "workflow": self.workflow,
            "data": self.data,
            "holdout": self.holdout,
            "holdout_images": self.holdout_images,
            "n": self.n,
            "limit": self.limit,
            # a limit's images: a seeded draw of the held-out set (its first N are one source's)
            "limit_draw": None
            if self.limit is None
            else {"seed": SUBSET_SEED, "how": "uniform without replacement"},
            "trained_without": self.trained_without,
            "metrics": self.metrics,
            "paper": self.paper,
            "protocol": self.protocol,
            "checkpoint": self.checkpoint,
            "device": self.device,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "elapsed_s": round(self.elapsed_s, 3),
            "images_per_s": round(self.n / self.elapsed_s, 3) if self.elapsed_s > 0 else None,
            "worst": [image.to_dict() for image in self.worst],
            "versions": _versions(),
        }


# -- held-out set ----------------------------------------------------------------------------


def resolve_holdout(out: str | Path, name: str | None = None) -> str:
    """The held-out set to evaluate on: ``name`` if stored, else the only one stored.

    Evaluating on images the model was trained on would flatter it, so no split is a
    fallback: without a held-out set this fails and says how to make one.
    """
    from machex.holdout import list_holdouts

    out = Path(out)
    stored = list_holdouts(out)
    if name is not None:
        if name not in stored:
            raise HoldoutChoiceError(
                f"{out} has no held-out set {name!r}; "
                + (
                    f"stored: {', '.join(stored)}"
                    if stored
                    else f"make one with `machex holdout {out} --name {name} --size 25000 "
                    "--by image` (and leave it out of training)"
                )
            )
        return name
    if not stored:
        raise HoldoutChoiceError(
            f"{out} has no held-out set; make one with `machex holdout {out} --name test-25k "
            "--size 25000 --by image` (the paper's 25,000 images; train with it excluded), "
            "then pass holdout='test-25k' (Python) or --holdout test-25k (command line)"
        )
    if len(stored) > 1:
        raise HoldoutChoiceError(
            f"{out} has {len(stored)} held-out sets ({', '.join(stored)}); choose one with "
            "holdout=NAME (Python) or --holdout NAME (command line)"
        )
    return stored[0]


# -- the model-free steps --------------------------------------------------------------------


def to_model_input(images: Tensor) -> Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) in [-1, 1]: grey replicated, as Cheff trains."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected grey images (B, 1, H, W), got {tuple(images.shape)}")
    return (images * 2.0 - 1.0).expand(-1, 3, -1, -1)


def from_model_output(decoded: Tensor) -> Tensor:
    """(B, C, H, W) in about [-1, 1] -> (B, 1, H, W) float32 in [0, 1]: channel mean, clamped.

    The decoder is unclamped and its channels differ slightly; their mean is the grey image a
    user would save, and clamping scores what can be displayed.
    """
    if decoded.ndim != 4:
        raise ValueError(f"expected decoded images (B, C, H, W), got {tuple(decoded.shape)}")
    grey = decoded.float().mean(dim=1, keepdim=True)
    return ((grey + 1.0) / 2.0).clamp(0.0, 1.0)


def score_batch(reconstruction: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Per-image ``mse``, ``psnr``, ``ssim`` (each (B,), on the CPU, float64) of a batch of
    reconstructions already in the protocol's form (grey, [0, 1], clamped)."""
    return {
        name: value.detach().to("cpu", torch.float64)
        for name, value in image_metrics(reconstruction, target, DATA_RANGE).items()
    }


def protocol(image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """The evaluation protocol as data, so that a JSON file says how its numbers were made."""
    return {
        "image_size": int(image_size),
        "resize": "machex.resize (antialiased bicubic) from the stored images",
        "value_range": [0.0, 1.0],
        "model_input": "grey replicated to 3 channels, mapped to [-1, 1]",
        "latent": "posterior mean (AutoencoderKL.reconstruct)",
        "model_output": "mapped to [0, 1], mean of the 3 channels, clamped to [0, 1]",
        "channels": 1,
        "data_range": DATA_RANGE,
        "mse": "per image, mean over pixels; then mean over images",
        "psnr": (
            "per image 10*log10(1/mse) in dB, then mean over images (finite values; "
            "metrics.psnr.n_inf counts exact reconstructions left out)"
        ),
        "ssim": {
            "window": "gaussian",
            "kernel_size": SSIM_KERNEL_SIZE,
            "sigma": SSIM_SIGMA,
            "k1": SSIM_K1,
            "k2": SSIM_K2,
            "padding": "reflect, map averaged over all pixels",
            "implementation": "torchmetrics.functional.structural_similarity_index_measure",
        },
        "std": "over images, ddof 0",
        "compute_dtype": "float64 on CPU, float32 on GPU",
        "worst": "highest MSE (= lowest PSNR) first",
    }


# -- evaluation ------------------------------------------------------------------------------


class _WorstK:
    """The ``k`` highest-MSE images seen so far, in a min-heap (NaN counts as worst)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[tuple[float, int, dict[str, Any]]] = []

    def wants(self, error: float) -> bool:
        return self.k > 0 and (len(self._heap) < self.k or error > self._heap[0][0])

    def add(self, error: float, index: int, item: dict[str, Any]) -> None:
        entry = (error, -index, item)  # on equal MSE the earlier image ranks worse
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def ranked(self) -> list[WorstImage]:
        ordered = sorted(self._heap, key=lambda e: (-e[0], -e[1]))
        return [WorstImage(rank=rank, **e[2]) for rank, e in enumerate(ordered, 1)]


@dataclass(frozen=True)
class ReconWorkflow:
    """One row of Table 2: ``run(targets, numbers)`` maps targets (B, 1, S, S) in [0, 1] on
    the device, with their numbers in the held-out set, to reconstructions of the same shape
    in [0, 1]. ``modules`` are put in eval mode for the run; ``protocol`` and ``paper`` go
    into the JSON."""

    name: str
    image_size: int
    run: Callable[[Tensor, range], Tensor]
    modules: tuple[nn.Module, ...] = ()
    protocol: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)


def ae_workflow(ae: nn.Module | Reconstructor, image_size: int = IMAGE_SIZE) -> ReconWorkflow:
    """x -> Encoder -> Decoder: an ``AutoencoderKL`` or any function with ``reconstruct``'s
    contract ((B, 3, H, W) in [-1, 1] -> (B, 3, H, W))."""
    if isinstance(ae, nn.Module):
        parameter = next(ae.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        reconstruct: Reconstructor = ae.reconstruct  # type: ignore[assignment]
        modules: tuple[nn.Module, ...] = (ae,)
    else:
        reconstruct, dtype, modules = ae, torch.float32, ()

    def run(targets: Tensor, numbers: range) -> Tensor:
        return from_model_output(reconstruct(to_model_input(targets).to(dtype)))

    return ReconWorkflow(
        WORKFLOW,
        image_size,
        run,
        modules,
        protocol(image_size),
        dict(PAPER_TABLE2["ae"]),
    )


def sr_sizes(path: str | Path) -> tuple[int, int, str]:
    """(target side, input side, where they come from) to evaluate the SR file ``path`` at.

    A file written by ``cheff train sr`` records the sides it was trained at (``image_size``,
    ``low_size`` in its header); a released file records none and is the paper's 256 -> 1024
    model. A file recording only its output side is taken to upscale by the paper's factor.
    """
    from cheff.checkpoints import read_image_size, read_low_size

    recorded_high, recorded_low = read_image_size(path), read_low_size(path)
    if recorded_high is None and recorded_low is None:
        return HR_SIZE, IMAGE_SIZE, "the released SR models' (the file records no sizes)"
    factor = HR_SIZE // IMAGE_SIZE
    high = recorded_high or recorded_low * factor  # type: ignore[operator]
    low = recorded_low or max(1, high // factor)
    return high, low, "recorded in the SR file (image_size, low_size)"


def sizes_differ_from_paper(protocol: dict[str, Any], workflow: str) -> str | None:
    """Why ``protocol``'s sizes are not the paper's Table 2 ones (so its numbers are not
    comparable), or None when they are."""
    size = protocol.get("image_size")
    if workflow == WORKFLOW:
        return None if size == IMAGE_SIZE else f"scored at {size} px, the paper at {IMAGE_SIZE}"
    low = protocol.get("input_size")
    if (size, low) == PAPER_SR_SIZES:
        return None
    high_paper, low_paper = PAPER_SR_SIZES
    return f"{low} -> {size} px, the paper {low_paper} -> {high_paper}"


def sr_workflow(
    upscaler: Any,
    ae: nn.Module | None = None,
    *,
    image_size: int = HR_SIZE,
    low_size: int = IMAGE_SIZE,
    steps: int = 150,
    eta: float = 0.0,
    seed: int = 0,
    sizes_from: str | None = None,
) -> ReconWorkflow:
    """``sr`` (``ae`` None): x_HR -> bicubic -> SR; ``full``: x_HR -> bicubic -> E -> D ->
    glue -> SR. ``upscaler`` is a :class:`cheff.upscale.Upscaler` whose size is set to
    ``image_size`` for the run; ``low_size`` is the SR model's input side (for a file,
    :func:`sr_sizes` gives both, and ``sizes_from`` says where from in the JSON). The JSON's
    ``protocol.sizes_match_paper`` says whether they are the paper's 256 -> 1024."""
    from cheff.glue import official_glue
    from machex import resize

    if image_size <= low_size:
        raise ValueError(f"the target size {image_size} must exceed the input size {low_size}")
    factor = getattr(getattr(ae, "config", None), "downsampling", None)
    if ae is not None and isinstance(factor, int) and low_size % factor:
        raise ValueError(
            f"the SR input side {low_size} is not a multiple of the autoencoder's factor {factor}"
        )
    upscaler.size, upscaler.low_size = image_size, low_size

    def run(targets: Tensor, numbers: range) -> Tensor:
        low = resize(targets.float(), low_size)
        if ae is not None:
            low = official_glue(ae.reconstruct(to_model_input(low)))
        high = upscaler(
            low,
            seed=seed,
            start=numbers.start,
            steps=steps,
            eta=eta,
            progress=False,
            batch_size=len(numbers),
        )
        return high.to(targets.device)

    name = "sr" if ae is None else "full"
    steps_text = "x_HR -> machex.resize to the input size -> "
    chain = steps_text + ("SR" if ae is None else "E -> D (posterior mean) -> glue -> SR")
    described = protocol(image_size) | {
        "workflow": chain,
        "input_size": int(low_size),
        "sizes_from": sizes_from or "given to sr_workflow",
        "paper_sizes": {"image_size": PAPER_SR_SIZES[0], "input_size": PAPER_SR_SIZES[1]},
        "sizes_match_paper": (int(image_size), int(low_size)) == PAPER_SR_SIZES,
        "model_output": "SR output clamped to [-1, 1], mapped to [0, 1]",
        "glue": None if ae is None else "cheff.glue.official_glue (8-bit truncation, 601 luma)",
        "sr": {
            "sampler": "ddim",
            "steps": int(steps),
            "eta": float(eta),
            "seed": int(seed),
            "seed_rule": "image i of the held-out set: cheff.noise.image_seed(seed, i, 'sr')",
        },
    }
    if ae is None:
        described.pop("latent")
    modules = tuple(m for m in (upscaler.sr, ae) if m is not None)
    return ReconWorkflow(name, image_size, run, modules, described, dict(PAPER_TABLE2[name]))


def evaluate_recon(
    ae: nn.Module | Reconstructor,
    data: str | Path,
    holdout: str | None = None,
    options: ReconOptions = DEFAULT_OPTIONS,
    *,
    checkpoint: str | Path | None = None,
) -> ReconResult:
    """Score ``x -> Encoder -> Decoder`` on held-out set ``holdout`` of the built ``data``.

    ``ae`` is an ``AutoencoderKL`` (moved to the device, run in eval mode, its training mode
    restored afterwards) or any function with ``reconstruct``'s contract, e.g. a wrapper of
    another model. ``checkpoint`` is only recorded. Runs without gradients, batched.
    """
    device = resolve_device(options.device)
    if isinstance(ae, nn.Module):
        ae = ae.to(device)
    workflow = ae_workflow(ae, options.image_size or IMAGE_SIZE)
    return evaluate_workflow(workflow, data, holdout, options, checkpoint=checkpoint)


def evaluate_workflow(
    workflow: ReconWorkflow,
    data: str | Path,
    holdout: str | None = None,
    options: ReconOptions = DEFAULT_OPTIONS,
    *,
    checkpoint: str | Path | dict[str, str] | None = None,
) -> ReconResult:
    """Score ``workflow`` on held-out set ``holdout`` of the built ``data`` (its modules must
    already be on ``options.device``). ``checkpoint`` is only recorded."""
    from torch.utils.data import DataLoader, Subset

    from cheff.eval.subsets import drawn_indices
    from machex import MaCheX, collate
    from machex.holdout import load_holdout

    data = Path(data)
    name = resolve_holdout(data, holdout)
    trained_without = check_trained_without(checkpoint, data, name)
    device = resolve_device(options.device)
    if options.bf16 and device.type != "cuda":
        raise ValueError(f"bf16 autocast is for CUDA devices; drop --bf16 on {device.type}")

    image_size = options.image_size or workflow.image_size
    dataset = MaCheX(
        data, splits=name, image_size=image_size, with_labels=False, value_range=(0, 1)
    )
    holdout_images = len(load_holdout(data, name))
    if len(dataset) == 0:
        raise ValueError(
            f"held-out set {name!r} selects no image of {data} (were its sources removed or "
            "rebuilt?); make a new one with `machex holdout`"
        )
    # A limit draws its images (seeded): the first N would be one source's.
    selected = (
        Subset(dataset, drawn_indices(len(dataset), options.limit))
        if options.limit is not None
        else dataset
    )
    loader = DataLoader(
        selected,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )

    modes = [module.training for module in workflow.modules]
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if options.bf16
        else contextlib.nullcontext()
    )

    from tqdm import tqdm

    columns: dict[str, list[Any]] = {column: [] for column in ("key", "source", *METRICS)}
    worst = _WorstK(options.worst)
    seen, psnr_sum, psnr_count = 0, 0.0, 0
    start = time.perf_counter()
    label = f"recon {workflow.name} {name}"
    bar = tqdm(total=len(selected), desc=label, unit="img", disable=not options.progress)
    try:
        for module in workflow.modules:
            module.eval()
        with torch.inference_mode():
            for batch in loader:
                target = batch["image"].to(device, non_blocking=True)
                numbers = range(seen, seen + len(batch["key"]))
                with autocast:
                    recon = workflow.run(target, numbers).float().clamp(0.0, 1.0)
                target = target.float()
                scores = score_batch(recon, target)
                columns["key"].extend(batch["key"])
                columns["source"].extend(batch["source"])
                for metric in METRICS:
                    columns[metric].extend(scores[metric].tolist())
                for i, error in enumerate(scores["mse"].tolist()):
                    rank_error = math.inf if math.isnan(error) else error
                    if worst.wants(rank_error):
                        worst.add(
                            rank_error,
                            seen + i,
                            {
                                "key": batch["key"][i],
                                "source": batch["source"][i],
                                "mse": error,
                                "psnr": float(scores["psnr"][i]),
                                "ssim": float(scores["ssim"][i]),
                                "original": target[i, 0].cpu().numpy().copy(),
                                "reconstruction": recon[i, 0].cpu().numpy().copy(),
                            },
                        )
                finite = [v for v in scores["psnr"].tolist() if math.isfinite(v)]
                psnr_sum, psnr_count = psnr_sum + sum(finite), psnr_count + len(finite)
                seen += len(batch["key"])
                bar.update(len(batch["key"]))
                if psnr_count:
                    bar.set_postfix(psnr=f"{psnr_sum / psnr_count:.2f}", refresh=False)
    finally:
        bar.close()
        for module, mode in zip(workflow.modules, modes):
            module.train(mode)
    elapsed = time.perf_counter() - start

    rows = pd.DataFrame(columns)
    metrics = {metric: summarize(rows[metric].to_numpy()) for metric in METRICS}
    metrics["psnr"]["of_mean_mse"] = psnr_of_mean_mse(metrics["mse"]["mean"], DATA_RANGE)
    model_dtype = next((p.dtype for m in workflow.modules for p in m.parameters()), torch.float32)
    described = dict(workflow.protocol)
    if options.image_size is not None and options.image_size != workflow.image_size:
        described["image_size"] = int(image_size)
    return ReconResult(
        workflow=workflow.name,
        data=str(data),
        holdout=name,
        holdout_images=holdout_images,
        n=len(rows),
        metrics=metrics,
        rows=rows,
        worst=worst.ranked(),
        protocol=described,
        paper=dict(workflow.paper),
        checkpoint=None if checkpoint is None else _checkpoint_text(checkpoint),
        device=str(device),
        dtype=("bfloat16 autocast" if options.bf16 else str(model_dtype).removeprefix("torch.")),
        batch_size=options.batch_size,
        limit=options.limit,
        elapsed_s=elapsed,
        trained_without=trained_without,
    )


def check_trained_without(
    checkpoint: str | Path | dict[str, str | None] | None, data: Path, name: str
) -> dict[str, dict[str, Any]] | None:
    """What each checkpoint file records of the held-out set its run left out, against
    ``name`` of ``data`` as it is now; a warning for each that does not match (a model trained
    with every image, without another set, or before ``name`` was redrawn has seen images it
    is scored on). Files that record nothing (official ones, older ones) are skipped."""
    from cheff.checkpoints import read_training_holdout
    from machex.holdout import holdout_fingerprint

    files = checkpoint if isinstance(checkpoint, dict) else {"checkpoint": checkpoint}
    found: dict[str, dict[str, Any]] = {}
    for role, path in files.items():
        if path is None or not Path(path).is_file():
            continue
        recorded = read_training_holdout(path)
        if recorded is None:
            continue
        trained_without, digest = recorded
        same_set = trained_without == name
        redrawn = same_set and digest is not None and digest != holdout_fingerprint(data, name)
        found[role] = {
            "holdout": trained_without,
            "holdout_sha256": digest,
            "matches": same_set and not redrawn,
            # False: the file records no digest (it could not be read when training), so a
            # set of the same name redrawn since would go unnoticed
            "keys_checked": digest is not None,
        }
        if trained_without == "none":
            why = "with every image, no held-out set left out"
        elif not same_set:
            why = f"leaving out the held-out set {trained_without!r}, not {name!r}"
        elif redrawn:
            why = f"leaving out {name!r} as it was before it was redrawn"
        else:
            continue
        log.warning(
            "%s was trained %s: it may have seen images of %r, which it is scored on",
            path,
            why,
            name,
        )
    return found or None


def _checkpoint_text(checkpoint: str | Path | dict[str, str]) -> str:
    if isinstance(checkpoint, dict):
        return ", ".join(f"{k}={v}" for k, v in checkpoint.items() if v is not None)
    return str(checkpoint)


# -- outputs ---------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import torchmetrics

    from cheff import __version__

    return {
        "cheff": __version__,
        "torch": torch.__version__,
        "torchmetrics": torchmetrics.__version__,
    }


def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become null (``summarize`` counts them separately)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(
    result: ReconResult, out_dir: str | Path, files: dict[str, str | Path] | None = None
) -> Path:
    """``out_dir/recon.json``: ``result.to_dict()`` plus ``files`` (names of the other outputs).

    Strict JSON (no NaN / Infinity): an infinite PSNR is ``null`` in ``worst``, and counted in
    ``metrics.psnr.n_inf``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    document = result.to_dict()
    if files:
        document["files"] = {k: str(v) for k, v in files.items()}
    path = out_dir / JSON_NAME
    path.write_text(json.dumps(_json_safe(document), indent=2, allow_nan=False) + "\n")
    return path


def write_rows(result: ReconResult, out_dir: str | Path, fmt: str = "csv") -> Path:
    """The per-image scores as ``out_dir/recon_images.csv`` (or ``.parquet``); an exact
    reconstruction's PSNR is ``inf`` there."""
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"per-image format must be csv or parquet, not {fmt!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{ROWS_STEM}.{fmt}"
    if fmt == "csv":
        result.rows.to_csv(path, index=False, float_format="%.9g")
    else:
        result.rows.to_parquet(path, index=False)
    return path


def worst_png_size(rows: int, image_size: int) -> tuple[int, int]:
    """(width, height) of the worst-reconstructions PNG with ``rows`` rows."""
    width = 3 * image_size + 2 * PANEL_GAP
    return width, HEADER_HEIGHT + rows * (CAPTION_HEIGHT + image_size)


def _grey(image: np.ndarray) -> Image.Image:
    pixels = np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0)  # a NaN output shows black
    return Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8), "L")


def render_worst(worst: list[WorstImage], diff_gain: float = DIFF_GAIN) -> Image.Image:
    """One row per image: original | reconstruction | |difference| x ``diff_gain``, each row
    under a caption with its rank, key, source, PSNR, SSIM and MSE."""
    if not worst:
        raise ValueError("no worst images to render (worst = 0, or nothing was evaluated)")
    size = worst[0].original.shape[-1]
    canvas = Image.new("L", worst_png_size(len(worst), size), color=0)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    gain = f"{diff_gain:g}"
    for column, title in enumerate(("original", "reconstruction", f"|difference| x{gain}")):
        draw.text((column * (size + PANEL_GAP) + 2, 1), title, fill=255, font=font)
    for row, image in enumerate(worst):
        top = HEADER_HEIGHT + row * (CAPTION_HEIGHT + size)
        psnr = f"{image.psnr:.2f} dB" if math.isfinite(image.psnr) else "inf"
        caption = (
            f"{image.rank}. {image.key} ({image.source})  PSNR {psnr}  "
            f"SSIM {image.ssim:.4f}  MSE {image.mse:.2e}"
        )
        draw.text((2, top + 1), caption, fill=255, font=font)
        difference = np.abs(image.original - image.reconstruction) * diff_gain
        panels = (image.original, image.reconstruction, difference)
        for column, panel in enumerate(panels):
            canvas.paste(_grey(panel), (column * (size + PANEL_GAP), top + CAPTION_HEIGHT))
    return canvas


def write_worst_png(
    result: ReconResult, out_dir: str | Path, diff_gain: float = DIFF_GAIN
) -> Path | None:
    """``out_dir/recon_worst.png`` (see ``render_worst``); ``None`` when there is no image."""
    if not result.worst:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PNG_NAME
    render_worst(result.worst, diff_gain).save(path)
    return path


def write_outputs(
    result: ReconResult, out_dir: str | Path, per_image: str | None = "csv"
) -> dict[str, Path]:
    """All outputs into ``out_dir``: the PNG, the per-image file (``per_image`` = ``"csv"``,
    ``"parquet"`` or ``None``) and the JSON, which lists the other two by name."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    png = write_worst_png(result, out_dir)
    if png is not None:
        written["worst_png"] = png
    if per_image is not None:
        written["per_image"] = write_rows(result, out_dir, per_image)
    files = {k: v.name for k, v in written.items()}
    written["json"] = write_json(result, out_dir, files)
    return written
