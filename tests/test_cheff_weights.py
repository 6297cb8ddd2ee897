"""``cheff weights verify``: right files pass, wrong ones fail with the reason, missing ones
are listed with where to get them."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cheff.weights
from cheff.latents import file_sha256
from cheff.weights import KNOWN, verify
from cli.cheff_cli import app

PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "cheff-official" / "parity"


def _vocab(path: Path) -> None:
    tokens = [f"[unused{i}]" for i in range(30522)]
    tokens[0], tokens[100], tokens[101], tokens[102] = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
    path.write_text("\n".join(tokens) + "\n")


def _publish(monkeypatch: pytest.MonkeyPatch, name: str, path: Path) -> None:
    """Pretend ``path`` is the published file ``name`` (we hold none of the real ones)."""
    known = tuple(
        dataclasses.replace(k, sha256=file_sha256(path)) if k.name == name else k for k in KNOWN
    )
    monkeypatch.setattr(cheff.weights, "KNOWN", known)


def test_verify_reports_right_wrong_and_missing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _vocab(tmp_path / "vocab.txt")
    _publish(monkeypatch, "vocab.txt", tmp_path / "vocab.txt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    (tmp_path / "vgg.pth").write_bytes(b"not a checkpoint")
    results = {result.file.name: result for result in verify(tmp_path)}
    assert set(results) == {known.name for known in KNOWN}
    assert results["vocab.txt"].ok and "30,522" in results["vocab.txt"].detail
    inception = results["pt_inception-2015-12-05-6726825d.pth"]
    assert not inception.ok and "the published file has 6726825d0af5" in inception.detail
    assert not results["vgg.pth"].ok and results["vgg.pth"].sha256 is not None
    assert "the published file has d507d7349b931f0638a25a48a722f98a" in results["vgg.pth"].detail
    missing = results["cheff_sr_fine.pt"]
    assert missing.path is None and "missing; get it from" in missing.detail


def test_right_content_but_not_the_published_bytes_fails(tmp_path: Path) -> None:
    """A home-made BERT vocabulary passes the content check but is not bert-base-uncased's."""
    _vocab(tmp_path / "vocab.txt")
    (result,) = verify(tmp_path, ["vocab.txt"])
    assert not result.ok and "the published file has 07eced375cec" in result.detail


def test_a_tiny_fixture_is_not_the_released_model(tmp_path: Path) -> None:
    fixture = PARITY / "sr" / "tiny_sr.pt"
    if not fixture.is_file():
        pytest.skip(f"needs {fixture}")
    shutil.copy(fixture, tmp_path / "cheff_sr_base.pt")
    (result,) = verify(tmp_path, ["cheff_sr_base.pt"])
    assert not result.ok and "194,989 parameters, the released file has 91,396,671" in result.detail


def test_cli_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _vocab(tmp_path / "vocab.txt")
    _publish(monkeypatch, "vocab.txt", tmp_path / "vocab.txt")
    runner = CliRunner()
    good = runner.invoke(app, ["weights", "verify", str(tmp_path), "--only", "vocab.txt"])
    assert good.exit_code == 0 and "ok" in good.output and "sha256" in good.output
    everything = runner.invoke(app, ["weights", "verify", str(tmp_path)])
    assert everything.exit_code == 1 and "missing" in everything.output
    assert runner.invoke(app, ["weights", "verify", str(tmp_path / "nope")]).exit_code == 2


def test_an_unknown_name_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    """A typo in --only used to check nothing and exit 0."""
    with pytest.raises(ValueError, match="typo.pt: not a known weights file; known: .*vocab.txt"):
        verify(tmp_path, ["vocab.txt", "typo.pt"])
    result = CliRunner().invoke(app, ["weights", "verify", str(tmp_path), "--only", "typo.pt"])
    assert result.exit_code == 2 and "typo.pt" in result.output and "vocab.txt" in result.output
