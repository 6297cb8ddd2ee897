"""``cheff eval fid``: FID, KID and precision/recall of generated images against real ones.

The protocol, fixed here and written into the JSON:

- real images: a built MaCheX (its held-out set, the evaluation's default, read at the fake
  images' resolution) or a folder of images; fake images: a folder (``cheff sample`` output);
- every image grey, quantised to uint8 (rounded: stored 8-bit pixels come back exactly) and
  replicated to 3 channels;
- the standard FID Inception (``cheff.models.inception``, torch-fidelity's computation: TF-1
  bilinear resize to 299, (x - 128) / 128), pool3 features (2048);
- FID; KID with torch-fidelity's defaults (100 subsets of 1000, polynomial kernel, seed 2020;
  the subset size is capped at the smaller set); improved precision and recall with k = 3;
- the weights file's SHA-256; a file other than the standard one (``cheff.weights``) is used,
  with a warning, and the JSON says the scores are not comparable with published FIDs.

The paper reports FID 11.58 and KID 0.0099 for Cheff on 25,000 samples (46.54 / 0.0530 for a
pixel-space cascade), with the torchmetrics Inception, which is this network.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cheff.devices import resolve_device
from cheff.eval.generative import (
    KID_SEED,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    PR_NEIGHBOURS,
    fid_from_features,
    kid_from_features,
    precision_recall,
)
from cheff.eval.subsets import drawn

PAPER = {
    "cheff": {"fid": 11.58, "kid": 0.0099},
    "pixel_cascade": {"fid": 46.54, "kid": 0.0530},
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
JSON_NAME = "fid.json"
#: Figures cheff writes beside samples (``cheff sample``'s grid, ``eval memorization``'s and
#: ``eval recon``'s PNGs, whose --out may be the samples' folder): never samples themselves.
FIGURE_NAMES = re.compile(r"(grid(_\d+)?|closest_pairs|recon_worst)\.png", re.IGNORECASE)
FIGURE = "a figure cheff writes, not a sample"
NO_PROVENANCE = "no cheff:synthetic text chunk, unlike the folder's cheff samples"
#: The standard FID Inception weights file (docs/weights.md), which published FIDs use.
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"

log = logging.getLogger(__name__)


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Grey (B, 1, H, W) in [0, 1] -> uint8 (B, 3, H, W), rounded."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def _is_cheff_sample(path: Path) -> bool:
    """Whether the image carries cheff's ``cheff:synthetic`` chunk (see
    :mod:`cheff.provenance`); cheff writes it before the pixels, so only the header is read."""
    from PIL import Image

    if path.suffix.lower() != ".png":
        return False
    with Image.open(path) as image:
        return image.info.get("cheff:synthetic") == "true"


def list_samples(folder: str | Path) -> tuple[list[Path], dict[str, str]]:
    """The generated images of a folder, and the files left out with why.

    Where cheff wrote the samples (``sample`` / ``inpaint`` / ``upscale``), they are the images
    carrying ``cheff:synthetic``; grids and other figures do not. A folder without any (another
    generator's images) counts every image but cheff's own figures (``FIGURE_NAMES``)."""
    paths = list_images(folder)
    marked = {path for path in paths if _is_cheff_sample(path)}
    left_out: dict[str, str] = {}
    for path in paths:
        if path in marked:
            continue
        if FIGURE_NAMES.fullmatch(path.name):
            left_out[path.name] = FIGURE
        elif marked:
            left_out[path.name] = NO_PROVENANCE
    if left_out:
        # cheff's own figures are expected; other images dropped are worth a look
        level = logging.WARNING if NO_PROVENANCE in left_out.values() else logging.INFO
        shown = "; ".join(f"{name} ({why})" for name, why in list(left_out.items())[:10])
        more = f"; and {len(left_out) - 10} more" if len(left_out) > 10 else ""
        log.log(level, "%s: %d files left out: %s%s", folder, len(left_out), shown, more)
    samples = [path for path in paths if path.name not in left_out]
    if not samples:
        raise ValueError(f"{folder}: no generated images, only cheff's figures ({FIGURE})")
    return samples, left_out


def sample_size(paths: list[Path]) -> int:
    """The side of the generated images, which must all be one size: a set of one model's
    samples has one resolution, and the real images are read at it."""
    from PIL import Image

    by_size: dict[tuple[int, int], list[str]] = {}
    for path in paths:
        with Image.open(path) as image:
            by_size.setdefault(image.size, []).append(path.name)
    if len(by_size) > 1:
        sizes = sorted(by_size.items(), key=lambda item: -len(item[1]))
        described = "; ".join(
            f"{w}x{h}: {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for (w, h), names in sizes
        )
        raise ValueError(
            f"{paths[0].parent}: the generated images are not all one size ({described}); "
            "expected one model's samples at one resolution: move the others out"
        )
    ((width, _),) = by_size
    return width


def read_grey(path: Path) -> Tensor:
    """An image file as (1, 1, H, W) float in [0, 1], uncropped (16-bit kept, scaled as
    :func:`cheff.greyscale.grey_pixels` does), grey by PIL's luma; unlike
    ``cheff.pipeline.load_image`` it never crops or resizes, so FID sees the image as
    written."""
    from cheff.greyscale import read_grey_file

    return torch.from_numpy(read_grey_file(path).copy())[None, None]


def folder_batches(paths: list[Path], batch_size: int) -> Iterator[Tensor]:
    """uint8 (B, 3, H, W) batches of the images; images of different sizes go one by one."""
    for start in range(0, len(paths), batch_size):
        images = [read_grey(path) for path in paths[start : start + batch_size]]
        if len({tuple(i.shape) for i in images}) == 1:
            yield to_uint8_rgb(torch.cat(images))
        else:
            yield from (to_uint8_rgb(image) for image in images)


def collection_batches(
    root: str | Path, holdout: str | None, image_size: int, limit: int | None, batch_size: int
) -> tuple[Iterator[Tensor], int, str, dict[str, object] | None]:
    """The held-out images of a built MaCheX at ``image_size``; (batches, count, its name,
    the record of the draw a ``limit`` made: None for every image)."""
    from torch.utils.data import DataLoader, Subset

    from cheff.eval.recon import resolve_holdout
    from machex import MaCheX, collate

    name = resolve_holdout(root, holdout)
    dataset = MaCheX(root, splits=name, image_size=image_size, with_labels=False)
    chosen, draw = drawn(list(range(len(dataset))), limit)  # not the first N: one source's
    loader = DataLoader(Subset(dataset, chosen), batch_size=batch_size, collate_fn=collate)
    batches = (to_uint8_rgb(batch["image"]) for batch in loader)
    return batches, len(chosen), name, draw


#: A feature extractor: uint8 images (N, 3, H, W) on its device -> features (N, D).
Extractor = Callable[[Tensor], Tensor]


def inception_extractor(weights: str | Path, device: torch.device) -> Extractor:
    """The standard FID Inception's pool3 features."""
    from cheff.models.inception import FIDInceptionV3

    model = FIDInceptionV3.from_file(weights).to(device)
    return lambda images: model(images)["2048"]


def standard_inception_sha256() -> str:
    """The SHA-256 of the standard FID Inception weights file (``cheff weights verify``'s)."""
    from cheff.weights import KNOWN

    (digest,) = (known.sha256 for known in KNOWN if known.name == INCEPTION_FILE)
    assert digest is not None
    return digest


def weights_record(weights: str | Path | None, extractor: str | None) -> dict[str, Any]:
    """What the JSON says about the feature network's weights: the file's SHA-256, whether it
    is the standard FID Inception file, and whether the scores are comparable with published
    FIDs (only with that file and the Inception network). A non-standard Inception file is
    used as asked (tests and deliberate experiments do), with a warning."""
    from cheff.latents import file_sha256

    # A custom extractor's weights may be a folder (a from_pretrained layout): no one hash.
    digest = None if weights is None or Path(weights).is_dir() else file_sha256(Path(weights))
    if extractor is not None:
        return {
            "weights_sha256": digest,
            "standard_weights": None,  # not the FID Inception: no standard file to compare with
            "comparable_with_published": False,
            "not_comparable_because": f"a custom feature extractor ({extractor})",
        }
    standard = standard_inception_sha256()
    if digest == standard:
        return {
            "weights_sha256": digest,
            "standard_weights": True,
            "comparable_with_published": True,
            "not_comparable_because": None,
        }
    why = (
        f"the Inception weights {weights} (sha256 {digest}) are not the standard "
        f"{INCEPTION_FILE} (sha256 {standard}); the scores are not comparable with published "
        "FIDs, the paper's included"
    )
    log.warning("%s", why)
    return {
        "weights_sha256": digest,
        "standard_weights": False,
        "comparable_with_published": False,
        "not_comparable_because": why,
    }


def load_extractor(spec: str, weights: str | Path | None, device: torch.device) -> Extractor:
    """A custom extractor, e.g. a chest X-ray network: ``spec`` is ``package.module:function``,
    an importable function called as ``function(weights)`` that returns an ``nn.Module``
    mapping uint8 images (N, 3, H, W) to features (N, D). The module is code you installed;
    the weights file is only data for it."""
    import importlib

    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--extractor {spec!r}: write package.module:function")
    try:
        build = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"--extractor {spec!r}: {error}") from None
    model = build(None if weights is None else Path(weights))
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--extractor {spec!r} returned {type(model).__name__}, not an nn.Module")
    model = model.to(device).eval()
    return lambda images: model(images)


