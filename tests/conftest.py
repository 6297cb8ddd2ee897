"""Shared fixtures: the embedded sample (built once per session) and ``../shared``."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Generator
from pathlib import Path

import pytest

from machex.sample import make_sample

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Above this length a failed ``==`` of bytes or text is summarised, never diffed in full.
LONG_SEQUENCE = 2_000


@pytest.hookimpl(wrapper=True)
def pytest_assertrepr_compare(
    op: str, left: object, right: object
) -> Generator[None, list[list[str]], list[list[str]]]:
    """Explain a failed ``==`` of long bytes or text by lengths, first difference and digests.

    Where ``CI`` (or ``BUILD_NUMBER``) is set, pytest explains a failed ``==`` of two sequences
    with a full ``difflib`` diff of their pretty-printed forms; for two encoded images (hundreds
    of kB) that runs for hours, so a failing or xfail test stalled CI instead of failing it.
    For long operands pytest's own explanation is made as it is without ``CI``.
    """
    summary = _long_pair_summary(op, left, right)
    saved = {} if summary is None else _pop_ci_variables()
    try:
        explanations = yield
    finally:
        os.environ.update(saved)
    return explanations if summary is None else [summary, *explanations]


def _pop_ci_variables() -> dict[str, str]:
    return {name: os.environ.pop(name) for name in ("CI", "BUILD_NUMBER") if name in os.environ}


def _long_pair_summary(op: str, left: object, right: object) -> list[str] | None:
    kinds = (bytes, bytearray, str)
    if op != "==" or not isinstance(left, kinds) or not isinstance(right, kinds):
        return None
    if max(len(left), len(right)) <= LONG_SEQUENCE:
        return None
    first = next(
        (i for i, (a, b) in enumerate(zip(left, right)) if a != b), min(len(left), len(right))
    )

    def digest(value: bytes | bytearray | str) -> str:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return hashlib.sha256(data).hexdigest()[:16]

    return [
        f"{type(left).__name__} of length {len(left):,} == "
        f"{type(right).__name__} of length {len(right):,}",
        f"first difference at index {first:,}: "
        f"{left[first : first + 12]!r} != {right[first : first + 12]!r}",
        f"sha256 {digest(left)} != {digest(right)}",
    ]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``bash dev.sh test`` runs ``-n auto``) each worker gets its share
    of the cores: torch's thread pools and those of the subprocesses a test starts would
    otherwise each take every core and fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


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


TRAINING_HOLDOUT = "held-2"


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> Path:
    """A private copy of the test module's ``built`` collection that a test may damage."""
    target = tmp_path / "out"
    shutil.copytree(built, target)
    return target


@pytest.fixture(scope="session")
def training_collection(tmp_path_factory: pytest.TempPathFactory, sample_roots_pristine) -> Path:
    """ChestX-ray14 + CheXpert miniatures built (34 images) with a 2-image held-out set
    ``TRAINING_HOLDOUT``: 32 training images for the cheff training tests. Never modified."""
    from machex.build import BuildOptions, build_source
    from machex.holdout import make_holdout

    out = tmp_path_factory.mktemp("training") / "machex"
    for source in ("chestxray14", "chexpert"):
        build_source(source, sample_roots_pristine[source], out, BuildOptions(workers=1))
    make_holdout(out, TRAINING_HOLDOUT, 2, by="image", seed=0)
    return out


@pytest.fixture(scope="session")
def report_collection(tmp_path_factory: pytest.TempPathFactory, sample_roots_pristine) -> Path:
    """MIMIC-CXR + Open-i miniatures built (14 images, reports and labels) for the report-
    and label-conditioned training tests. Never modified."""
    from machex.build import BuildOptions, build_source

    out = tmp_path_factory.mktemp("reports") / "machex"
    for source in ("mimic", "openi"):
        build_source(source, sample_roots_pristine[source], out, BuildOptions(workers=1))
    return out


@pytest.fixture(scope="session")
def ae_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init autoencoder of the tiny preset, saved: what the LDM training tests
    encode with (its latents are as good as any for the mechanics and a falling loss)."""
    import torch

    from cheff.checkpoints import save_autoencoder
    from cheff.config import PRESETS
    from cheff.models.autoencoder import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(PRESETS["tiny"].autoencoder)
    return save_autoencoder(model, tmp_path_factory.mktemp("ae") / "ae.safetensors")


@pytest.fixture(scope="session")
def report_vocab(report_collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WordPiece vocabulary trained on ``report_collection``'s reports with the
    ``tokenizers`` library (the released model's bert-base-uncased vocabulary is not
    redistributable here)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    from machex.manifests import load_manifest

    texts = load_manifest(report_collection, "reports")["text"].dropna().tolist()
    tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials)
    tokenizer.train_from_iterator(texts, trainer)
    ordered = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(token for token, _ in ordered) + "\n")
    return path


# Reads of a tensor's value (each one a wait for the device on a GPU).
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


@pytest.fixture
def step_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each read of a tensor's value made by cheff's own code inside
    ``Trainer.train_step``: on a GPU, each such read makes the host wait for the device."""
    import sys

    import torch

    from cheff.train import loop

    package = str(Path(loop.__file__).parents[1])  # .../cheff
    inside, reads = [False], []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, __original=original, __name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if inside[0] and caller.co_filename.startswith(package):
                reads.append(f"{__name} in {caller.co_name} ({caller.co_filename})")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    real_step = loop.Trainer.train_step

    def step(self, *args, **kwargs):
        inside[0] = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(loop.Trainer, "train_step", step)
    return reads


@pytest.fixture
def step_float64(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each float64 result computed inside ``Trainer.train_step`` after a run's first
    step (which may place tables on the device): Apple's MPS has no float64, so a step that
    computes in it cannot train there."""
    import sys

    from torch.utils._python_dispatch import TorchDispatchMode

    from cheff.train import loop

    package = str(Path(loop.__file__).parents[1])  # .../cheff
    found: list[str] = []

    class Float64Results(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            results = out if isinstance(out, tuple | list) else (out,)
            if any(getattr(r, "dtype", None) is torch_float64 for r in results):
                frame = sys._getframe(1)
                while frame is not None and not frame.f_code.co_filename.startswith(package):
                    frame = frame.f_back
                where = f" in {frame.f_code.co_name} ({frame.f_code.co_filename})" if frame else ""
                found.append(f"{func}{where}")
            return out

    import torch

    torch_float64 = torch.float64
    real_step, seen = loop.Trainer.train_step, set()

    def step(self, *args, **kwargs):
        if id(self) not in seen:
            seen.add(id(self))
            return real_step(self, *args, **kwargs)
        with Float64Results():
            return real_step(self, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "train_step", step)
    return found
