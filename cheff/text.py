"""Report tokenisation for the text-to-image LDM, equal to the official call.

The official ``BERTTokenizer`` wraps HF ``BertTokenizerFast("bert-base-uncased")`` with
``padding="max_length", max_length=150, truncation=True``: ``[CLS]`` word pieces ``[SEP]``
then ``[PAD]`` (id 0) up to 150, lower-cased and accent-stripped. The same pipeline is built
here from a WordPiece ``vocab.txt`` with the ``tokenizers`` library (needs
``tokenizers>=0.15``), so ``transformers`` is not a dependency. Nothing is ever downloaded:
the 30522-entry vocabulary must be present locally.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MAX_LENGTH = 150
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def _require_tokenizers() -> ModuleType:
    try:
        import tokenizers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "report tokenisation needs the 'tokenizers' package (tokenizers>=0.15)"
        ) from error
    return tokenizers


class ReportTokenizer:
    """Reports -> fixed-length id tensors, as ``BertTokenizerFast`` (uncased) frames them."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = MAX_LENGTH) -> None:
        if max_length < 2:
            raise ValueError(f"max_length {max_length} leaves no room for [CLS] and [SEP]")
        self.max_length = max_length
        self._tokenizer = tokenizer
        self._vocab_text: str | None = None
        vocab = tokenizer.get_vocab()
        missing = [token for token in SPECIALS if token not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id = (vocab[t] for t in SPECIALS)
        self.vocab_size = tokenizer.get_vocab_size()
        tokenizer.enable_truncation(max_length=max_length)  # keeps [SEP] last
        tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")

    @classmethod
    def from_vocab(cls, vocab_path: str | Path, max_length: int = MAX_LENGTH) -> ReportTokenizer:
        """A BERT-uncased WordPiece tokenizer over a local ``vocab.txt`` (one token a line)."""
        vocab_path = Path(vocab_path)
        if not vocab_path.is_file():
            raise FileNotFoundError(f"{vocab_path}: no such vocabulary file")
        return cls.from_vocab_text(vocab_path.read_text(encoding="utf-8"), max_length, vocab_path)

    @classmethod
    def from_vocab_text(
        cls, text: str, max_length: int = MAX_LENGTH, origin: str | Path = "vocabulary"
    ) -> ReportTokenizer:
        """From the text of a ``vocab.txt`` (token ``i`` on line ``i``), e.g. the copy a
        trained cheff checkpoint carries (:meth:`vocab_text`)."""
        tokenizers = _require_tokenizers()
        from tokenizers import normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece

        vocab = {token.rstrip(): index for index, token in enumerate(text.splitlines())}
        tokenizer = tokenizers.Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
        # lowercase=True with strip_accents unset strips accents too, as bert-base-uncased.
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        for token in ("[CLS]", "[SEP]"):
            if token not in vocab:
                raise ValueError(f"{origin}: vocabulary lacks {token}")
        tokenizer.post_processor = processors.BertProcessing(
            ("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"])
        )
        made = cls(tokenizer, max_length)
        made._vocab_text = text  # as given: ids are line numbers, even with a repeated line
        return made

    @classmethod
    def from_pretrained(
        cls, name: str | Path = "bert-base-uncased", max_length: int = MAX_LENGTH
    ) -> ReportTokenizer:
        """From a local ``vocab.txt``, a folder holding one, or the local HF cache; no download."""
        path = Path(name)
        if path.is_file():
            return cls.from_vocab(path, max_length)
        if (path / "vocab.txt").is_file():
            return cls.from_vocab(path / "vocab.txt", max_length)
        cached = _cached_vocab(str(name))
        if cached is not None:
            return cls.from_vocab(cached, max_length)
        raise FileNotFoundError(
            f"no local vocabulary for {name!r}: pass a vocab.txt or a folder holding one "
            "(for the released model, bert-base-uncased's vocab.txt); nothing is downloaded"
        )

    def vocab_text(self) -> str:
        """The vocabulary as ``vocab.txt`` text, one token a line in id order."""
        if self._vocab_text is not None:
            return self._vocab_text
        vocab = self._tokenizer.get_vocab()
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("the vocabulary's ids are not 0..N-1: it has no vocab.txt form")
        return "\n".join(sorted(vocab, key=vocab.__getitem__)) + "\n"

    def encode(self, texts: str | Sequence[str]) -> Tensor:
        """Texts -> LongTensor (B, max_length): [CLS] pieces [SEP] [PAD]...; one text gives B=1."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = [encoding.ids for encoding in encodings]
        return torch.tensor(ids, dtype=torch.long).reshape(len(ids), self.max_length)

    __call__ = encode


def _cached_vocab(name: str) -> Path | None:
    """``vocab.txt`` of a HF hub repo if it is already in the local cache, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, "vocab.txt")
    except Exception:  # an invalid repo id (e.g. a path) is simply "not cached"
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None
