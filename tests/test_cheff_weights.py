"""``cheff weights verify``: right files pass, wrong ones fail with the reason, missing ones
are listed with where to get them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cheff.weights import KNOWN, verify
from cli.cheff_cli import app

PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "cheff-official" / "parity"


def _vocab(path: Path) -> None:
    tokens = [f"[unused{i}]" for i in range(30522)]
    tokens[0], tokens[100], tokens[101], tokens[102] = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
    path.write_text("\n".join(tokens) + "\n")


def test_verify_reports_right_wrong_and_missing_files(tmp_path: Path) -> None:
    _vocab(tmp_path / "vocab.txt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    (tmp_path / "vgg.pth").write_bytes(b"not a checkpoint")
    results = {result.file.name: result for result in verify(tmp_path)}
    assert set(results) == {known.name for known in KNOWN}
    assert results["vocab.txt"].ok and "30,522" in results["vocab.txt"].detail
    inception = results["pt_inception-2015-12-05-6726825d.pth"]
    assert not inception.ok and "the file name promises 6726825d" in inception.detail
    assert not results["vgg.pth"].ok and results["vgg.pth"].sha256 is not None
    missing = results["cheff_sr_fine.pt"]
    assert missing.path is None and "missing; get it from" in missing.detail


def test_a_tiny_fixture_is_not_the_released_model(tmp_path: Path) -> None:
    fixture = PARITY / "sr" / "tiny_sr.pt"
    if not fixture.is_file():
        pytest.skip(f"needs {fixture}")
    shutil.copy(fixture, tmp_path / "cheff_sr_base.pt")
    (result,) = verify(tmp_path, ["cheff_sr_base.pt"])
    assert not result.ok and "194,989 parameters, the released file has 91,396,671" in result.detail


def test_cli_exit_codes(tmp_path: Path) -> None:
    _vocab(tmp_path / "vocab.txt")
    runner = CliRunner()
    good = runner.invoke(app, ["weights", "verify", str(tmp_path), "--only", "vocab.txt"])
    assert good.exit_code == 0 and "ok" in good.output and "sha256" in good.output
    everything = runner.invoke(app, ["weights", "verify", str(tmp_path)])
    assert everything.exit_code == 1 and "missing" in everything.output
    assert runner.invoke(app, ["weights", "verify", str(tmp_path / "nope")]).exit_code == 2
