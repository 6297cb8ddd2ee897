"""What made a synthetic image, written into the image itself (PNG text chunks).

A generated radiograph that leaves its folder must still say that it is synthetic and how it
was made. Every PNG that ``cheff sample`` / ``inpaint`` / ``upscale`` writes carries ``iTXt``
chunks under the ``cheff:`` prefix: ``cheff:synthetic`` = ``true``; the SHA-256 of each
checkpoint used; the seed and the image's number (with the seed rule, enough to redo it);
the prompt or labels; sampler, steps, eta, guidance and the SR settings. Read them back with
:func:`read_provenance` (or any PNG tool: ``exiftool``, ``identify -verbose``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PREFIX = "cheff:"
#: ``last_run`` fields copied into every image (when present).
RUN_FIELDS = (
    "task",
    "sampler",
    "steps",
    "network_calls",
    "eta",
    "exact_steps",
    "guidance_scale",
    "condition",
    "seed",
    "seed_rule",
    "image_size",
    "dtype",
    "schedule",
    "paste_back",
    "sr_sampler",
    "sr_steps",
    "sr_eta",
    "sr_size",
    "sr_schedule",
    "sr_seed_rule",
)


def checkpoint_hashes(checkpoints: Mapping[str, str | Path | None]) -> dict[str, str]:
    """``{"sdm": path, ...}`` -> ``{"cheff:sdm_sha256": hex, ...}`` for the files given."""
    from cheff.latents import file_sha256

    return {
        f"{PREFIX}{name}_sha256": file_sha256(Path(path))
        for name, path in checkpoints.items()
        if path is not None
    }


def image_text(
    run: Mapping[str, Any],
    index: int,
    condition: Any = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The text chunks of image number ``index`` of a run described by ``run`` (``last_run``)."""
    from cheff import __version__

    text = {f"{PREFIX}synthetic": "true", f"{PREFIX}generator": f"cheff {__version__}"}
    text[f"{PREFIX}index"] = str(index)
    for field in RUN_FIELDS:
        value = run.get(field)
        if value is not None:
            text[f"{PREFIX}{field}"] = value if isinstance(value, str) else json.dumps(value)
    if condition is not None:  # named by the model's kind: labels may come as "Edema=1"
        key = "labels" if run.get("condition") == "labels" else "prompt"
        text[f"{PREFIX}{key}"] = condition if isinstance(condition, str) else _labels(condition)
    return text | dict(extra or {})


def _labels(value: Any) -> str:
    if hasattr(value, "tolist"):
        value = value.tolist()
    return json.dumps(value, sort_keys=True, default=str)


def read_provenance(path: str | Path) -> dict[str, str]:
    """The ``cheff:`` text chunks of a PNG (empty when it has none)."""
    from PIL import Image

    with Image.open(path) as image:
        chunks = getattr(image, "text", {}) or {}
        return {key: str(value) for key, value in chunks.items() if key.startswith(PREFIX)}