@torch.no_grad()
def extract_features(
    extractor: Extractor, batches: Iterator[Tensor], device: torch.device, total: int | None
) -> np.ndarray:
    """Features (N, D) float64 of uint8 image batches."""
    from tqdm import tqdm

    rows = []
    with tqdm(total=total, unit="img", desc="features", disable=total is None) as bar:
        for batch in batches:
            features = extractor(batch.to(device))
            if features.ndim != 2 or len(features) != len(batch):
                raise ValueError(
                    f"the feature extractor gave {tuple(features.shape)} for {len(batch)} images"
                    "; expected (N, D)"
                )
            rows.append(features.double().cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(rows)


def evaluate_fid(
    real: str | Path,
    fake: str | Path,
    weights: str | Path | None,
    *,
    extractor: str | None = None,
    n: int | None = None,
    holdout: str | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
) -> dict[str, Any]:
    """The metrics of ``fake`` (a folder) against ``real`` (a built MaCheX or a folder), in the
    FID Inception's pool3 features (``weights``: its file), or with ``extractor``
    (``package.module:function``, see :func:`load_extractor`; ``weights``: its file)."""
    target = resolve_device(device)
    if extractor is not None:
        model = load_extractor(extractor, weights, target)
    elif weights is None:
        raise ValueError(
            "give the FID Inception weights (--inception-weights), see docs/weights.md"
        )
    else:
        model = inception_extractor(weights, target)
    if n is not None and n < 1:
        raise ValueError(f"--n must be at least 1 (or left out for every image), got {n}")
    weights_info = weights_record(weights, extractor)  # after the load names a bad file
    fake_paths, left_out = list_samples(fake)
    fake_paths, fake_draw = drawn(fake_paths, n)
    fake_size = sample_size(fake_paths)  # refuses a folder of mixed sizes
    size = image_size or fake_size
    began = time.perf_counter()
    if (Path(real) / "manifests").is_dir():
        batches, count, name, draw = collection_batches(real, holdout, size, n, batch_size)
        real_desc = {"collection": str(real), "holdout": name, "image_size": size, "draw": draw}
    else:
        if image_size is not None:
            raise ValueError(
                "--image-size is for a collection's held-out images; a folder's images are "
                "scored as stored"
            )
        real_paths, real_left_out = list_samples(real)  # a sample folder's grid.png is no image
        real_paths, real_draw = drawn(real_paths, n)
        real_size = sample_size(real_paths)  # one size, as the fakes: else not alike
        if real_size != fake_size:
            log.warning(
                "%s: the real images are %d px, the fakes %d px: both are resized to 299 "
                "without antialiasing, so the sets are not preprocessed alike",
                real,
                real_size,
                fake_size,
            )
        batches, count = folder_batches(real_paths, batch_size), len(real_paths)
        real_desc = {
            "folder": str(real),
            "left_out": real_left_out,
            "image_size": real_size,
            "draw": real_draw,
        }
    real_features = extract_features(model, batches, target, count)
    fake_features = extract_features(
        model, folder_batches(fake_paths, batch_size), target, len(fake_paths)
    )
    kid = kid_from_features(
        real_features, fake_features, subsets=kid_subsets, subset_size=kid_subset_size
    )
    enough = min(len(real_features), len(fake_features)) > PR_NEIGHBOURS
    pr = precision_recall(real_features, fake_features) if enough else None
    fewest, width = min(len(real_features), len(fake_features)), real_features.shape[1]
    small = None
    if fewest < width:  # fewer images than features: a covariance of rank < width
        small = (
            f"{fewest} images in the smaller set, fewer than the {width} features: FID is "
            "biased upwards at small N (the same distribution scores far above 0), so compare "
            "only FIDs of the same N, and of thousands of images"
        )
        log.warning("%s", small)
    return {
        "fid": fid_from_features(real_features, fake_features),
        "fid_small_sample": small,  # None: at least as many images per set as features
        "kid_mean": kid.mean,
        "kid_std": kid.std,
        "precision": None if pr is None else pr.precision,  # None: k + 1 images per set needed
        "recall": None if pr is None else pr.recall,
        "n_real": len(real_features),
        "n_fake": len(fake_features),
        "real": real_desc,
        "fake": str(fake),
        "fake_draw": fake_draw,  # None: every sample; else the seeded draw of --n
        "fake_left_out": left_out,  # file name -> why it is not a sample
        "paper": PAPER,
        "comparable_with_published": weights_info["comparable_with_published"],
        "not_comparable_because": weights_info["not_comparable_because"],
        "protocol": {
            "network": extractor
            or (
                "FID Inception-v3 (TF 2015-12-05 weights), torch-fidelity computation"
                if weights_info["standard_weights"]
                else "FID Inception-v3 architecture with other weights than the TF 2015-12-05 "
                "file, torch-fidelity computation"
            ),
            "weights": None if weights is None else str(weights),
            "weights_sha256": weights_info["weights_sha256"],
            "standard_weights": weights_info["standard_weights"],
            "standard_weights_sha256": None if extractor else standard_inception_sha256(),
            "feature": "pool3 (2048)" if extractor is None else f"{real_features.shape[1]} wide",
            "input": "grey, uint8 (rounded), replicated to 3 channels",
            "resize": "TF-1 bilinear to 299 (in the network), then (x - 128) / 128",
            "real_resolution": size if "collection" in real_desc else "as stored",
            "kid": {
                "subsets": kid.subsets,
                "subset_size": kid.subset_size,
                "kernel": "(a.b / d + 1)^3",
                "seed": KID_SEED,
                "std": "population (ddof 0) over subsets",
            },
            "precision_recall": {"k": PR_NEIGHBOURS, "method": "Kynkaanniemi et al. 2019"},
        },
        "device": str(target),
        "elapsed_s": round(time.perf_counter() - began, 3),
    }


def write_fid_json(result: dict[str, Any], out: str | Path) -> Path:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    target = path / JSON_NAME
    target.write_text(json.dumps(result, indent=2) + "\n")
    return target
