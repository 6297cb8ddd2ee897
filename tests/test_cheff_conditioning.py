"""Conditions (report, labels), the null condition, classifier-free guidance, the pipeline.

A tiny randomly initialised conditioned LDM (no zero-init, so the context matters from the
start) and a small local WordPiece vocabulary; no shared fixture needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cheff.checkpoints import describe, load_ldm, read_vocab, save_ldm
from cheff.conditioning import (
    LABEL_STATES,
    Conditioner,
    ConditionError,
    LabelTokenizer,
    drop_conditions,
    parse_labels,
)
from cheff.config import TINY
from cheff.diffusion import NoiseSchedule, classifier_free, ddim
from cheff.models.autoencoder import AutoencoderKL
from cheff.models.ldm import LatentDiffusion
from cheff.models.text_encoder import TextEncoder, TextEncoderConfig
from cheff.models.unet import UNetConfig, UNetModel
from cheff.pipeline import Pipeline
from machex.records import FINDINGS

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "acute", "large", "right"]
VOCAB += ["pleural", "effusion", "cardio", "##megaly", "."]
CONTEXT = 16


def tiny_ldm(kind: str, vocab_size: int, length: int) -> LatentDiffusion:
    torch.manual_seed(0)
    unet = UNetModel(
        UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            num_head_channels=32,
            context_dim=CONTEXT,
        )
    )
    encoder = TextEncoder(
        TextEncoderConfig(
            vocab_size=vocab_size,
            max_seq_len=length,
            n_embed=CONTEXT,
            n_layer=1,
            heads=2,
            head_dim=8,
            ff_mult=2,
        )
    )
    ae = AutoencoderKL(TINY.autoencoder)
    return LatentDiffusion(
        unet, ae, conditioning_key="crossattn", text_encoder=encoder, condition=kind
    ).eval()


@pytest.fixture
def vocab(tmp_path: Path) -> Path:
    pytest.importorskip("tokenizers")
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return path


# -- labels ------------------------------------------------------------------------------


def test_label_tokens_one_per_finding() -> None:
    tokenizer = LabelTokenizer()
    assert tokenizer.vocab_size == 56 and tokenizer.max_length == len(FINDINGS) == 14
    ids = tokenizer.encode("cardiomegaly=1, Pleural Effusion=-1, Edema=0")[0].tolist()
    states = len(LABEL_STATES)
    for index, name in enumerate(FINDINGS):
        state = {"Cardiomegaly": 0, "Pleural Effusion": 2, "Edema": 1}.get(name, 3)
        assert ids[index] == index * states + state, name
    same = tokenizer.encode({"Cardiomegaly": 1.0, "Pleural Effusion": -1, "Edema": 0})
    vector = torch.full((14,), math.nan)
    vector[FINDINGS.index("Cardiomegaly")] = 1
    vector[FINDINGS.index("Pleural Effusion")] = -1
    vector[FINDINGS.index("Edema")] = 0
    assert same[0].tolist() == ids == tokenizer.encode(vector)[0].tolist()
    assert tokenizer.encode([vector, vector.numpy()]).shape == (2, 14)
    assert tokenizer.encode(vector.numpy())[0].tolist() == ids
    assert tokenizer.encode(torch.stack([vector, vector])).tolist() == [ids, ids]
    assert tokenizer.null()[0].tolist() == [i * states + 3 for i in range(14)]


def test_labels_as_the_manifest_holds_them_are_tokenized_alike() -> None:
    """The labels manifest's nullable Int8 row (<NA> = not mentioned) crashed float(); a
    float32 NaN was refused; a list of numpy floats was taken for a list of rows."""
    import pandas as pd

    tokenizer = LabelTokenizer()
    wanted = tokenizer.encode("Cardiomegaly=1, Edema=-1")[0].tolist()
    row = pd.Series(pd.array([pd.NA] * 14, dtype="Int8"), index=list(FINDINGS))
    row["Cardiomegaly"], row["Edema"] = 1, -1
    as_floats = [np.float32("nan")] * 14
    as_floats[FINDINGS.index("Cardiomegaly")] = np.float32(1)
    as_floats[FINDINGS.index("Edema")] = np.float32(-1)
    numpy_dict = {"Cardiomegaly": np.int8(1), "Edema": np.float32(-1), "Atelectasis": pd.NA}
    for given in (row.to_dict(), row.tolist(), as_floats, numpy_dict):
        assert tokenizer.encode(given)[0].tolist() == wanted, given


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("Cardiomegally=1", "FINDING=VALUE"),
        ("Cardiomegaly", "FINDING=VALUE"),
        ("Cardiomegaly=2", "1 \\(positive\\), 0"),
        ("Edema=yes", "1 \\(positive\\), 0"),
    ],
)
def test_bad_labels_say_what_is_expected(text: str, match: str) -> None:
    with pytest.raises(ConditionError, match=match):
        parse_labels(text)


def test_parse_labels_words_and_empty() -> None:
    assert parse_labels("Edema=positive,Fracture=uncertain,Pneumonia=negative") == {
        "Edema": 1,
        "Fracture": -1,
        "Pneumonia": 0,
    }
    assert parse_labels("") == {}
    with pytest.raises(ConditionError, match="14 entries"):
        LabelTokenizer().encode([1.0, 0.0])


# -- the null condition ------------------------------------------------------------------


def test_the_null_condition_is_the_empty_report(vocab: Path) -> None:
    conditioner = Conditioner.create("report", str(vocab), max_length=12)
    null = conditioner.null_ids(3)
    assert null.shape == (3, 12)
    assert null[0].tolist() == [VOCAB.index("[CLS]"), VOCAB.index("[SEP]")] + [0] * 10
    ldm = tiny_ldm("report", len(VOCAB), 12)
    empty = conditioner.tokenizer.encode([""])
    with torch.no_grad():
        assert torch.equal(ldm.context(null[:1]), ldm.context(empty))
        assert not torch.equal(ldm.context(null[:1]), ldm.context(conditioner.ids(["no ."])))


def test_condition_dropout_draws_from_the_generator() -> None:
    conditioner = Conditioner.create("labels")
    ids = conditioner.ids(["Edema=1"] * 400)
    null = conditioner.null_ids(1)

    def uniform(seed: int) -> Callable[[int], torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return lambda n: torch.rand(n, generator=generator)

    assert torch.equal(drop_conditions(ids, null, 0.0, uniform(0)), ids)
    a = drop_conditions(ids, null, 0.25, uniform(3))
    b = drop_conditions(ids, null, 0.25, uniform(3))
    assert torch.equal(a, b)
    dropped = (a == null).all(dim=1)
    assert ((a == ids).all(dim=1) | dropped).all()  # whole rows, either kept or null
    assert 60 < int(dropped.sum()) < 140  # about a quarter of 400


# -- guidance ----------------------------------------------------------------------------


def _eps_and_contexts(ldm: LatentDiffusion):
    conditioner = Conditioner.create("labels")
    with torch.no_grad():
        context = ldm.context(conditioner.ids(["Cardiomegaly=1", "Edema=1,Fracture=0"]))
        null = ldm.context(conditioner.null_ids(1))
    return ldm.eps, context, null


def test_guidance_scale_1_equals_conditional_sampling() -> None:
    ldm = tiny_ldm("labels", 56, 14)
    eps, context, null = _eps_and_contexts(ldm)
    schedule = NoiseSchedule.ldm()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = schedule.ddim_timesteps(10)
    with torch.no_grad():
        plain = ddim(lambda x, t: eps(x, t, context), x_T, schedule.alphas_cumprod, timesteps, 0)
        guided = ddim(
            classifier_free(eps, context, null, 1.0), x_T, schedule.alphas_cumprod, timesteps, 0
        )
        unguided = ddim(
            lambda x, t: eps(x, t, null.expand(2, -1, -1)),
            x_T,
            schedule.alphas_cumprod,
            timesteps,
            0,
        )
    assert torch.equal(guided, plain)
    assert not torch.allclose(plain, unguided, atol=1e-4)  # the condition matters


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_guidance_combines_both_branches(scale: float) -> None:
    ldm = tiny_ldm("labels", 56, 14)
    eps, context, null = _eps_and_contexts(ldm)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 20])
    with torch.no_grad():
        conditional = eps(x, t, context)
        unconditional = eps(x, t, null.expand(2, -1, -1))
        guided = classifier_free(eps, context, null, scale)(x, t)
    expected = unconditional + scale * (conditional - unconditional)
    torch.testing.assert_close(guided, expected, atol=2e-5, rtol=1e-5)


# -- the pipeline ------------------------------------------------------------------------


def test_pipeline_conditions_per_image_whatever_the_batch(vocab: Path) -> None:
    ldm = tiny_ldm("report", len(VOCAB), 12)
    pipe = Pipeline(
        ldm,
        image_size=32,
        device="cpu",
        conditioner=Conditioner.create("report", str(vocab), max_length=12),
    )
    prompts = ["no acute .", "large right pleural effusion ."]
    whole = pipe(2, prompt=prompts, steps=5, progress=False, batch_size=2)
    second = pipe(1, prompt=prompts[1:], steps=5, progress=False, start=1)
    torch.testing.assert_close(second[0], whole[1], atol=1e-5, rtol=0)
    swapped = pipe(2, prompt=prompts[::-1], steps=5, progress=False)
    assert not torch.allclose(swapped[1], whole[1], atol=1e-3)
    guided = pipe(2, prompt=prompts, steps=5, progress=False, guidance_scale=4.0)
    assert not torch.allclose(guided, whole, atol=1e-3)
    assert pipe.last_run["condition"] == "report" and pipe.last_run["guidance_scale"] == 4.0


def test_pipeline_asks_for_the_right_condition(vocab: Path) -> None:
    pipe = Pipeline(tiny_ldm("labels", 56, 14), image_size=32, device="cpu")
    assert pipe.conditioner is not None and pipe.conditioner.kind == "labels"
    with pytest.raises(ValueError, match="conditioned on labels"):
        pipe(1, steps=5, progress=False)
    with pytest.raises(ValueError, match="prompt given"):
        pipe(1, prompt="no", steps=5, progress=False)
    with pytest.raises(ValueError, match="3 labels values for 2 images"):
        pipe(2, labels=["Edema=1"] * 3, steps=5, progress=False)
    with pytest.raises(ConditionError, match="FINDING=VALUE"):
        pipe(1, labels="Edma=1", steps=5, progress=False)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        Pipeline(tiny_ldm("report", len(VOCAB), 12), image_size=32, device="cpu")


def test_files_keep_the_condition_and_the_vocabulary(vocab: Path, tmp_path: Path) -> None:
    labels_file = save_ldm(tiny_ldm("labels", 56, 14), tmp_path / "labels.safetensors")
    assert load_ldm(labels_file).condition == "labels" and read_vocab(labels_file) is None
    report = tiny_ldm("report", len(VOCAB), 12)
    text = vocab.read_text()
    report_file = save_ldm(report, tmp_path / "report.safetensors", vocab=text)
    assert read_vocab(report_file) == text
    assert describe(report_file)["metadata"]["vocab"] == f"{len(VOCAB)} tokens"
    pipe = Pipeline.from_checkpoints(report_file, device="cpu", image_size=32)  # no vocab=
    assert pipe.ldm.condition == "report"
    assert pipe.conditioner.tokenizer.encode("no acute")[0, :4].tolist() == [2, 5, 6, 3]
    bare = save_ldm(report, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="no local vocabulary for .*none"):
        Pipeline.from_checkpoints(bare, device="cpu", image_size=32, vocab=tmp_path / "none")
    pipe = Pipeline.from_checkpoints(bare, device="cpu", image_size=32, vocab=vocab)
    assert pipe.conditioner.tokenizer.encode("no")[0, :3].tolist() == [2, 5, 3]


def test_one_label_vector_is_one_condition_for_all_images() -> None:
    pipe = Pipeline(tiny_ldm("labels", 56, 14), image_size=32, device="cpu")
    vector = torch.full((14,), math.nan)
    vector[FINDINGS.index("Edema")] = 1
    runs = [
        pipe(2, labels=given, steps=5, progress=False)
        for given in (vector, vector.numpy(), vector.tolist(), "Edema=1", [{"Edema": 1}] * 2)
    ]
    for other in runs[1:]:
        assert torch.equal(other, runs[0])
