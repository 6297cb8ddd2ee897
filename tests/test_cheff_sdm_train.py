"""``cheff encode`` and ``cheff train sdm``: latents written once, the unconditional LDM trained.

The fixture MaCheX of tests/test_cheff_train.py (32 training images, a 2-image held-out set)
and a random-init tiny autoencoder: enough for the mechanics and for a falling loss.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TRAINING_HOLDOUT

from cheff import Pipeline
from cheff.checkpoints import load_autoencoder, load_ldm
from cheff.config import PRESETS, SDM_PRESETS, SDMTrainConfig, apply_overrides, get_sdm_preset
from cheff.diffusion import NoiseSchedule
from cheff.latents import LatentDataset, encode_collection
from cheff.models.autoencoder import DiagonalGaussian
from cheff.train import sdm
from cheff.train.loop import TrainingError, checkpoint_dirs
from cheff.train.sdm import EMA_FILE, LDM_FILE, train_sdm
from machex import MaCheX

HOLDOUT = TRAINING_HOLDOUT
SHARD_SIZE = 10  # 32 images: 4 shards, the last one short


@pytest.fixture(scope="module")
def data(training_collection: Path) -> Path:
    return training_collection


def encode(ae_path: Path, data: Path, out: Path) -> Path:
    return encode_collection(
        ae_path,
        data,
        out,
        image_size=32,
        batch_size=8,
        exclude_holdout=HOLDOUT,
        shard_size=SHARD_SIZE,
        progress=False,
    )


@pytest.fixture(scope="module")
def latents(tmp_path_factory: pytest.TempPathFactory, data: Path, ae_path: Path) -> Path:
    return encode(ae_path, data, tmp_path_factory.mktemp("latents") / "latents")


def quick(source: Path, ae_path: Path, **overrides: object) -> SDMTrainConfig:
    """A few steps of the tiny preset with every part of the loop switched on."""
    settings = {
        "data.data": str(source),
        "data.holdout": HOLDOUT,
        "ae": str(ae_path),
        "train.batch_size": 4,
        "train.grad_accum": 2,
        "train.grad_clip": 1.0,
        "train.max_steps": 6,
        "train.checkpoint_every": 3,
        "train.log_every": 1,
        "train.image_every": 3,
        "grid_samples": 4,
        "grid_steps": 5,
    }
    return apply_overrides(SDM_PRESETS["tiny"], settings | overrides)


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in r.items() if k != "it_per_s"} for r in csv.DictReader(handle)]


def test_encode_writes_the_moments_of_every_training_image(
    data: Path, latents: Path, ae_path: Path
) -> None:
    images = MaCheX(
        data,
        splits=None,
        exclude_holdout=HOLDOUT,
        image_size=32,
        value_range=(-1, 1),
        with_labels=False,
    )
    dataset = LatentDataset(latents)
    assert list(dataset._keys) == list(images._keys) and len(dataset) == 32

    info = json.loads((latents / "latents.json").read_text())
    assert (info["count"], info["latent_shape"], info["dtype"]) == (32, [3, 8, 8], "float16")
    assert info["ae"] == str(ae_path.resolve()) and info["exclude_holdout"] == [HOLDOUT]
    assert info["scale_factor"] == 1.0 and info["skipped"] == []
    moments = torch.stack([dataset[i]["moments"] for i in range(len(dataset))]).double()
    posterior = DiagonalGaussian.from_moments(moments)
    z_mean = posterior.mean.mean()
    std = ((posterior.mean**2 + posterior.var).mean() - z_mean**2).sqrt()
    assert info["latent_std"] == pytest.approx(float(std), rel=1e-9)
    assert info["scale_by_std"] == pytest.approx(1 / info["latent_std"])

    index = 5  # a fresh encoding of one image equals the stored moments to float16 precision
    item = dataset[index]
    assert item["moments"].dtype == torch.float16 and item["key"] == images[index]["key"]
    with torch.no_grad():
        fresh = load_autoencoder(ae_path).encode(images[index]["image"][None].expand(-1, 3, -1, -1))
    expected = torch.cat([fresh.mean, fresh.logvar], dim=1)[0]
    torch.testing.assert_close(item["moments"].float(), expected, rtol=1e-3, atol=1e-3)

    # Plain WebDataset shards: <key>.npy and <key>.json, in manifest order.
    manifest = pd.read_parquet(latents / "manifest.parquet")
    assert sorted(manifest["shard"].unique()) == [f"shards/latents-00000{i}.tar" for i in range(4)]
    with tarfile.open(latents / "shards" / "latents-000000.tar") as tar:
        names = tar.getnames()
        record = json.load(tar.extractfile(names[1]))
    assert names[:2] == [f"{dataset._keys[0]}.npy", f"{dataset._keys[0]}.json"]
    assert len(names) == 2 * SHARD_SIZE and record["key"] == dataset._keys[0]
    assert {"source", "split"} <= set(record)


def test_an_interrupted_encoding_resumes_keeping_its_finished_shards(
    data: Path, latents: Path, ae_path: Path, tmp_path: Path, monkeypatch
) -> None:
    from cheff import latents as module

    real = module._finish_shard
    calls = []

    def crash_on_the_second(out, stem, writer, rows):
        calls.append(stem)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(out, stem, writer, rows)

    monkeypatch.setattr(module, "_finish_shard", crash_on_the_second)
    out = tmp_path / "latents"
    with pytest.raises(KeyboardInterrupt):
        encode(ae_path, data, out)
    first = out / "shards" / "latents-000000.tar"
    assert first.is_file() and not (out / "latents.json").exists()
    assert not list(out.rglob("*.tmp"))
    stamp = first.stat().st_mtime_ns
    with pytest.raises(ValueError, match="another selection"):
        encode_collection(ae_path, data, out, image_size=32, shard_size=SHARD_SIZE, progress=False)
    monkeypatch.setattr(module, "_finish_shard", real)
    encode(ae_path, data, out)
    assert first.stat().st_mtime_ns == stamp  # kept, not redone
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(latents / "manifest.parquet")
    )
    for shard in (latents / "shards").iterdir():
        assert (out / "shards" / shard.name).read_bytes() == shard.read_bytes()
    with pytest.raises(ValueError, match="already holds finished latents"):
        encode(ae_path, data, out)


def test_the_tiny_preset_loss_falls(latents: Path, tmp_path: Path) -> None:
    config = apply_overrides(
        SDM_PRESETS["tiny"],
        {"data.data": str(latents), "data.holdout": HOLDOUT, "train.log_every": 1},
    )
    assert config.train.max_steps == 200 and config.ae is None  # the latents name their AE
    _, task = train_sdm(config, tmp_path / "run", progress=False)
    losses = [float(r["unet/total"]) for r in rows(tmp_path / "run")]
    assert len(losses) == 200
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last <= 0.7 * first, f"mean loss {first:.3f} over the first 20 steps, {last:.3f} last"
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 2
    model = load_ldm(checkpoint_dirs(tmp_path / "run")[-1] / EMA_FILE)
    assert model.autoencoder is not None and model.scale_factor == 1.0
    with torch.no_grad():
        assert model.decode_latents(task.sample(2, 5, seed=0)).shape == (2, 3, 32, 32)


def test_resume_from_latents_equals_the_uninterrupted_run(
    latents: Path, ae_path: Path, tmp_path: Path, step_reads: list[str], step_float64: list[str]
) -> None:
    config = quick(latents, ae_path)
    train_sdm(config, tmp_path / "straight", progress=False)
    train_sdm(apply_overrides(config, {"train.max_steps": 3}), tmp_path / "resumed", progress=False)
    train_sdm(config, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [str(s) for s in range(1, 7)]
    assert resumed == straight  # every loss of every step, to the last digit
    for name in (LDM_FILE, EMA_FILE):
        a = load_ldm(checkpoint_dirs(tmp_path / "straight")[-1] / name).state_dict()
        b = load_ldm(checkpoint_dirs(tmp_path / "resumed")[-1] / name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    live = load_ldm(checkpoint_dirs(tmp_path / "straight")[-1] / LDM_FILE).state_dict()
    assert not all(torch.equal(live[k], a[k]) for k in a)  # the EMA file is another U-Net
    assert step_reads == []  # no step waited for the device
    assert step_float64 == []  # nor computed in float64 (Apple's MPS has none)


def test_training_from_images_leaves_the_holdout_out_and_saves_a_usable_ldm(
    data: Path, ae_path: Path, tmp_path: Path
) -> None:
    settings = {"train.max_steps": 2, "train.checkpoint_every": 2}
    config = quick(data, ae_path, **settings, **{"schedule.linear_end": 0.0195})
    info, task = train_sdm(config, tmp_path / "run", progress=False)
    assert info.max_steps == 2 and task.latent_shape == (3, 8, 8)
    folder = checkpoint_dirs(tmp_path / "run")[-1]
    model = load_ldm(folder / LDM_FILE)  # the U-Net and the autoencoder, no ae= needed
    # The file keeps the run's noise schedule, and sampling takes it (it took the paper's).
    trained = NoiseSchedule.ldm(linear_end=0.0195)
    for name in (LDM_FILE, EMA_FILE):
        pipe = Pipeline.from_checkpoints(folder / name, device="cpu", image_size=32)
        assert torch.equal(pipe.schedule.alphas_cumprod, trained.alphas_cumprod)
        assert torch.equal(pipe.schedule.betas, trained.betas)
        assert pipe.schedule.ddim_offset == trained.ddim_offset
    ae = load_autoencoder(ae_path).state_dict()
    assert all(torch.equal(model.autoencoder.state_dict()[k], ae[k]) for k in ae)
    unet = task.unet.state_dict()
    assert all(torch.equal(model.unet.state_dict()[k], unet[k]) for k in unet)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["resolved"] == {"latents": False, "ae": str(ae_path)}

    from cheff.train.data import open_stream

    stream = open_stream(config.data, 4, 0)
    assert stream.epoch_size == 32 and not set(stream.dataset._keys) & held_out(data)


def held_out(data: Path) -> set[str]:
    from machex.holdout import load_holdout

    return set(load_holdout(data, HOLDOUT)["key"])


def test_latents_encoded_with_the_holdout_in_drop_it_when_training(latents: Path, data: Path):
    keys = sdm._holdout_keys(quick(latents, Path("ae")), {"data": str(data)})
    assert set(keys) == held_out(data)
    assert sdm._holdout_keys(quick(latents, Path("ae")), {"exclude_holdout": [HOLDOUT]}) is None
    with pytest.raises(TrainingError, match="encoded without leaving out"):
        sdm._holdout_keys(quick(latents, Path("ae")), {"data": str(latents)})


def test_latents_drop_every_image_of_a_patient_held_out_by_patient(
    latents: Path, data: Path, tmp_path: Path
) -> None:
    """A set drawn by patient holds the keys of its draw; an image of one of its patients built
    later (--retry-failed) was trained on from latents encoded without the holdout."""
    import shutil

    import pyarrow.parquet as pq

    from machex import load_manifest
    from machex.holdout import holdout_paths, make_holdout

    root = tmp_path / "machex"
    shutil.copytree(data, root)
    images = load_manifest(root, "images")
    patient = images[images.patient_id.notna()].patient_id.value_counts().index[0]
    theirs = set(images[images.patient_id == patient].key)
    assert len(theirs) >= 2
    make_holdout(root, "patients", 2, by="patient", seed=0)
    parquet = holdout_paths(root, "patients")[0]
    held = pq.read_table(parquet)
    one = sorted(theirs)[0]  # the patient's other images "built after the draw"
    rows = [{"key": one, "source": images[images.key == one].source.iloc[0], "patient_id": patient}]
    pq.write_table(held.from_pylist(rows, schema=held.schema), parquet)
    config = apply_overrides(quick(latents, Path("ae")), {"data.holdout": "patients"})
    assert set(sdm._holdout_keys(config, {"data": str(root)})) == theirs


def test_training_needs_an_autoencoder(data: Path, tmp_path: Path) -> None:
    config = apply_overrides(quick(data, Path("ae")), {"ae": "none"})
    with pytest.raises(TrainingError, match="--ae"):
        train_sdm(config, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="not found"):
        train_sdm(quick(data, tmp_path / "absent.safetensors"), tmp_path / "run", progress=False)


def test_paper_presets_and_encode_take_the_papers_macheX(
    data: Path, latents: Path, ae_path: Path, tmp_path: Path
) -> None:
    """The paper trained on MaCheX, the paper-2023 composition: the fixture's NIH test and
    CheXpert validation images are not in it, and the paper presets must not train on them."""
    from typer.testing import CliRunner

    from cheff.train.data import open_stream
    from cli.cheff_cli import app

    paper = MaCheX(data, composition="paper-2023", exclude_holdout=HOLDOUT)
    every = MaCheX(data, splits=None, exclude_holdout=HOLDOUT)
    assert 0 < len(paper) < len(every) == 32
    for config in (PRESETS["paper"].train_ae.data, PRESETS["paper"].train_sr.data):
        selection = pointed_at(config, data)
        stream = open_stream(selection, 4, 0)
        assert sorted(stream.dataset._keys) == sorted(paper._keys)

    out = tmp_path / "latents"
    args = ["encode", "--ae", str(ae_path), "--data", str(data), "--out", str(out)]
    args += ["--holdout", HOLDOUT, "--composition", "paper-2023", "--image-size", "32", "-q"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "-j", "0"])
    assert result.exit_code == 0, result.output
    assert sorted(LatentDataset(out)._keys) == sorted(paper._keys)
    assert json.loads((out / "latents.json").read_text())["composition"] == "paper-2023"
    nih = MaCheX(data, sources="nih", composition="paper-2023", exclude_holdout=HOLDOUT)
    assert sorted(LatentDataset(out, sources="nih")._keys) == sorted(nih._keys)  # an alias
    assert 0 < len(nih) < len(paper)
    # The SDM presets take the composition's latents: from a folder encoded with it, or from
    # one encoded without (every split of every source) by (source, split), the same keys;
    # a folder encoded with another composition is refused.
    from cheff.latents import open_latent_stream

    info = json.loads((latents / "latents.json").read_text())
    assert info["composition"] is None
    for name in ("paper-uncond", "paper-report"):
        selection = dataclasses.replace(get_sdm_preset(name).data, sources=(), num_workers=0)
        for folder in (out, latents):
            stream = open_latent_stream(folder, selection, 4, 0)
            assert sorted(stream.dataset._keys) == sorted(paper._keys)
        other = dataclasses.replace(selection, composition="another")
        with pytest.raises(ValueError, match="encoded with composition 'paper-2023': encode"):
            open_latent_stream(out, other, 4, 0)


def pointed_at(config, data: Path):
    """A preset's data settings pointed at ``data`` with the fixture's held-out set, at 32 px."""
    return dataclasses.replace(
        config, data=str(data), holdout=HOLDOUT, image_size=32, num_workers=0
    )


def test_the_paper_preset_holds_the_paper_numbers() -> None:
    paper = get_sdm_preset("paper-uncond")
    assert get_sdm_preset("paper") is paper is PRESETS["paper"].train_sdm
    train = paper.train
    assert (train.batch_size, train.max_steps, train.lr) == (256, 500_000, 5e-5)
    assert (train.ema_decay, train.betas) == (0.9999, (0.9, 0.999))
    assert paper.model.channel_mult == (1, 2, 4, 4) and paper.model.model_channels == 224
    assert paper.model.attention_levels == (1, 2, 3) and paper.model.num_head_channels == 32
    schedule = paper.schedule
    assert (schedule.timesteps, schedule.linear_start, schedule.linear_end) == (
        1000,
        0.0015,
        0.0295,
    )
    assert (paper.data.image_size, paper.scale_factor, paper.ae) == (256, 1.0, None)
    released = apply_overrides(paper, {"model.channel_mult": "1,2,3,4"})
    assert released.model.channel_mult == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="unknown SDM preset"):
        get_sdm_preset("huge")


def test_cli_encode_train_sdm_and_sample(data: Path, ae_path: Path, tmp_path: Path) -> None:
    """The user's path: encode once, train on the latents, sample from the checkpoint."""
    import json

    from typer.testing import CliRunner

    from cli.cheff_cli import app

    runner = CliRunner()
    latents, run, samples = tmp_path / "latents", tmp_path / "run", tmp_path / "samples"
    encode_args = ["encode", "--ae", str(ae_path), "--data", str(data), "--out", str(latents)]
    result = runner.invoke(app, [*encode_args, "--image-size", "32", "-j", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert "latents (3, 8, 8)" in result.stdout and "scale factor 1.0" in result.stdout
    train = ["train", "sdm", "--data", str(latents), "--run", str(run), "--preset", "tiny"]
    result = runner.invoke(app, [*train, "--max-steps", "3", "-q"])
    assert result.exit_code == 0, result.output
    (checkpoint,) = (run / "checkpoints").glob("step-*/ldm.safetensors")
    result = runner.invoke(
        app,
        ["sample", "--sdm", str(checkpoint), "--n", "2", "--steps", "2", "--exact-steps"]
        + ["--out", str(samples), "-q", "--device", "cpu"],  # at the file's 32 px
    )
    assert result.exit_code == 0, result.output
    record = json.loads((samples / "sample.json").read_text())
    assert record["network_calls"] == 2 and record["image_size"] == 32
    result = runner.invoke(app, [*train, "--max-steps", "3", "-q"])  # the run exists
    assert result.exit_code == 2 and "--resume" in result.output
    result = runner.invoke(app, [*train[:-2], "--preset", "huge"])
    assert result.exit_code == 2 and "unknown SDM preset 'huge'" in result.output


def test_an_image_size_latents_were_not_encoded_at_is_refused(latents: Path, tmp_path: Path):
    """`--image-size 64` on 32 px latents was ignored without a word."""
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    args = ["train", "sdm", "--data", str(latents), "--preset", "tiny", "-q"]
    args += ["--run", str(tmp_path / "run"), "--max-steps", "1", "--image-size", "64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "encoded from 32 px images; leave --image-size out" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_latents_whose_machex_moved_name_it_and_take_its_new_place(
    data: Path, ae_path: Path, tmp_path: Path
) -> None:
    """Moved, the MaCheX of latents encoded with their held-out set in was not found, and
    training took every latent, the held-out images too, without a word."""
    import shutil

    from typer.testing import CliRunner

    from cli.cheff_cli import app

    machex = tmp_path / "machex"
    shutil.copytree(data, machex)
    latents = encode_collection(ae_path, machex, tmp_path / "lat", image_size=32, progress=False)
    moved = machex.rename(tmp_path / "scratch-machex")
    train = ["train", "sdm", "--data", str(latents), "--preset", "tiny", "-q"]
    train += ["--max-steps", "1", "--set", "train.batch_size=4"]
    runner = CliRunner()
    result = runner.invoke(app, [*train, "--run", str(tmp_path / "a")])
    assert result.exit_code == 2 and f"the latents' MaCheX {machex}" in result.output
    assert "--machex DIR" in result.output
    result = runner.invoke(app, [*train, "--run", str(tmp_path / "b"), "--machex", str(moved)])
    assert result.exit_code == 0, result.output
    assert f"leaving out the held-out set {HOLDOUT!r}" in result.output
    result = runner.invoke(app, [*train, "--run", str(tmp_path / "c"), "--holdout", "none"])
    assert result.exit_code == 0, result.output
    wrong = [*train, "--run", str(tmp_path / "d"), "--machex", str(tmp_path / "nowhere")]
    result = runner.invoke(app, wrong)
    assert result.exit_code == 2 and "nowhere is not a built collection" in result.output
    images = ["train", "sdm", "--data", str(moved), "--preset", "tiny", "--machex", str(moved)]
    result = runner.invoke(app, [*images, "--run", str(tmp_path / "e"), "-q"])
    assert result.exit_code == 2 and "--machex is for a latents folder" in result.output


def test_a_latents_folder_copied_in_part_is_refused(latents: Path, tmp_path: Path) -> None:
    import shutil

    from cheff.latents import LatentDataset

    copy = tmp_path / "copy"
    shutil.copytree(latents, copy)
    shards = sorted((copy / "shards").glob("*.tar"))
    shards[-1].unlink()
    with pytest.raises(ValueError, match=f"{shards[-1]}: missing; the latents folder"):
        LatentDataset(copy)
    shutil.copyfile(latents / "shards" / shards[-1].name, shards[-1])
    with open(shards[0], "r+b") as handle:
        handle.truncate(1024)
    with pytest.raises(ValueError, match="1,024 bytes, its members end at"):
        LatentDataset(copy)


def test_one_encoding_per_folder_and_none_under_torchrun(
    data: Path, ae_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second encode into a folder (a requeued job beside the first) deleted the first's
    unfinished shard; under torchrun every rank encoded every image."""
    import fcntl

    out = tmp_path / "lat"
    out.mkdir()
    with open(out / ".encode.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another cheff encode into .* is running"):
            encode_collection(ae_path, data, out, image_size=32, progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="not under torchrun"):
        encode_collection(ae_path, data, tmp_path / "other", image_size=32, progress=False)


def test_images_are_encoded_in_fp32_under_bf16_autocast(data: Path, ae_path: Path) -> None:
    """The images path encoded under the loop's bf16 autocast: latents ~1 % off those of
    `cheff encode`, which encodes in fp32."""
    from cheff.checkpoints import load_autoencoder
    from machex import MaCheX

    config = quick(data, ae_path)
    autoencoder = load_autoencoder(ae_path)
    task = sdm.SDMTask(config, autoencoder, latent_side=8)
    images = MaCheX(data, splits=None, image_size=32, value_range=(-1, 1), with_labels=False)
    batch = {"image": torch.stack([images[i]["image"] for i in range(4)])}
    with torch.no_grad():
        plain = task.latents(batch, torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = task.latents(batch, torch.Generator().manual_seed(0))
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="needs a device that is not there")
def test_encode_on_a_device_that_is_not_there_is_one_line(data: Path, ae_path: Path, tmp_path):
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    out = tmp_path / "lat"
    args = ["encode", "--ae", str(ae_path), "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--device", "cuda:3", "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not (out / "encode-plan.json").exists()  # checked before any file is written
