"""The shared training loop, through its first user: ``cheff train ae``.

A fixture MaCheX of 32 training images (ChestX-ray14 + CheXpert miniatures, 34 images, minus
a 2-image held-out set that training must leave out).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TRAINING_HOLDOUT
from typer.testing import CliRunner

from cheff.checkpoints import load_autoencoder
from cheff.config import PRESETS, AETrainConfig, apply_overrides
from cheff.train import loop
from cheff.train.ae import AutoencoderTask, build_perceptual, train_autoencoder
from cheff.train.loop import TrainingError, checkpoint_dirs
from cheff.train.stopping import TrainingStopped
from cli.cheff_cli import app
from machex import MaCheX, load_manifest

HOLDOUT = TRAINING_HOLDOUT


@pytest.fixture(scope="module")
def data(training_collection: Path) -> Path:
    return training_collection


def quick(data: Path, **overrides: object) -> AETrainConfig:
    """A few steps at 32 px with every part of the loop switched on."""
    settings = {
        "data.data": str(data),
        "data.holdout": HOLDOUT,
        "data.image_size": 32,
        "train.batch_size": 4,
        "train.grad_accum": 2,
        "train.grad_clip": 1.0,
        "train.ema_decay": 0.9,
        "train.max_steps": 6,
        "train.checkpoint_every": 3,
        "train.log_every": 1,
        "train.image_every": 3,
        "loss.disc_start": 2,  # both optimisers step
    }
    return apply_overrides(PRESETS["tiny"].train_ae, settings | overrides)


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in r.items() if k != "it_per_s"} for r in csv.DictReader(handle)]


def test_training_leaves_the_holdout_out(data: Path) -> None:
    from cheff.train.data import open_stream

    stream = open_stream(quick(data).data, 4, 0)
    held = set(load_manifest(data, "images").key) - set(stream.dataset._keys)
    assert stream.epoch_size == 32 and len(held) == 2


def test_resume_equals_the_uninterrupted_run(data: Path, tmp_path: Path) -> None:
    config = quick(data)
    train_autoencoder(config, tmp_path / "straight", progress=False)
    halfway = apply_overrides(config, {"train.max_steps": 3})
    train_autoencoder(halfway, tmp_path / "resumed", progress=False)
    train_autoencoder(config, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [str(s) for s in range(1, 7)]
    assert "disc/total" in straight[-1] and straight[-1]["disc/total"]
    assert resumed == straight  # every loss of every step, to the last digit
    a = checkpoint_dirs(tmp_path / "straight")[-1] / "autoencoder.safetensors"
    b = checkpoint_dirs(tmp_path / "resumed")[-1] / "autoencoder.safetensors"
    weights_a, weights_b = load_autoencoder(a).state_dict(), load_autoencoder(b).state_dict()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert len(list((tmp_path / "straight" / "images").glob("*.png"))) == 2
    assert (tmp_path / "straight" / "tensorboard").is_dir()


def test_an_existing_run_needs_resume(data: Path, tmp_path: Path) -> None:
    config = quick(data, **{"train.max_steps": 1, "train.checkpoint_every": 1})
    train_autoencoder(config, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train_autoencoder(config, tmp_path / "run", progress=False)


def test_a_non_finite_loss_stops_keeping_the_last_good_checkpoint(
    data: Path, tmp_path: Path, monkeypatch
) -> None:
    real_loss = AutoencoderTask.loss

    def diverging(self, name, batch, step, generator):
        loss, logs = real_loss(self, name, batch, step, generator)
        return (loss * math.nan if step == 4 else loss), logs

    monkeypatch.setattr(AutoencoderTask, "loss", diverging)
    run = tmp_path / "run"
    # The loss of step index 4 is step 5's, as metrics.csv numbers it (it said "step 4").
    with pytest.raises(TrainingError, match="loss is nan at step 5") as error:
        train_autoencoder(quick(data), run, progress=False)
    (last,) = checkpoint_dirs(run)
    assert last.name == "step-00000003" and str(last) in str(error.value)
    load_autoencoder(last / "autoencoder.safetensors")  # intact


def test_a_failed_checkpoint_write_keeps_the_previous_one(
    data: Path, tmp_path: Path, monkeypatch
) -> None:
    calls = []
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(loop.torch, "save", disk_full)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="No space left on device") as error:
        train_autoencoder(quick(data), run, progress=False)
    (last,) = checkpoint_dirs(run)
    assert last.name == "step-00000003" and "--resume" in str(error.value)
    assert not list((run / "checkpoints").glob("*.tmp"))
    load_autoencoder(last / "autoencoder.safetensors")


@pytest.mark.parametrize("library", ["torch", "safetensors"])
def test_a_full_disk_as_the_libraries_report_it_is_a_training_error(
    data: Path, tmp_path: Path, monkeypatch, library: str
) -> None:
    """A full disk is no OSError there: torch.save raises a RuntimeError from its zip writer,
    safetensors a SafetensorError. Both gave a traceback and left the .tmp folder behind."""
    import safetensors.torch
    from safetensors import SafetensorError

    calls = []
    if library == "torch":
        real, owner = torch.save, loop.torch
        error = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64")
    else:
        real, owner = safetensors.torch.save_file, safetensors.torch
        error = SafetensorError("Error while serializing: File too large (os error 27)")

    def full(*args, **kwargs):
        calls.append(args)
        if len(calls) == (2 if library == "torch" else 3):  # the second checkpoint's
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, "save" if library == "torch" else "save_file", full)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="could not write the checkpoint of step 6"):
        train_autoencoder(quick(data, **{"train.ema_decay": None}), run, progress=False)
    assert [d.name for d in checkpoint_dirs(run)] == ["step-00000003"]
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_an_ema_switched_on_at_a_resume_averages_the_resumed_weights(
    data: Path, tmp_path: Path, caplog
) -> None:
    """The EMA was made from the freshly initialised model before the checkpoint loaded,
    and a checkpoint without an EMA left it there: the averaged weights kept 0.999^n of the
    random initialisation. The autoencoder's average was not written at all."""
    config = quick(data, **{"train.ema_decay": None, "loss.disc_start": 100})
    run = tmp_path / "run"
    train_autoencoder(apply_overrides(config, {"train.max_steps": 3}), run, progress=False)
    on = apply_overrides(config, {"train.ema_decay": 0.999, "train.max_steps": 4})
    with caplog.at_level(logging.WARNING, logger="cheff.train.loop"):
        train_autoencoder(on, run, resume=True, progress=False)
    assert "holds no EMA: the EMA starts from its weights" in caplog.text
    resumed, folder = checkpoint_dirs(run)[-2:]
    assert (resumed.name, folder.name) == ("step-00000003", "step-00000004")
    at_resume = load_autoencoder(resumed / "autoencoder.safetensors").state_dict()
    ema = load_autoencoder(folder / "autoencoder-ema.safetensors").state_dict()
    torch.manual_seed(config.train.seed)
    initial = AutoencoderTask(config, torch.nn.Module()).model.state_dict()
    # One step of decay 0.999 from the resumed weights: 0.001 of one step's change away.
    to_resumed = max((ema[k] - at_resume[k]).abs().max().item() for k in ema)
    to_initial = max((ema[k] - initial[k]).abs().max().item() for k in ema)
    assert to_resumed < to_initial / 50


