"""Shared fixtures: the embedded sample (built once per session) and ``../shared``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from machex.sample import make_sample

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    """``../shared`` (present for developers and CI, absent on a user's machine)."""
    if not (SHARED / "real").is_dir():
        pytest.skip(f"needs the real public files in {SHARED / 'real'} (not present here)")
    return SHARED


@pytest.fixture(scope="session")
def real_images(shared: Path) -> Path:
    return shared / "real" / "images"


@pytest.fixture(scope="session")
def real_metadata(shared: Path) -> Path:
    return shared / "real" / "metadata"


@pytest.fixture(scope="session")
def sample_roots_pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded sample, generated once; never modify it (use ``sample_roots``)."""
    return make_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture
def sample_roots(sample_roots_pristine: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """A private copy of the sample that a test may damage."""
    roots = {}
    for name, root in sample_roots_pristine.items():
        target = tmp_path / "sources" / root.name
        shutil.copytree(root, target)
        roots[name] = target
    return roots
