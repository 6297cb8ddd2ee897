"""``cheff train sdm`` with conditions: the report model and the label model.

The MIMIC-CXR + Open-i miniature (reports and labels), a random-init tiny autoencoder and a
WordPiece vocabulary trained on the collection's reports (``report_vocab`` in conftest).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cheff.checkpoints import load_ldm, read_vocab
from cheff.config import SDMTrainConfig, apply_overrides, get_sdm_preset
from cheff.latents import encode_collection
from cheff.pipeline import Pipeline
from cheff.provenance import read_provenance
from cheff.train.conditions import load_conditions
from cheff.train.loop import TrainingError, checkpoint_dirs
from cheff.train.sdm import EMA_FILE, LDM_FILE, train_sdm
from machex.manifests import load_manifest


@pytest.fixture(scope="module")
def data(report_collection: Path) -> Path:
    return report_collection


@pytest.fixture(scope="module")
def vocab(report_vocab: Path) -> Path:
    return report_vocab


def configure(preset: str, data: Path, ae_path: Path, vocab: Path, **extra: object):
    settings = {
        "data.data": str(data),
        "ae": str(ae_path),
        "condition.vocab": str(vocab),
        "condition.report_text": "findings_impression",  # Open-i has no text_v1
        "train.log_every": 1,
    }
    return apply_overrides(get_sdm_preset(preset), settings | extra)


def losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as handle:
        return [float(row["unet/total"]) for row in csv.DictReader(handle)]


def assert_falls(values: list[float]) -> None:
    first, last = np.mean(values[:20]), np.mean(values[-20:])
    assert last <= 0.7 * first, f"mean loss {first:.3f} over the first 20 steps, {last:.3f} last"


def test_the_tiny_report_model_trains_on_the_images_with_a_report(
    data: Path, ae_path: Path, vocab: Path, tmp_path: Path
) -> None:
    config = configure("tiny-report", data, ae_path, vocab)
    assert config.train.max_steps == 200 and config.condition.kind == "report"
    run = tmp_path / "run"
    _, task = train_sdm(config, run, progress=False)
    values = losses(run)
    assert len(values) == 200
    assert_falls(values)

    images = load_manifest(data, "images")
    reports = load_manifest(data, "reports")
    with_text = images.merge(reports, on=["source", "study_id"])
    expected = set(with_text["key"][with_text["findings_impression"].notna()])
    assert set(task.conditions.keys) == expected and 0 < len(expected) < len(images)
    assert {key.split("-")[0] for key in expected} == {"mimic", "openi"}

    folder = checkpoint_dirs(run)[-1]
    model = load_ldm(folder / EMA_FILE)
    assert model.condition == "report" and model.text_encoder is not None
    assert read_vocab(folder / LDM_FILE) == vocab.read_text()
    trained = task.text_encoder.state_dict()
    saved = model.text_encoder.state_dict()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)  # the live encoder
    pipe = Pipeline.from_checkpoints(folder / EMA_FILE, device="cpu", image_size=32)
    out = pipe(2, prompt="Large right pleural effusion.", steps=5, progress=False)
    assert out.shape == (2, 1, 32, 32)
    assert len(list((run / "images").glob("*.png"))) == 2


def test_the_tiny_label_model_trains_on_the_labelled_images(
    data: Path, ae_path: Path, vocab: Path, tmp_path: Path
) -> None:
    config = configure("tiny-labels", data, ae_path, vocab)
    assert config.condition.kind == "labels" and config.condition.drop == 0.1
    _, task = train_sdm(config, tmp_path / "run", progress=False)
    assert_falls(losses(tmp_path / "run"))
    labels = load_manifest(data, "labels")
    stated = labels[labels.drop(columns=["key", "source", "native_labels"]).notna().any(axis=1)]
    assert set(task.conditions.keys) == set(stated["key"])
    model = load_ldm(checkpoint_dirs(tmp_path / "run")[-1] / EMA_FILE)
    assert model.condition == "labels"
    pipe = Pipeline(model, image_size=32, device="cpu")
    out = pipe(2, labels="Cardiomegaly=1,Pleural Effusion=1", guidance_scale=2.0, steps=5)
    assert out.shape == (2, 1, 32, 32)


def quick(config: SDMTrainConfig) -> SDMTrainConfig:
    return apply_overrides(
        config,
        {
            "train.max_steps": 6,
            "train.checkpoint_every": 3,
            "train.image_every": 3,
            "condition.drop": 0.5,
            "grid_samples": 2,
            "grid_steps": 5,
        },
    )


def test_a_conditioned_run_resumes_exactly_from_latents(
    data: Path,
    ae_path: Path,
    vocab: Path,
    tmp_path: Path,
    step_reads: list[str],
    step_float64: list[str],
) -> None:
    latents = encode_collection(ae_path, data, tmp_path / "latents", image_size=32, progress=False)
    config = quick(configure("tiny-report", latents, ae_path, vocab))
    train_sdm(config, tmp_path / "straight", progress=False)
    train_sdm(apply_overrides(config, {"train.max_steps": 3}), tmp_path / "resumed", progress=False)
    _, task = train_sdm(config, tmp_path / "resumed", resume=True, progress=False)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a = load_ldm(checkpoint_dirs(tmp_path / "straight")[-1] / LDM_FILE).state_dict()
    b = load_ldm(checkpoint_dirs(tmp_path / "resumed")[-1] / LDM_FILE).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("text_encoder.") for k in a)
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["condition"]["kind"] == "report" and saved["condition"]["drop"] == 0.5
    assert len(task.conditions) < 14  # images without a report are not trained on
    assert step_reads == []  # no step waited for the device (the condition drops included)
    assert step_float64 == []  # nor computed in float64 (Apple's MPS has none)


def test_conditioned_runs_say_what_is_missing(
    data: Path, training_collection: Path, ae_path: Path, vocab: Path, tmp_path: Path
) -> None:
    no_vocab = configure("tiny-report", data, ae_path, tmp_path / "absent.txt")
    with pytest.raises(TrainingError, match="--vocab"):
        train_sdm(no_vocab, tmp_path / "a", progress=False)
    no_reports = configure("tiny-report", training_collection, ae_path, vocab)
    with pytest.raises(TrainingError, match="no image of .* has a report text"):
        train_sdm(no_reports, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="context_dim"):
        apply_overrides(get_sdm_preset("tiny-report"), {"model.context_dim": "32"})
    with pytest.raises(ValueError, match="cond-drop"):
        apply_overrides(get_sdm_preset("tiny-labels"), {"condition.drop": "1.0"})


def test_open_i_has_no_text_v1_and_is_left_out_with_a_warning(
    data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = get_sdm_preset("paper-report").condition
    with caplog.at_level("WARNING"):
        table = load_conditions(data, config)
    assert {key.split("-")[0] for key in table.keys} == {"mimic"}
    assert "openi" in caplog.text and "findings_impression" in caplog.text


def test_settings_that_must_agree_change_together_in_any_order() -> None:
    """Each --set used to be applied and checked alone, so two settings that must agree
    (the encoder's width and the U-Net's context) could not both be changed."""
    report = get_sdm_preset("paper-report")
    pair = [("model.context_dim", "64"), ("condition.encoder.n_embed", "64")]
    for order in (pair, pair[::-1]):
        smaller = apply_overrides(report, dict(order))
        assert (smaller.model.context_dim, smaller.condition.encoder.n_embed) == (64, 64)
    with pytest.raises(ValueError, match="context_dim 64 must be the condition encoder's"):
        apply_overrides(report, {"model.context_dim": "64"})  # still checked
    uncond = apply_overrides(
        get_sdm_preset("paper-uncond"), {"model.channel_mult": "1,2", "model.attention_levels": "1"}
    )
    assert (uncond.model.channel_mult, uncond.model.attention_levels) == ((1, 2), (1,))
    # A key under a setting that holds no fields is an error that says so (was a TypeError).
    with pytest.raises(ValueError, match="condition.encoder is None here"):
        apply_overrides(get_sdm_preset("paper-uncond"), {"condition.encoder.n_embed": "64"})


def test_the_report_and_label_presets() -> None:
    report = get_sdm_preset("paper-report")
    train = report.train
    assert (train.batch_size, train.lr, train.max_steps, train.ema_decay) == (
        256,
        5e-5,
        750_000,
        0.9999,
    )
    model = report.model
    assert model.channel_mult == (1, 2, 4, 4) and model.context_dim == 1280
    assert (model.num_heads, model.transformer_depth, model.attention_levels) == (8, 1, (1, 2, 3))
    encoder = report.condition.encoder
    assert (encoder.n_layer, encoder.n_embed, encoder.max_seq_len) == (32, 1280, 150)
    assert report.scale_factor == 0.18215 and report.data.sources == ("mimic",)
    assert report.condition.report_text == "text_v1" and report.condition.drop == 0.0
    labels = get_sdm_preset("paper-labels")
    assert labels.condition.kind == "labels" and labels.condition.encoder.max_seq_len == 14
    assert labels.data.sources == ()


def test_cli_trains_and_samples_report_and_label_models(
    data: Path, ae_path: Path, vocab: Path, tmp_path: Path
) -> None:
    """The user's path: train sdm --preset tiny-report / tiny-labels, then sample with
    --prompts FILE (one image a line), --labels and --guidance-scale."""
    from typer.testing import CliRunner

    from cli.cheff_cli import app

    runner = CliRunner()
    common = ["--data", str(data), "--ae", str(ae_path), "--max-steps", "2", "-q"]
    report_run, labels_run = tmp_path / "report", tmp_path / "labels"
    result = runner.invoke(
        app,
        ["train", "sdm", "--preset", "tiny-report", "--run", str(report_run), *common]
        + ["--vocab", str(vocab), "--report-text", "findings_impression", "--cond-drop", "0.2"]
        + ["--grad-checkpointing"],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((report_run / "config.json").read_text())
    assert saved["condition"]["drop"] == 0.2 and saved["train"]["grad_checkpointing"] is True
    result = runner.invoke(
        app, ["train", "sdm", "--preset", "tiny-labels", "--run", str(labels_run), *common]
    )
    assert result.exit_code == 0, result.output

    sample = ["sample", "--steps", "2", "--exact-steps", "--image-size", "32", "-q"]
    sample += ["--device", "cpu"]
    (report,) = (report_run / "checkpoints").glob("step-*/ldm.safetensors")
    (labels,) = (labels_run / "checkpoints").glob("step-*/ldm-ema.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("No acute process.\n\nLarge right pleural effusion.\n")
    out = tmp_path / "from-reports"
    result = runner.invoke(
        app, [*sample, "--sdm", str(report), "--prompts", str(prompts), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    info = json.loads((out / "sample.json").read_text())
    assert info["n"] == 2 and info["prompt"] == [
        "No acute process.",
        "Large right pleural effusion.",
    ]
    assert len(list(out.glob("sample_*.png"))) == 2
    out = tmp_path / "from-labels"
    result = runner.invoke(
        app,
        [*sample, "--sdm", str(labels), "--labels", "Cardiomegaly=1", "-w", "3", "--n", "3"]
        + ["--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    info = json.loads((out / "sample.json").read_text())
    assert (info["condition"], info["guidance_scale"], info["labels"]) == (
        "labels",
        3.0,
        "Cardiomegaly=1",
    )
    text = read_provenance(next(out.glob("sample_*.png")))  # labels, not a prompt
    assert text["cheff:labels"] == "Cardiomegaly=1" and "cheff:prompt" not in text
    wrong = [*sample, "--sdm", str(report), "--labels", "Edema=1", "--out", str(tmp_path / "w")]
    result = runner.invoke(app, wrong)
    assert result.exit_code == 2 and "conditioned on prompt" in result.output
    both = [*sample, "--sdm", str(report), "--prompt", "a", "--labels", "Edema=1"]
    result = runner.invoke(app, [*both, "--out", str(out)])
    assert result.exit_code == 2 and "not --prompt and --labels" in result.output


def test_a_report_model_takes_english_reports_unless_told_otherwise(
    sample_roots_pristine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PadChest's stemmed Spanish reports ("es") are kept in the manifests but were made
    training prompts of a report model, against the Report record's promise."""
    from dataclasses import replace

    from machex.build import BuildOptions, build_source

    out = tmp_path / "machex"
    build_source("padchest", sample_roots_pristine["padchest"], out, BuildOptions(workers=1))
    config = replace(get_sdm_preset("tiny-report").condition, report_text="text")
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="no image of .* report"):
        load_conditions(out, config)
    assert "reports in other languages than en" in caplog.text and " es" in caplog.text
    both = apply_overrides(
        get_sdm_preset("tiny-report"),
        {"condition.report_text": "text", "condition.report_languages": "es,EN"},
    ).condition
    assert both.report_languages == ("en", "es")
    assert {key.split("-")[0] for key in load_conditions(out, both).keys} == {"padchest"}