def test_tensorboard_of_a_resumed_run_has_each_step_once(data: Path, tmp_path: Path) -> None:
    """Steps logged after the checkpoint a run resumes from were logged again (the CSV drops
    them; the event files kept both)."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    config = quick(data, **{"train.ema_decay": None})
    train_autoencoder(config, run, progress=False)
    shutil.rmtree(checkpoint_dirs(run)[-1])  # a crash after step 6 was logged, before saving
    train_autoencoder(config, run, resume=True, progress=False)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("ae/total")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor via /proc")
def test_checkpoint_files_reach_the_disk_before_their_folder_is_named(
    data: Path, tmp_path: Path, monkeypatch
) -> None:
    """The rename that makes step-N/ a checkpoint could reach the disk before its files' data:
    after a power loss, resume would load truncated files from a folder that looks complete."""
    synced = []
    real = os.fsync

    def record(descriptor: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        real(descriptor)

    monkeypatch.setattr(loop.os, "fsync", record)
    run = tmp_path / "run"
    config = quick(data, **{"train.max_steps": 3, "train.ema_decay": None})
    train_autoencoder(config, run, progress=False)
    (folder,) = checkpoint_dirs(run)
    tmp = folder.with_name(folder.name + ".tmp")
    files = {tmp / path.name for path in folder.iterdir()}
    assert {f.name for f in files} == {
        "autoencoder.safetensors",
        "discriminator.safetensors",
        "state.pt",
    }
    assert files <= set(synced) and tmp in synced
    assert synced.index(folder.parent) > max(synced.index(f) for f in files)  # then the rename


def test_only_the_last_k_checkpoints_are_kept(data: Path, tmp_path: Path) -> None:
    config = quick(data, **{"train.max_steps": 4, "train.checkpoint_every": 1})
    config = apply_overrides(config, {"train.keep_last": 2})
    train_autoencoder(config, tmp_path / "run", progress=False)
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == [
        "step-00000003",
        "step-00000004",
    ]


def test_an_unreadable_sample_is_skipped_and_logged(data: Path, tmp_path: Path, caplog) -> None:
    import shutil

    copy = tmp_path / "machex"
    shutil.copytree(data, copy)
    images = load_manifest(copy, "images")
    row = images[images.key.isin(MaCheX(copy, splits=None, exclude_holdout=HOLDOUT)._keys)].iloc[0]
    with open(copy / row.shard, "r+b") as handle:  # destroy the image's JPEG header
        handle.seek(int(row.offset))
        handle.write(b"\0" * 64)
    config = quick(copy, **{"train.max_steps": 9, "train.batch_size": 8, "train.grad_accum": 1})
    with caplog.at_level(logging.WARNING):
        train_autoencoder(config, tmp_path / "run", progress=False)
    assert f"skipping unreadable sample {row.key}" in caplog.text
    assert len(rows(tmp_path / "run")) == 9


def test_the_paper_preset_refuses_to_start_without_perceptual_weights(caplog) -> None:
    with pytest.raises(TrainingError, match="--perceptual-vgg16"):
        build_perceptual(PRESETS["paper"].train_ae)
    tiny = apply_overrides(PRESETS["tiny"].train_ae, {"loss.perceptual_weight": 1.0})
    with caplog.at_level(logging.WARNING):
        assert not build_perceptual(tiny).pretrained
    assert "RANDOM VGG16 features" in caplog.text


def test_presets_hold_the_paper_numbers() -> None:
    paper = PRESETS["paper"].train_ae
    assert (paper.train.lr, paper.train.batch_size, paper.train.epochs) == (4.5e-6, 64, 3.0)
    assert paper.train.betas == (0.5, 0.9)
    loss = paper.loss
    assert (loss.perceptual_weight, loss.kl_weight, loss.disc_start, loss.disc_weight) == (
        1.0,
        1e-6,
        5001,
        0.5,
    )
    with pytest.raises(ValueError, match="is not one of"):
        apply_overrides(paper, {"train.learning_rate": "1"})
    with pytest.raises(ValueError, match="expected"):
        apply_overrides(paper, {"train.max_steps": "many"})


def test_cli_train_ae_runs_and_refuses_bad_settings(data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["train", "ae", "--data", str(data), "--preset", "tiny", "-q", "--image-size", "32"]
    result = runner.invoke(app, [*args, "--run", str(tmp_path / "r"), "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "effective batch 8 (8 per device x 1 accumulated x 1 devices), lr 0.002" in result.stdout
    assert "leaving out the held-out set 'held-2'" in result.output
    result = runner.invoke(app, [*args, "--run", str(tmp_path / "r2"), "--set", "train.nope=1"])
    assert result.exit_code == 2 and "is not one of" in result.output
    result = runner.invoke(app, [*args, "--run", str(tmp_path / "r3"), "--holdout", "absent"])
    assert result.exit_code == 2 and "no held-out set 'absent'" in result.output
    for where in ("foo == 1", "Edema ==="):  # an unknown column; not Python
        result = runner.invoke(app, [*args, "--run", str(tmp_path / "r4"), "--where", where])
        assert result.exit_code == 2 and f"where={where!r}" in result.output, result.output


@pytest.mark.slow
def test_the_tiny_preset_reaches_28_db_on_its_32_images(data: Path, tmp_path: Path) -> None:
    """The preset's promise is 28 dB within its 300 steps; half of them already get there
    (30.7 dB on one thread; 32.6 dB after all 300), at half the test's time."""
    preset = apply_overrides(
        PRESETS["tiny"].train_ae, {"data.data": str(data), "data.holdout": HOLDOUT}
    )
    assert preset.train.max_steps == 300
    config = apply_overrides(preset, {"train.max_steps": 150})
    _, task = train_autoencoder(config, tmp_path / "run", progress=False)
    dataset = MaCheX(data, splits=None, exclude_holdout=HOLDOUT, image_size=config.data.image_size)
    assert len(dataset) == 32
    x = torch.stack([dataset[i]["image"] for i in range(len(dataset))])  # [0, 1]
    with torch.no_grad():
        decoded = task.model.eval().reconstruct((x * 2 - 1).expand(-1, 3, -1, -1))
    reconstruction = ((decoded.mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1)
    mse = ((reconstruction - x) ** 2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(1 / mse)
    assert psnr.mean() >= 28.0, f"mean PSNR {psnr.mean():.2f} dB"


def test_a_resumed_run_takes_its_new_learning_rate_and_says_so(
    data: Path, tmp_path: Path, caplog
) -> None:
    """The optimiser's moments come from the checkpoint, its lr from the command line (the
    stored one used to win silently while metrics.csv showed the new one)."""
    from cheff.checkpoints import safe_torch_load

    config = quick(data, **{"train.max_steps": 1, "train.checkpoint_every": 1})
    train_autoencoder(config, tmp_path / "run", progress=False)
    lower = apply_overrides(config, {"train.max_steps": 2, "train.lr": "1e-7"})
    with caplog.at_level(logging.WARNING, logger="cheff.train"):
        train_autoencoder(lower, tmp_path / "run", resume=True, progress=False)
    state = safe_torch_load(checkpoint_dirs(tmp_path / "run")[-1] / loop.STATE_FILE)
    groups = state["optimizers"]["ae"]["param_groups"]
    assert state["step"] == 2 and {group["lr"] for group in groups} == {1e-7}
    assert "resumed with train.lr = 1e-07 (the checkpoint's run had 0.002)" in caplog.text


def test_a_setting_newer_than_the_resumed_run_is_named_as_such(caplog) -> None:
    """A run started before a setting existed (train.cudnn_benchmark) did not record it: the
    warning says so, rather than that the run "had None"."""
    stored = {"train": {"lr": 0.002}}
    current = {"train": {"lr": 0.002, "cudnn_benchmark": True}}
    with caplog.at_level(logging.WARNING, logger="cheff.train"):
        loop._warn_changed_settings(stored, current)
    assert "resumed with train.cudnn_benchmark = True (a setting the checkpoint's run did " in (
        caplog.text
    )
    assert "had None" not in caplog.text and "train.lr" not in caplog.text


def test_a_resume_may_not_change_the_image_selection(data: Path, tmp_path: Path) -> None:
    """The saved stream position counts images of the run's selection: a resume on another
    (here the paper preset's composition, which runs started before it did not have) would
    go on silently over other images; it is refused, saying how to resume."""
    config = quick(data, **{"train.max_steps": 1, "train.checkpoint_every": 1})
    train_autoencoder(config, tmp_path / "run", progress=False)
    stored = (tmp_path / "run" / "config.json").read_text()
    other = apply_overrides(config, {"train.max_steps": 2, "data.composition": "paper-2023"})
    with pytest.raises(
        TrainingError,
        match=r"composition: None -> 'paper-2023'.*"
        r"--set data.composition=none",
    ):
        train_autoencoder(other, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "config.json").read_text() == stored  # untouched
    again = apply_overrides(other, {"data.composition": "none"})
    info, _ = train_autoencoder(again, tmp_path / "run", resume=True, progress=False)
    assert info.start_step == 1


def test_resuming_past_max_steps_is_refused_and_at_it_does_nothing(
    data: Path, tmp_path: Path
) -> None:
    config = quick(data, **{"train.max_steps": 2, "train.checkpoint_every": 1})
    train_autoencoder(config, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "metrics.csv").read_text()
    info, _ = train_autoencoder(config, tmp_path / "run", resume=True, progress=False)
    assert info.start_step == 2 and (tmp_path / "run" / "metrics.csv").read_text() == before
    fewer = apply_overrides(config, {"train.max_steps": 1})
    with pytest.raises(TrainingError, match="at step 2, past --max-steps 1"):
        train_autoencoder(fewer, tmp_path / "run", resume=True, progress=False)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"train.image_every": "0"}, "image_every must be at least 1"),
        ({"train.betas": "0.9"}, "betas: two numbers"),
        ({"train.ema_decay": "1.5"}, "ema_decay must be in"),
        ({"train.lr": "abc"}, "expected float"),
    ],
)
def test_bad_loop_settings_are_refused_by_name(setting, message) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(PRESETS["tiny"].train_ae, setting)


