"""Every weights file cheff can use, and ``cheff weights verify DIR``.

The project redistributes none of them (docs/weights.md says where each comes from). A file is
verified by loading it with the loader that will use it and comparing what it holds with the
released layout (parameter counts taken from the official layouts), and, where its
publisher gives one, by its digest (the SHA-256 of the FID Inception, torchvision's VGG16 and
BERT's vocabulary; the MD5 taming-transformers checks for the LPIPS heads). The Cheff authors
publish no digest, so their files are checked by content alone. The full SHA-256 of every file
found is printed so a user can record it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn


class WeightsError(ValueError):
    """A weights file is there but is not the expected one; the message says why."""


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _expect(what: str, found: int, expected: int) -> None:
    if found != expected:
        raise WeightsError(f"{what}: {found:,} parameters, the released file has {expected:,}")


def _autoencoder(path: Path) -> str:
    from cheff.checkpoints import load_autoencoder

    _expect("autoencoder", _count(load_autoencoder(path)), 55_312_063)
    return "KL autoencoder, 55,312,063 parameters"


def _ldm(unet: int, text: int | None) -> Callable[[Path], str]:
    def check(path: Path) -> str:
        from cheff.checkpoints import load_ldm

        model = load_ldm(path)
        _expect("U-Net", _count(model.unet), unet)
        if text is not None:
            if model.text_encoder is None:
                raise WeightsError("no text encoder (cond_stage_model.*): not the report model")
            _expect("text encoder", _count(model.text_encoder), text)
        return f"LDM, U-Net {unet:,} parameters" + (f", text encoder {text:,}" if text else "")

    return check


def _sr(path: Path) -> str:
    from cheff.checkpoints import load_sr

    _expect("SR U-Net", _count(load_sr(path)), 91_396_671)
    return "SR U-Net, 91,396,671 parameters"


def _inception(path: Path) -> str:
    from cheff.models.inception import FIDInceptionV3

    FIDInceptionV3.from_file(path)
    return "FID Inception-v3, 472 tensors"


def _vgg16(path: Path) -> str:
    from cheff.models.perceptual import LPIPS

    LPIPS().load_vgg16(path)
    return "torchvision vgg16 features"


def _lpips_heads(path: Path) -> str:
    from cheff.models.perceptual import LPIPS

    LPIPS().load_heads(path)
    return "LPIPS v0.1 linear heads"


def _vocab(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != 30522:
        raise WeightsError(f"{len(lines)} tokens, bert-base-uncased has 30,522")
    for token, index in (("[PAD]", 0), ("[CLS]", 101), ("[SEP]", 102)):
        if lines[index].strip() != token:
            raise WeightsError(f"line {index} is {lines[index]!r}, expected {token}")
    return "BERT uncased WordPiece vocabulary, 30,522 tokens"


@dataclass(frozen=True)
class WeightsFile:
    name: str
    purpose: str
    source: str
    check: Callable[[Path], str]
    # Published digests, where anyone publishes one (see docs/weights.md for where from);
    # the Cheff authors publish none for their five files.
    sha256: str | None = None
    md5: str | None = None


KNOWN: tuple[WeightsFile, ...] = (
    WeightsFile(
        "cheff_autoencoder.pt",
        "the KL autoencoder",
        "the Cheff authors' release, linked from the paper's code repository",
        _autoencoder,
    ),
    WeightsFile(
        "cheff_diff_uncond.pt",
        "unconditional LDM",
        "the Cheff release",
        _ldm(274_056_163, None),
    ),
    WeightsFile(
        "cheff_diff_t2i.pt",
        "report-conditioned LDM",
        "the Cheff release",
        _ldm(518_166_659, 582_087_482),
    ),
    WeightsFile("cheff_sr_base.pt", "super-resolution, base", "the Cheff release", _sr),
    WeightsFile("cheff_sr_fine.pt", "super-resolution, fine-tuned", "the Cheff release", _sr),
    WeightsFile(
        "pt_inception-2015-12-05-6726825d.pth",
        "FID / KID Inception",
        "github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
        _inception,
        sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    ),
    WeightsFile(
        "vgg16-397923af.pth",
        "LPIPS backbone (autoencoder training)",
        "download.pytorch.org/models/vgg16-397923af.pth (torchvision)",
        _vgg16,
        sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
    ),
    WeightsFile(
        "vgg.pth",
        "LPIPS v0.1 heads (autoencoder training)",
        "github.com/richzhang/PerceptualSimilarity, lpips/weights/v0.1/vgg.pth",
        _lpips_heads,
        md5="d507d7349b931f0638a25a48a722f98a",
    ),
    WeightsFile(
        "vocab.txt",
        "report tokenizer (released t2i model)",
        "huggingface.co/bert-base-uncased (vocab.txt)",
        _vocab,
        sha256="07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    ),
)


def _check_digests(known: WeightsFile, path: Path, sha256: str) -> None:
    """A file whose published digest differs is another file, whatever its content."""
    if known.sha256 and sha256 != known.sha256:
        raise WeightsError(
            f"sha256 {sha256[:12]}..., the published file has {known.sha256[:12]}..."
        )
    if known.md5:
        md5 = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
        if md5 != known.md5:
            raise WeightsError(f"md5 {md5}, the published file has {known.md5}")


@dataclass(frozen=True)
class Verified:
    file: WeightsFile
    path: Path | None  # None: missing
    ok: bool
    detail: str
    sha256: str | None = None


def verify(folder: str | Path, names: list[str] | None = None) -> list[Verified]:
    """Check the known files in ``folder`` (or only ``names``); missing ones are reported.
    An unknown name is refused: skipping it would pass a check that never ran."""
    from cheff.latents import file_sha256

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    known_names = [known.name for known in KNOWN]
    unknown = [name for name in names or () if name not in known_names]
    if unknown:
        raise ValueError(
            f"--only {', '.join(unknown)}: not a known weights file; known: "
            f"{', '.join(known_names)}"
        )
    results = []
    for known in KNOWN:
        if names and known.name not in names:
            continue
        path = folder / known.name
        if not path.is_file():
            results.append(Verified(known, None, False, f"missing; get it from {known.source}"))
            continue
        digest = file_sha256(path)
        try:
            _check_digests(known, path, digest)
            detail = known.check(path)
            results.append(Verified(known, path, True, detail, digest))
        except Exception as error:  # a wrong file of any kind is a failed check, not a crash
            results.append(Verified(known, path, False, str(error), digest))
    return results
