"""``cheff train sr``: the super-resolution model trained on MaCheX pairs, fine-tuned on the
autoencoder's reconstructions, resumed exactly. The 32-image training fixture."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAINING_HOLDOUT
from PIL import Image

from cheff.checkpoints import load_autoencoder, load_sr, read_image_size, read_low_size
from cheff.config import PRESETS, SR_FINETUNE, SRTrainConfig, apply_overrides
from cheff.diffusion import NoiseSchedule
from cheff.glue import official_glue
from cheff.train.loop import TrainingError, checkpoint_dirs
from cheff.train.sr import SR_FILE, SRTask, train_sr
from cheff.upscale import Upscaler
from machex import resize


def configure(data: Path, **extra: object) -> SRTrainConfig:
    settings = {"data.data": str(data), "data.holdout": TRAINING_HOLDOUT, "train.log_every": 1}
    return apply_overrides(PRESETS["tiny"].train_sr, settings | extra)


def losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as handle:
        return [float(row["unet/total"]) for row in csv.DictReader(handle)]


def test_the_tiny_sr_preset_loss_falls(training_collection: Path, tmp_path: Path) -> None:
    config = configure(training_collection)
    assert (config.train.max_steps, config.data.image_size, config.low_size) == (200, 64, 16)
    _, task = train_sr(config, tmp_path / "run", progress=False)
    values = losses(tmp_path / "run")
    first, last = np.mean(values[:20]), np.mean(values[-20:])
    assert len(values) == 200
    assert last <= 0.7 * first, f"mean loss {first:.3f} over the first 20 steps, {last:.3f} last"
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 2
    model = load_sr(checkpoint_dirs(tmp_path / "run")[-1] / SR_FILE)
    trained = task.unet.state_dict()
    assert all(torch.equal(model.unet.state_dict()[k], trained[k]) for k in trained)


def test_pairs_base_and_fine_tuned(ae_path: Path) -> None:
    config = configure(Path("unused"))
    high = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    base = SRTask(config)
    torch.testing.assert_close(base.low_resolution(high), resize(high, 16))
    x0, condition = base.pair({"image": high * 2 - 1})
    torch.testing.assert_close(x0, high * 2 - 1)
    assert condition.shape == (2, 1, 64, 64)

    autoencoder = load_autoencoder(ae_path)
    fine = SRTask(config, autoencoder=autoencoder)
    low = fine.low_resolution(high)
    with torch.no_grad():
        x = (resize(high, 16) * 2 - 1).expand(-1, 3, -1, -1)
        expected = official_glue(autoencoder.decode(autoencoder.encode(x).mean))
    torch.testing.assert_close(low, expected)
    assert torch.equal(low * 255, (low * 255).round())  # 8-bit, as the cascade hands it over


def test_fine_tuning_starts_from_the_base_and_resumes_exactly(
    training_collection: Path,
    ae_path: Path,
    tmp_path: Path,
    step_reads: list[str],
    step_float64: list[str],
) -> None:
    quick = {"train.max_steps": 2, "train.checkpoint_every": 2, "grid_steps": 2}
    train_sr(configure(training_collection, **quick), tmp_path / "base", progress=False)
    base_file = checkpoint_dirs(tmp_path / "base")[-1] / SR_FILE
    fine = configure(
        training_collection,
        **{
            "finetune_from": str(base_file),
            "ae": str(ae_path),
            "train.max_steps": 4,
            "train.checkpoint_every": 2,
            "grid_steps": 2,
        },
    )
    _, task = train_sr(
        apply_overrides(fine, {"train.max_steps": 2}), tmp_path / "a", progress=False
    )
    train_sr(fine, tmp_path / "a", resume=True, progress=False)
    train_sr(fine, tmp_path / "b", progress=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert task.autoencoder is not None
    a = load_sr(checkpoint_dirs(tmp_path / "a")[-1] / SR_FILE).state_dict()
    b = load_sr(checkpoint_dirs(tmp_path / "b")[-1] / SR_FILE).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_sr(base_file).state_dict()
    assert not all(torch.equal(a[k], base[k]) for k in a)  # it trained on from the base
    assert SR_FINETUNE["paper"] == {"train.max_steps": 500_000, "train.lr": 2e-5}
    assert step_reads == []  # no step waited for the device (the fine-tuning inputs included)
    assert step_float64 == []  # nor computed in float64 (Apple's MPS has none)


def test_cli_train_sr_and_its_errors(training_collection: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    runner = CliRunner()
    args = ["train", "sr", "--data", str(training_collection), "--preset", "tiny"]
    args += ["--holdout", TRAINING_HOLDOUT, "-q", "--set", "grid_steps=2"]
    result = runner.invoke(app, [*args, "--run", str(tmp_path / "run"), "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["low_size"] == 16 and saved["loss"] == "l1"
    # The file records the sides it was trained at; upscale defaults to them (16 -> 64 px),
    # where it used to read 256 px inputs and write 1024 px images.
    trained = checkpoint_dirs(tmp_path / "run")[-1] / SR_FILE
    assert (read_image_size(trained), read_low_size(trained)) == (64, 16)
    assert Upscaler.from_checkpoint(trained, device="cpu").size == 64
    # The file keeps the run's noise schedule; the upscaler takes it (it took the paper's).
    result = runner.invoke(
        app, [*args, "--run", str(tmp_path / "s"), "--max-steps", "1", "--set", "schedule.s=0.02"]
    )
    assert result.exit_code == 0, result.output
    other = checkpoint_dirs(tmp_path / "s")[-1] / SR_FILE
    expected = NoiseSchedule.sr_cosine(s=0.02)
    for path, schedule in ((other, expected), (trained, NoiseSchedule.sr_cosine())):
        assert load_sr(path).schedule is not None  # stored, the paper's included
        used = Upscaler.from_checkpoint(path, device="cpu").schedule
        assert torch.equal(used.alphas_cumprod, schedule.alphas_cumprod)
        assert used.ddim_offset == schedule.ddim_offset == 0
    assert not torch.equal(expected.alphas_cumprod, NoiseSchedule.sr_cosine().alphas_cumprod)
    given = NoiseSchedule.sr_cosine(timesteps=100)  # an explicit schedule= still wins
    assert Upscaler(load_sr(other), size=64, device="cpu", schedule=given).schedule is given
    # Fine-tuning a base trained on another schedule under this run's is refused.
    fine = ["--run", str(tmp_path / "f"), "--max-steps", "1", "--finetune-from", str(other)]
    result = runner.invoke(app, [*args, *fine])
    assert result.exit_code != 0 and "another noise schedule" in result.output
    assert "--set schedule.timesteps=... --set schedule.s=..." in result.output
    result = runner.invoke(app, [*args, *fine, "--set", "schedule.s=0.02"])
    assert result.exit_code == 0, result.output
    Image.fromarray(np.full((40, 30), 128, np.uint8)).save(tmp_path / "in.png")
    command = ["upscale", str(tmp_path / "in.png"), "--sr", str(trained), "--steps", "1"]
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "up"), "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "64 px" in result.output
    with Image.open(tmp_path / "up" / "in.png") as image:
        assert image.size == (64, 64)
    assert json.loads((tmp_path / "up" / "upscale.json").read_text())["sr_size"] == 64
    result = runner.invoke(
        app, [*args, "--run", str(tmp_path / "x"), "--finetune-from", str(tmp_path / "none.pt")]
    )
    assert result.exit_code == 2 and "no such file" in result.output
    with pytest.raises(ValueError, match="low_size 64 must be below"):
        apply_overrides(PRESETS["tiny"].train_sr, {"low_size": "64"})
    with pytest.raises(TrainingError, match="not found"):
        train_sr(configure(training_collection, ae="absent.safetensors"), tmp_path / "y")


def test_the_paper_sr_preset() -> None:
    paper = PRESETS["paper"].train_sr
    train = paper.train
    assert (train.batch_size, train.lr, train.max_steps) == (32, 5e-5, 1_000_000)
    assert (paper.data.image_size, paper.low_size) == (1024, 256)
    assert paper.model.dim == 16 and paper.model.dim_mults == (1, 2, 4, 8, 16, 32, 32, 32)
    assert (paper.schedule.timesteps, paper.schedule.s) == (2000, 0.008)