def test_a_device_that_does_not_exist_is_a_clear_error() -> None:
    from cheff.devices import DeviceError, resolve_device

    with pytest.raises(DeviceError, match="not a device name"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(TrainingError, match="not a device name"):
        loop.select_device("gpu")
    assert resolve_device("cpu").type == "cpu" and resolve_device(None).type in ("cpu", "cuda")


def test_the_autoencoder_refuses_gradient_checkpointing_it_would_ignore() -> None:
    with pytest.raises(ValueError, match="grad_checkpointing: the autoencoder"):
        apply_overrides(PRESETS["tiny"].train_ae, {"train.grad_checkpointing": "true"})


def test_a_run_folder_that_cannot_be_made_is_a_training_error(data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = quick(data, **{"train.max_steps": 1})
    with pytest.raises(TrainingError, match=r"--run .*file is a file; expected a folder"):
        train_autoencoder(config, blocker / "run", progress=False)


# --------------------------------------------------------------------------- no waiting


def test_a_training_step_never_reads_a_value_from_the_device(
    data: Path, tmp_path: Path, step_reads: list[str], step_float64: list[str]
) -> None:
    """Both optimisers, accumulation, clipping, EMA: the step leaves every value on the device
    (the loss's finiteness included) and computes nothing in float64 (MPS has none); the log
    steps read them, and the logs are complete."""
    reads = step_reads
    train_autoencoder(quick(data, **{"train.max_steps": 3}), tmp_path / "run", progress=False)
    assert reads == [] and step_float64 == []
    logged = rows(tmp_path / "run")
    assert [r["step"] for r in logged] == ["1", "2", "3"]
    assert all(math.isfinite(float(r["ae/total"])) for r in logged)
    assert logged[-1]["disc/total"] and logged[-1]["ae/grad_norm"]


def test_a_non_finite_loss_is_caught_before_the_next_save(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logged every 100 steps: the loss of step 5 (index 4) is found at the checkpoint of step
    6, before it is written, and named with its own step."""
    real_loss = AutoencoderTask.loss
    seen = []

    def diverging(self, name, batch, step, generator):
        seen.append(step)
        loss, logs = real_loss(self, name, batch, step, generator)
        return (loss * math.inf if step == 4 and name == "disc" else loss), logs

    monkeypatch.setattr(AutoencoderTask, "loss", diverging)
    run = tmp_path / "run"
    config = quick(data, **{"train.log_every": 100, "train.image_every": 100})
    with pytest.raises(TrainingError, match="the disc loss is (nan|inf) at step 5") as error:
        train_autoencoder(config, run, progress=False)
    assert max(seen) == 5  # steps 5 and 6 (index 5) ran, then the check stopped the run
    (last,) = checkpoint_dirs(run)
    assert last.name == "step-00000003" and str(last) in str(error.value)


def test_the_optimizer_kernels_follow_the_setting_also_on_resume(
    data: Path, tmp_path: Path
) -> None:
    """A run stepped with one-tensor-at-a-time Adam resumes with the fused kernels (the
    checkpoint's choice does not come back), and both give the same losses up to rounding."""
    run, other = tmp_path / "run", tmp_path / "fused"
    config = quick(data, **{"train.optimizer_impl": "loop"})
    train_autoencoder(config, other, progress=False)  # the reference: 6 steps, loop kernels
    halfway = apply_overrides(config, {"train.max_steps": 3})
    train_autoencoder(halfway, run, progress=False)
    fused = apply_overrides(config, {"train.optimizer_impl": "fused"})
    _, task = train_autoencoder(fused, run, resume=True, progress=False)
    counts = {}
    for name, optimizer in task.optimizers().items():
        assert all(g["fused"] is True and g["foreach"] is None for g in optimizer.param_groups)
        counts[name] = {float(state["step"]) for state in optimizer.state.values()}
    assert counts == {"ae": {6.0}, "disc": {4.0}}  # the discriminator steps from disc_start 2
    straight, resumed = rows(other), rows(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        for key in a:
            if key != "step" and a[key]:
                assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), key


def test_auto_chooses_fused_adam_on_cuda_only() -> None:
    from cheff.train.optimizers import kernel_choice

    assert kernel_choice("auto", torch.device("cuda", 0)) == (True, None)
    assert kernel_choice("auto", torch.device("cpu")) == (None, None)  # torch's own default
    assert kernel_choice("foreach", torch.device("cuda")) == (None, True)
    assert kernel_choice("loop", torch.device("cuda")) == (None, False)
    with pytest.raises(ValueError, match="optimizer_impl 'fast'"):
        apply_overrides(PRESETS["tiny"].train_ae, {"train.optimizer_impl": "fast"})


def test_use_kernels_puts_the_step_count_where_the_kernels_read_it() -> None:
    """Fused kernels read ``step`` as float32 on the parameter's device, the others on the CPU:
    a state loaded from a run of the other kind is converted (here a float64 count, as a
    float64 default dtype makes), keeping its value."""
    from cheff.train.optimizers import use_kernels

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight])
    weight.grad = torch.ones(3)
    optimizer.step()
    state = optimizer.state[weight]
    state["step"] = state["step"].to(torch.float64)
    use_kernels(optimizer, "fused", torch.device("cpu"))
    assert optimizer.param_groups[0]["fused"] is True
    assert state["step"].dtype == torch.float32 and float(state["step"]) == 1
    optimizer.step()  # the fused kernel accepts it
    assert float(optimizer.state[weight]["step"]) == 2
    use_kernels(optimizer, "loop", torch.device("cpu"))
    assert optimizer.param_groups[0]["fused"] is None
    assert optimizer.param_groups[0]["foreach"] is False
    optimizer.step()
    assert float(optimizer.state[weight]["step"]) == 3
    with pytest.raises(ValueError, match="LBFGS has no choice of kernels"):
        use_kernels(torch.optim.LBFGS([weight]), "fused", torch.device("cpu"))
    use_kernels(torch.optim.LBFGS([weight]), "auto", torch.device("cuda"))  # left as it is


def test_the_ema_averages_every_float_tensor() -> None:
    module = torch.nn.BatchNorm1d(3)  # parameters and float buffers (and an int64 counter)
    ema = loop.EMA(module, decay=0.75)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for value in module.state_dict().values():
            value.add_(4)
    ema.update(module)
    assert set(ema.shadow) == {"weight", "bias", "running_mean", "running_var"}
    for key, value in module.state_dict().items():
        if key in ema.shadow:
            assert torch.allclose(ema.shadow[key], 0.75 * before[key] + 0.25 * value)


def test_logged_values_are_read_in_one_go_in_their_order() -> None:
    from cheff.train.distributed import mean_over_ranks

    values = {"b": torch.tensor(2.5), "a": 1.0, "c": torch.tensor(3, dtype=torch.float64)}
    assert list(mean_over_ranks(values).items()) == [("b", 2.5), ("a", 1.0), ("c", 3.0)]
    assert mean_over_ranks({}) == {}


def test_every_rank_names_the_first_diverged_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On two ranks, both stop at the earliest (step, loss) any rank saw; each says what its
    own loss was."""
    from cheff.train import distributed

    config = PRESETS["tiny"].train_ae
    task = AutoencoderTask(config, build_perceptual(config))
    seen = {0: [("ae loss", 1.0, 3), ("disc loss", math.nan, 5)], 1: [("disc loss", math.inf, 4)]}
    keys = {}
    trainers = {}
    for rank, values in seen.items():
        trainer = loop.Trainer(tmp_path, config.train, task, None, max_steps=9)  # type: ignore[arg-type]
        labels = trainer.watch.labels
        assert labels == ("ae loss", "disc loss", "ae gradient norm", "disc gradient norm")
        for label, value, step in values:
            trainer.watch.observe(label, torch.tensor(value), step)
        first = trainer.watch.first()
        keys[rank] = math.inf if first is None else first[0] * 4 + labels.index(first[1])
        trainers[rank] = trainer
    monkeypatch.setattr(distributed, "smallest_over_ranks", lambda key: min(keys.values()))
    messages = {}
    for rank, trainer in trainers.items():
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, 2))
        with pytest.raises(TrainingError) as error:
            trainer.stop_if_diverged()
        messages[rank] = str(error.value)
    assert (
        "the disc loss is not finite on another rank (rank 0's was finite) at step 4"
        in (messages[0])
    )
    assert "the disc loss is not finite (rank 1 has inf) at step 4" in messages[1]


def test_finite_losses_with_non_finite_gradients_are_not_saved(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overflow in the backward pass alone (the loss stays finite, nothing clips): the
    weights it leaves are checked before the checkpoint of that very step, and not written."""

    class InfiniteGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return x.clone()

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001, ANN205
            return grad * math.inf

    real_loss = AutoencoderTask.loss

    def overflowing(self, name, batch, step, generator):
        loss, logs = real_loss(self, name, batch, step, generator)
        return (InfiniteGradient.apply(loss) if step == 5 and name == "ae" else loss), logs

    monkeypatch.setattr(AutoencoderTask, "loss", overflowing)
    run = tmp_path / "run"
    settings = {"train.grad_clip": None, "train.log_every": 100, "loss.disc_start": 100}
    config = quick(data, **settings)  # the discriminator off: its loss would see the NaNs
    with pytest.raises(
        TrainingError, match="the weights of the checkpoint of step 6 are not finite"
    ) as error:
        train_autoencoder(config, run, progress=False)
    (last,) = checkpoint_dirs(run)
    assert last.name == "step-00000003" and str(last) in str(error.value)
    # With clipping, the gradient norm it computes is watched too, and names the step.
    clipped = apply_overrides(config, {"train.grad_clip": 1.0})
    with pytest.raises(TrainingError, match=r"the ae gradient norm is (inf|nan) at step 6"):
        train_autoencoder(clipped, tmp_path / "clipped", progress=False)
    assert [d.name for d in checkpoint_dirs(tmp_path / "clipped")] == ["step-00000003"]


def test_resuming_another_kind_of_run_names_what_its_checkpoint_holds(
    data: Path, tmp_path: Path
) -> None:
    """`cheff train ae --resume` on an SDM run said only "autoencoder.safetensors: no such
    checkpoint file"."""
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    folder.mkdir(parents=True)
    for name in ("ldm.safetensors", "ldm-ema.safetensors", "state.pt"):
        (folder / name).write_bytes(b"")
    with pytest.raises(TrainingError, match="another kind of run") as error:
        train_autoencoder(quick(data), tmp_path / "run", resume=True, progress=False)
    assert "'ldm.safetensors'" in str(error.value) and str(folder) in str(error.value)
    # The refused resume left the run's record alone (it wrote its own config.json first).
    assert not (tmp_path / "run" / "config.json").exists()


# --------------------------------------------------------------------------- stop signals


def signal_at(step: int, number: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process gets signal ``number`` during the loss of step index ``step`` (what a
    scheduler's notice does at any moment)."""
    real_loss = AutoencoderTask.loss

    def loss(self, name, batch, at, generator):
        if at == step and name == "ae":
            os.kill(os.getpid(), number)
        return real_loss(self, name, batch, at, generator)

    monkeypatch.setattr(AutoencoderTask, "loss", loss)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_a_stop_signal_checkpoints_the_step_and_the_resume_loses_nothing(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM in step 4 (between the checkpoints of steps 3 and 6): the step finishes, a
    checkpoint of step 4 is written, the run stops; resumed, it equals the uninterrupted run."""
    config = quick(data)
    train_autoencoder(config, tmp_path / "straight", progress=False)
    signal_at(3, signal.SIGTERM, monkeypatch)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM at step 4 of 6") as stop:
        train_autoencoder(config, tmp_path / "stopped", progress=False)
    assert stop.value.exit_code == 143 and "--resume" in str(stop.value)
    assert [d.name for d in checkpoint_dirs(tmp_path / "stopped")][-1] == "step-00000004"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    record = json.loads((tmp_path / "stopped" / "stopped.json").read_text())
    assert (record["signal"], record["step"]) == ("SIGTERM", 4)  # for a job script
    monkeypatch.undo()
    train_autoencoder(config, tmp_path / "stopped", resume=True, progress=False)
    assert not (tmp_path / "stopped" / "stopped.json").exists()
    assert rows(tmp_path / "stopped") == rows(tmp_path / "straight")
    a = checkpoint_dirs(tmp_path / "straight")[-1] / "autoencoder.safetensors"
    b = checkpoint_dirs(tmp_path / "stopped")[-1] / "autoencoder.safetensors"
    weights_a, weights_b = load_autoencoder(a).state_dict(), load_autoencoder(b).state_dict()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_a_stop_that_kills_the_loader_mid_group_resumes_at_the_finished_steps_data(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to the whole job kills the DataLoader workers while step 5 gathers its second
    micro-batch (grad_accum 2): the checkpoint of step 4 recorded the position after the
    micro-batches already read for step 5, and the resume skipped them."""
    from cheff.train import data as data_module

    config = quick(data, **{"train.ema_decay": None})
    train_autoencoder(config, tmp_path / "straight", progress=False)
    real = data_module.batch_source

    def killed_at_batch_10(stream, data_config, batch_size):
        make = real(stream, data_config, batch_size)

        def started(state, device):
            batches, position = make(state, device)

            def dying():
                for number, batch in enumerate(batches, 1):
                    if number == 10:  # step 5's second micro-batch
                        os.kill(os.getpid(), signal.SIGTERM)
                        raise RuntimeError("DataLoader worker (pid 7) is killed by signal")
                    yield batch

            return dying(), position

        return started

    monkeypatch.setattr(data_module, "batch_source", killed_at_batch_10)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM at step 4 of 6"):
        train_autoencoder(config, tmp_path / "stopped", progress=False)
    monkeypatch.undo()
    train_autoencoder(config, tmp_path / "stopped", resume=True, progress=False)
    assert rows(tmp_path / "stopped") == rows(tmp_path / "straight")


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
def test_cli_exits_with_the_signals_code_after_a_stop(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGUSR1 (SLURM's --signal=USR1@T notice), with DataLoader workers that outlive it."""
    signal_at(1, signal.SIGUSR1, monkeypatch)
    args = ["train", "ae", "--data", str(data), "--preset", "tiny", "-q", "--image-size", "32"]
    args += ["--run", str(tmp_path / "r"), "--max-steps", "5", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 138, result.output
    assert "stopped by SIGUSR1 at step 2 of 5" in result.output
    assert [d.name for d in checkpoint_dirs(tmp_path / "r")] == ["step-00000002"]


class _SignalsItself(torch.utils.data.Dataset):
    """Each item read sends ``number`` to the process reading it (a DataLoader worker)."""

    def __init__(self, number: int) -> None:
        self.number = number

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> int:
        os.kill(os.getpid(), self.number)
        return index


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM"])
def test_dataloader_workers_outlive_the_stop_notice(name: str) -> None:
    """SLURM and torchrun signal every process of the job; a worker killed by the signal
    failed the step in progress (the DataLoader raises wherever the main process is) before
    the checkpoint was written."""
    from torch.utils.data import DataLoader

    from cheff.train.stopping import ignore_notice_in_worker

    number = getattr(signal, name)
    loader = DataLoader(
        _SignalsItself(number), num_workers=1, worker_init_fn=ignore_notice_in_worker
    )
    assert [int(batch) for batch in loader] == [0, 1, 2, 3]
    bare = DataLoader(_SignalsItself(number), num_workers=1)
    with pytest.raises(RuntimeError, match="worker"):
        list(bare)


def test_the_skipping_wrapper_survives_a_spawned_worker(data: Path) -> None:
    """Unpickled in a spawn or forkserver worker (macOS; Python 3.14's Linux default), the
    wrapper looked its missing _dataset up through __getattr__ without end."""
    import pickle

    from cheff.train.data import SkipUnreadable, collate_readable

    wrapped = pickle.loads(pickle.dumps(SkipUnreadable([1, 2, 3])))
    assert len(wrapped) == 3 and wrapped[1] == 2
    stream = MaCheX.stream(data, batch_size=2, splits=None, image_size=32)
    stream.dataset = SkipUnreadable(stream.dataset)  # as the training stream is made
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=2,
        num_workers=1,
        collate_fn=collate_readable,
        multiprocessing_context="spawn",
    )
    assert next(iter(loader))["image"].shape == (2, 1, 32, 32)


def test_a_resumed_epoch_tail_shorter_than_a_global_batch_goes_on(data: Path) -> None:
    """One process read 32 of 34 images; resumed on 2 ranks x 2 (the same effective batch),
    the 2 images left fill no global batch. That raised 'gave this rank no batch' on every
    resume; it is the epoch's cut tail, and the next epoch follows."""
    from cheff.train.data import batch_source

    config = quick(data, **{"data.holdout": "none"})
    stream = MaCheX.stream(
        data, batch_size=2, splits=None, drop_last=True, rank=0, world_size=2, image_size=32
    )
    assert stream.epoch_size == 34
    batches, position = batch_source(stream, config.data, 2)(
        {"epoch": 0, "seen": 32}, torch.device("cpu")
    )
    first = next(batches)
    assert first["image"].shape[0] == 2
    assert position() == {"epoch": 1, "seen": 4}  # the next epoch's first global batch


def test_set_train_epochs_alone_gives_the_run_its_length() -> None:
    """The sdm and sr presets set max_steps, which won over `--set train.epochs=2` silently;
    --epochs already cleared it. A step count given too still wins."""
    from cli.cheff_cli import _loop_overrides, _with_settings

    shared = {"max_steps": None, "epochs": None, "batch_size": None, "lr": None}
    shared |= dict.fromkeys(("sources", "where", "holdout", "image_size", "workers"))
    shared |= {"device": None, "precision": None}
    preset = PRESETS["tiny"].train_sdm
    assert preset.train.max_steps is not None
    plain = _loop_overrides(Path("data"), **shared)
    config = apply_overrides(preset, _with_settings(plain, ["train.epochs=2"]))
    assert (config.train.epochs, config.train.max_steps) == (2.0, None)
    steps = _loop_overrides(Path("data"), **shared | {"max_steps": 7})
    config = apply_overrides(preset, _with_settings(steps, ["train.epochs=2"]))
    assert config.train.max_steps == 7
    both = _with_settings(plain, ["train.epochs=2", "train.max_steps=5"])
    assert apply_overrides(preset, both).train.max_steps == 5


def test_checkpoints_record_the_holdout_and_evaluation_checks_it(
    data: Path, tmp_path: Path, caplog
) -> None:
    """A model trained without one held-out set (or with every image) and scored on another
    has seen the images it is scored on: its file says which set it left out, and
    `cheff eval recon` warns where that is not the set it scores on, as it is now."""
    import shutil

    from cheff.checkpoints import read_training_holdout
    from cheff.eval.recon import check_trained_without
    from machex.holdout import holdout_fingerprint, make_holdout

    config = quick(data, **{"train.max_steps": 1, "train.checkpoint_every": 1})
    train_autoencoder(config, tmp_path / "run", progress=False)
    (step,) = checkpoint_dirs(tmp_path / "run")
    for name in ("autoencoder.safetensors", "autoencoder-ema.safetensors"):
        recorded = read_training_holdout(step / name)
        assert recorded == (HOLDOUT, holdout_fingerprint(data, HOLDOUT)), name
    weights = step / "autoencoder.safetensors"
    with caplog.at_level("WARNING", logger="cheff.eval.recon"):
        same = check_trained_without(weights, data, HOLDOUT)
    assert same == {
        "checkpoint": {
            "holdout": HOLDOUT,
            "holdout_sha256": recorded[1],
            "matches": True,
            "keys_checked": True,
        }
    }
    assert "trained" not in caplog.text

    copy = tmp_path / "machex"  # the collection with another set, and HOLDOUT redrawn
    shutil.copytree(data, copy)
    make_holdout(copy, "other", 2, by="image", seed=1)
    make_holdout(copy, HOLDOUT, 2, by="image", seed=5, overwrite=True)
    assert holdout_fingerprint(copy, HOLDOUT) != recorded[1]
    with caplog.at_level("WARNING", logger="cheff.eval.recon"):
        other = check_trained_without(weights, copy, "other")
        redrawn = check_trained_without({"ae": str(weights), "sr": None}, copy, HOLDOUT)
    assert other["checkpoint"]["matches"] is False and redrawn["ae"]["matches"] is False
    assert f"leaving out the held-out set {HOLDOUT!r}, not 'other'" in caplog.text
    assert f"leaving out {HOLDOUT!r} as it was before it was redrawn" in caplog.text

    every = quick(data, **{"train.max_steps": 1, "data.holdout": "none"})
    train_autoencoder(every, tmp_path / "every", progress=False)
    (step,) = checkpoint_dirs(tmp_path / "every")
    assert read_training_holdout(step / "autoencoder.safetensors") == ("none", None)
    caplog.clear()
    with caplog.at_level("WARNING", logger="cheff.eval.recon"):
        check_trained_without(step / "autoencoder.safetensors", data, HOLDOUT)
    assert "with every image, no held-out set left out" in caplog.text
