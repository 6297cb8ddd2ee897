"""Report encoder and tokenizer: fixture parity, the released layout, official quirks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cheff_parity import SINGLE, assert_close, checkpoint, config, fixture, io

from cheff.models.text_encoder import (
    TextEncoder,
    TextEncoderConfig,
    config_from_state,
    strip_prefix,
)

LAYOUT = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "cheff-official"
    / "layouts"
    / "cheff_diff_t2i.json"
)


def _fixture_encoder() -> tuple[TextEncoder, dict[str, torch.Tensor]]:
    from cheff.checkpoints import read_checkpoint

    folder = fixture("ldm_t2i")
    state = strip_prefix(read_checkpoint(checkpoint(folder)).state_dict)
    cfg = TextEncoderConfig.from_official(config(folder)["cond_stage"])
    assert config_from_state(state) == cfg
    return TextEncoder.from_state_dict(state, cfg).eval(), io(folder)


def test_parity_ldm_t2i_context() -> None:
    model, data = _fixture_encoder()
    with torch.no_grad():
        out = model(data["token_ids"])
    assert_close(out, data["context"], SINGLE, "context")


def test_parity_ldm_t2i_no_padding_mask() -> None:
    """Pads take part in attention: the [CLS] position changes with the padded length."""
    model, data = _fixture_encoder()
    ids = data["token_ids"][:1]
    length = int((ids != 0).sum())
    assert length < ids.shape[1]
    with torch.no_grad():
        full = model(ids)
        trimmed = model(ids[:, :length])
    assert not torch.allclose(full[:, :length], trimmed, atol=1e-4)


def test_released_layout() -> None:
    if not LAYOUT.is_file():
        pytest.skip(f"needs {LAYOUT}")
    layout = json.loads(LAYOUT.read_text())
    expected = {
        key.removeprefix("cond_stage_model."): tuple(shape)
        for key, shape, _ in layout["entries"]
        if key.startswith("cond_stage_model.")
    }
    with torch.device("meta"):
        model = TextEncoder(TextEncoderConfig())
    state = model.state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    assert (
        sum(v.numel() for v in state.values()) == (layout["parameter_counts"]["cond_stage_model"])
    )
    with torch.device("meta"):
        meta_state = {key: torch.empty(shape) for key, shape in expected.items()}
    assert config_from_state(meta_state) == TextEncoderConfig()


def test_forward_shape_and_length_check() -> None:
    torch.manual_seed(0)
    cfg = TextEncoderConfig(vocab_size=50, max_seq_len=8, n_embed=16, n_layer=1)
    model = TextEncoder(cfg)
    assert model(torch.zeros(3, 8, dtype=torch.long)).shape == (3, 8, 16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


# -- tokenizer ---------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "acute", "cardio", "##pulmonary"]
VOCAB += ["process", "effusion", "cafe", ".", ","]


@pytest.fixture
def tokenizer(tmp_path: Path):
    pytest.importorskip("tokenizers")
    from cheff.text import ReportTokenizer

    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return ReportTokenizer.from_vocab(path, max_length=8)


def _ids(*tokens: str) -> list[int]:
    return [VOCAB.index(token) for token in tokens]


def test_tokenizer_framing_case_and_accents(tokenizer) -> None:
    out = tokenizer.encode(["No acute CARDIOPULMONARY process.", "Café"])
    assert out.dtype == torch.long and out.shape == (2, 8)
    first = _ids("[CLS]", "no", "acute", "cardio", "##pulmonary", "process", ".", "[SEP]")
    assert out[0].tolist() == first
    assert out[1].tolist() == _ids("[CLS]", "cafe", "[SEP]") + [0] * 5


def test_tokenizer_unknown_truncation_and_empty(tokenizer) -> None:
    assert tokenizer.encode("no zebra").tolist() == [
        _ids("[CLS]", "no", "[UNK]", "[SEP]") + [0] * 4
    ]
    long = tokenizer.encode("no " * 20)[0].tolist()
    assert long == _ids("[CLS]") + _ids("no") * 6 + _ids("[SEP]")
    assert tokenizer.encode("")[0].tolist() == _ids("[CLS]", "[SEP]") + [0] * 6
    assert (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id) == (0, 2, 3)


def test_tokenizer_never_downloads(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    from cheff.text import ReportTokenizer

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ReportTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    assert ReportTokenizer.from_pretrained(tmp_path, max_length=4).encode("no").shape == (1, 4)
