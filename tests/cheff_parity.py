"""Where the official parity fixtures are, and the tolerance rule of their README.

``CHEFF_PARITY_DIR`` names a fixture folder (default ``../shared/cheff-official/parity``);
other fixture sets with other sizes exist, so every size is read from each ``config.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PARITY_DIR = REPO.parent / "shared" / "cheff-official" / "parity"

SINGLE = 1e-5  # one evaluation: encode, decode, one UNet call, schedule arrays
MULTI_STEP = 1e-4  # samplers


def parity_dir() -> Path:
    return Path(os.environ.get("CHEFF_PARITY_DIR", DEFAULT_PARITY_DIR))


def fixture(name: str) -> Path:
    """``<parity dir>/<name>``, or a skip that says what is missing."""
    folder = parity_dir() / name
    if not (folder / "config.json").is_file():
        pytest.skip(
            f"needs the official parity fixture {folder} (set CHEFF_PARITY_DIR; not present here)"
        )
    return folder


def config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def io(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "io.safetensors"))


def checkpoint(folder: Path) -> Path:
    (path,) = folder.glob("*.pt")
    return path


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float = SINGLE, what: str = "") -> None:
    """The README's rule: max|out - ref| <= tol * max(1, max|ref|)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    error = (out.double() - ref.double()).abs().max().item()
    bound = tol * max(1.0, ref.double().abs().max().item())
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g}"
