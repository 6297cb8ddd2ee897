"""``cheff eval memorization``: does the model reproduce training patients?

For every synthetic image, its ``k`` nearest training images in a feature space, with their
cosine distances, and a PNG of the closest pairs, so a user can look for copies (the privacy
concern the paper raises). Default feature: the autoencoder's posterior mean at 256 px,
flattened (what the latent diffusion model learns to generate); any ``(B, 1, S, S) -> (B, D)``
function can replace it (e.g. Inception pool3).

The training images are every image of the collection (all splits) but the held-out set, or,
with a ``composition`` (``paper-2023``), only its (source, split) pairs less the held-out set:
the images the paper's models train on, as ``MaCheX(root, composition=...)`` selects them.

Training images are streamed in batches and only a running top-k per synthetic image is kept,
so a collection of hundreds of thousands of images needs memory for the synthetic set only.
A synthetic image that is a copy of a training image ranks it first at distance ~0.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from cheff.devices import resolve_device

Featurizer = Callable[[Tensor], Tensor]  # (B, 1, S, S) in [0, 1] -> (B, D)
IMAGE_SIZE = 256


def ae_features(ae: torch.nn.Module) -> Featurizer:
    """The autoencoder's posterior mean of images in [0, 1], flattened."""

    def features(images: Tensor) -> Tensor:
        x = (images * 2 - 1).expand(-1, ae.config.in_channels, -1, -1)
        return ae.encode(x).mean.flatten(1)

    return features


@dataclass(frozen=True, eq=False)
class MemorizationResult:
    neighbours: pd.DataFrame  # fake, rank, key, source, distance (cosine)
    n_fake: int
    n_real: int
    protocol: dict[str, Any]
    fake_paths: dict[str, Path] = field(repr=False)  # file name -> file, for the PNG

    def summary(self) -> dict[str, Any]:
        first = self.neighbours[self.neighbours["rank"] == 1]["distance"].to_numpy()
        return {
            "n_fake": self.n_fake,
            "n_real": self.n_real,
            "nearest_distance": {
                "min": float(first.min()),
                "median": float(np.median(first)),
                "mean": float(first.mean()),
                "below_0.01": int((first < 0.01).sum()),
            },
            "protocol": self.protocol,
        }


def _read_batch(paths: list[Path], image_size: int, device: torch.device) -> torch.Tensor:
    from cheff.eval.fid import read_grey
    from machex import resize

    return torch.cat([resize(read_grey(path), image_size) for path in paths]).to(device)


@torch.no_grad()
def nearest_training_images(
    featurize: Featurizer,
    real: str | Path,
    fake: str | Path,
    *,
    exclude_holdout: str | None = None,
    composition: str | None = None,
    k: int = 5,
    image_size: int = IMAGE_SIZE,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    feature: str = "autoencoder posterior mean, flattened",
) -> MemorizationResult:
    """The ``k`` nearest images of the built MaCheX ``real`` (all splits, or the
    ``composition``'s (source, split) pairs; minus the held-out set ``exclude_holdout``) to
    each image of the folder ``fake``, by cosine distance."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from cheff.eval.fid import list_samples
    from cheff.eval.subsets import draw_record, drawn_indices
    from machex import MaCheX, collate

    if k < 1:
        raise ValueError(f"k must be at least 1 (nearest training images per fake), got {k}")
    device = resolve_device(device)
    paths, left_out = list_samples(fake)  # not closest_pairs.png from an earlier run
    # Read a batch at a time: 25,000 fakes held at 256 px would take 6.5 GB.
    batches = (paths[i : i + batch_size] for i in range(0, len(paths), batch_size))
    fake_features = torch.cat(
        [
            F.normalize(featurize(_read_batch(chunk, image_size, device)).float(), dim=1)
            for chunk in batches
        ]
    )
    dataset = MaCheX(
        real,
        splits=None,
        composition=composition,
        exclude_holdout=exclude_holdout,
        image_size=image_size,
        with_labels=False,
    )
    if len(dataset) == 0:
        within = "" if composition is None else f" in composition {composition!r}"
        raise ValueError(f"{real}: no training image{within} to compare with")
    chosen = drawn_indices(len(dataset), limit)  # seeded: the first N would be one source's
    loader = DataLoader(Subset(dataset, chosen), batch_size=batch_size, collate_fn=collate)
    best = torch.full((len(paths), 0), -2.0, device=device)
    best_index = torch.zeros((len(paths), 0), dtype=torch.long, device=device)
    keys: list[str] = []
    sources: list[str] = []
    for batch in tqdm(loader, desc="memorization", unit="batch"):
        real_features = F.normalize(featurize(batch["image"].to(device)).float(), dim=1)
        similarity = fake_features @ real_features.T
        indices = torch.arange(len(keys), len(keys) + len(batch["key"]), device=device)
        keys.extend(batch["key"])
        sources.extend(batch["source"])
        both = torch.cat([best, similarity], 1)
        both_index = torch.cat([best_index, indices.expand(len(paths), -1)], 1)
        top = both.topk(min(k, both.shape[1]), dim=1)
        best, best_index = top.values, both_index.gather(1, top.indices)
    rows = []
    for row, path in enumerate(paths):
        found = zip(best[row].tolist(), best_index[row].tolist())
        for rank, (similarity, index) in enumerate(found, 1):
            rows.append(
                {
                    "fake": path.name,
                    "rank": rank,
                    "key": keys[index],
                    "source": sources[index],
                    "distance": max(0.0, 1.0 - similarity),
                }
            )
    protocol = {
        "feature": feature,
        "distance": "cosine (1 - cos)",
        "image_size": image_size,
        "real": str(real),
        "excluded_holdout": exclude_holdout,
        "composition": composition,
        "k": k,
        "limit": limit,
        "draw": draw_record(len(dataset), limit),  # None: every training image searched
        "fake_left_out": left_out,
    }
    named = {path.name: path for path in paths}
    return MemorizationResult(pd.DataFrame(rows), len(paths), len(chosen), protocol, named)


def write_outputs(
    result: MemorizationResult, real: str | Path, out: str | Path, pairs: int = 8
) -> dict[str, Path]:
    """``neighbours.csv``, ``memorization.json`` and ``closest_pairs.png`` (the ``pairs``
    synthetic images closest to a training image, each beside that image) into ``out``."""
    from PIL import Image

    from machex import MaCheX

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "neighbours.csv"
    result.neighbours.to_csv(csv, index=False)
    summary = out / "memorization.json"
    summary.write_text(json.dumps(result.summary(), indent=2) + "\n")
    first = result.neighbours[result.neighbours["rank"] == 1].nsmallest(pairs, "distance")
    size = int(result.protocol["image_size"])
    dataset = MaCheX(real, splits=None, image_size=size, with_labels=False)
    position = {key: i for i, key in enumerate(dataset._keys.tolist())}
    canvas = np.zeros((len(first) * size, 2 * size), np.uint8)
    for row, item in enumerate(first.itertuples()):
        training = dataset[position[item.key]]["image"][0].numpy()
        fake = _read_batch([result.fake_paths[item.fake]], size, torch.device("cpu"))[0, 0]
        for column, image in enumerate((fake.numpy(), training)):
            pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            canvas[row * size : (row + 1) * size, column * size : (column + 1) * size] = pixels
    png = out / "closest_pairs.png"
    Image.fromarray(canvas).save(png)
    return {"neighbours": csv, "json": summary, "png": png}
