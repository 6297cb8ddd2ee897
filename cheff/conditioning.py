"""What a conditioned LDM is conditioned on, and how a condition becomes token ids.

Two kinds, both fed to the U-Net's cross-attention through a transformer encoder
(:class:`~cheff.models.text_encoder.TextEncoder`):

- ``"report"``: free text, tokenised by :class:`~cheff.text.ReportTokenizer` into 150 BERT
  WordPiece ids (the released ``cheff_diff_t2i.pt``);
- ``"labels"``: the 14 unified MaCheX findings, each as one token: finding ``i`` in state
  ``s`` is token ``4 i + s`` with states positive (1), negative (0), uncertain (-1) and not
  mentioned. A 14-token "sentence" per image, so cross-attention sees every finding.

The *null condition* (what classifier-free guidance's unconditional branch sees, and what
``--cond-drop`` substitutes during training) is the empty report (``[CLS] [SEP]`` then
padding) or every finding "not mentioned". A :class:`Conditioner` pairs a kind with its
tokenizer and is all a sampler or trainer needs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from machex.records import FINDINGS

CONDITION_KINDS = ("report", "labels")
#: Label states in token order; ``None`` = not mentioned.
LABEL_STATES: tuple[int | None, ...] = (1, 0, -1, None)
_STATE_INDEX = {1: 0, 0: 1, -1: 2}
_NOT_MENTIONED = 3
_STATE_WORDS = {"positive": 1, "pos": 1, "negative": 0, "neg": 0, "uncertain": -1, "u": -1}

#: One image's labels: finding name -> 1 / 0 / -1 (absent or None: not mentioned), a
#: ``"Cardiomegaly=1,Pleural Effusion=0"`` string, or a (14,) vector with NaN for not mentioned.
Labels = Mapping[str, Any] | str | Tensor | Sequence[float]


class ConditionError(ValueError):
    """A condition cannot be read; the message names it and what was expected."""


def parse_labels(text: str) -> dict[str, int]:
    """``"Cardiomegaly=1, Pleural Effusion=-1"`` -> ``{"Cardiomegaly": 1, ...}``.

    Names match the 14 unified findings case-insensitively; values are 1, 0, -1 (or positive,
    negative, uncertain). An empty string is "nothing mentioned".
    """
    lookup = {name.lower(): name for name in FINDINGS}
    out: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        finding = lookup.get(name.strip().lower())
        if not sep or finding is None:
            raise ConditionError(
                f"label {part!r}: write FINDING=VALUE with FINDING one of {list(FINDINGS)}"
            )
        out[finding] = _state(value.strip(), finding)
    return out


def _state(value: Any, finding: str) -> int:
    if isinstance(value, str):
        word = value.lower()
        if word in _STATE_WORDS:
            return _STATE_WORDS[word]
        try:
            value = float(word)
        except ValueError:
            value = math.nan
    number = float(value)
    if number not in (1.0, 0.0, -1.0):
        raise ConditionError(
            f"{finding}={value!r}: a label is 1 (positive), 0 (negative) or -1 (uncertain)"
        )
    return int(number)


class LabelTokenizer:
    """Labels of the 14 findings -> (B, 14) token ids, one token per finding (see module doc)."""

    names: tuple[str, ...] = FINDINGS
    vocab_size = len(FINDINGS) * len(LABEL_STATES)
    max_length = len(FINDINGS)

    def _row(self, labels: Labels) -> list[int]:
        if isinstance(labels, str):
            labels = parse_labels(labels)
        if isinstance(labels, Mapping):
            lookup = {name.lower(): name for name in self.names}
            unknown = [name for name in labels if str(name).lower() not in lookup]
            if unknown:
                raise ConditionError(f"unknown findings {unknown}; known: {list(self.names)}")
            given = {lookup[str(k).lower()]: v for k, v in labels.items()}
            values = [given.get(name) for name in self.names]
        else:
            values = list(labels)
            if len(values) != len(self.names):
                raise ConditionError(
                    f"a label vector has {len(self.names)} entries (the findings "
                    f"{list(self.names)}), got {len(values)}"
                )
        row = []
        for index, (name, value) in enumerate(zip(self.names, values)):
            state = _NOT_MENTIONED if _missing(value) else _STATE_INDEX[_state(value, name)]
            row.append(index * len(LABEL_STATES) + state)
        return row

    def encode(self, labels: Labels | Sequence[Labels]) -> Tensor:
        """One image's labels or a list of them -> LongTensor (B, 14)."""
        if isinstance(labels, np.ndarray):
            labels = torch.from_numpy(labels.astype(np.float32))
        if isinstance(labels, Tensor):
            rows = [self._row(r) for r in (labels[None] if labels.ndim == 1 else labels).tolist()]
        elif isinstance(labels, (str, Mapping)) or is_label_vector(labels):
            rows = [self._row(labels)]  # type: ignore[arg-type]
        else:
            rows = [self._row(item) for item in labels]  # type: ignore[union-attr]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    __call__ = encode

    def null(self) -> Tensor:
        """(1, 14): every finding not mentioned."""
        return self.encode({})


def _missing(value: Any) -> bool:
    """Not mentioned: None, a NaN of any float type, or pandas' NA (the labels manifest's
    nullable integers), whose truth value raises."""
    if value is None:
        return True
    try:
        return bool(value != value)
    except TypeError:  # pandas' NA
        return True
    except (ValueError, RuntimeError):  # an array or tensor: not one missing value
        return False


def is_label_vector(value: Any) -> bool:
    """One label vector (numbers, NaN or NA), not a list of label rows."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        return False
    first = value[0]
    return isinstance(first, numbers.Real) or _missing(first)


@dataclass(frozen=True)
class Conditioner:
    """A condition kind with its tokenizer: conditions -> ids, and the null condition's ids."""

    kind: str
    tokenizer: Any  # ReportTokenizer for "report", LabelTokenizer for "labels"

    def __post_init__(self) -> None:
        if self.kind not in CONDITION_KINDS:
            raise ValueError(f"condition kind {self.kind!r}: choose from {CONDITION_KINDS}")

    @classmethod
    def create(
        cls, kind: str, vocab: str | None = None, *, max_length: int | None = None
    ) -> Conditioner:
        """The conditioner of ``kind``. A report model needs ``vocab``: a local ``vocab.txt``,
        a folder holding one, or a hub name already in the local cache; ``max_length`` is its
        encoder's positions (150 released). Labels always take 14 tokens."""
        if kind == "labels":
            if max_length not in (None, LabelTokenizer.max_length):
                raise ValueError(
                    f"a label encoder has {LabelTokenizer.max_length} positions (one per "
                    f"finding), not {max_length}"
                )
            return cls(kind, LabelTokenizer())
        if kind == "report":
            from cheff.text import MAX_LENGTH, ReportTokenizer

            length = max_length or MAX_LENGTH
            return cls(kind, ReportTokenizer.from_pretrained(vocab or "bert-base-uncased", length))
        raise ValueError(f"condition kind {kind!r}: choose from {CONDITION_KINDS}")

    @property
    def length(self) -> int:
        """Tokens per condition (150 for reports, 14 for labels)."""
        return int(self.tokenizer.max_length)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def ids(self, conditions: Sequence[Any]) -> Tensor:
        """(len(conditions), length) token ids, one row per condition."""
        if self.kind == "report":
            bad = [c for c in conditions if not isinstance(c, str)]
            if bad:
                raise ConditionError(f"a report model takes text, got {type(bad[0]).__name__}")
        return self.tokenizer.encode(list(conditions))

    def null_ids(self, count: int = 1) -> Tensor:
        """(count, length): the empty report, or every finding not mentioned."""
        row = self.tokenizer.encode("") if self.kind == "report" else self.tokenizer.null()
        return row.expand(count, -1).clone()


def drop_conditions(
    ids: Tensor, null_ids: Tensor, probability: float, uniform: Callable[[int], Tensor]
) -> Tensor:
    """Classifier-free guidance training: each row replaced by the null condition with
    ``probability``. ``uniform(n)`` gives n numbers in [0, 1) (the training loop's seeded
    draw, so a resumed run repeats it); nothing is drawn when ``probability`` is 0."""
    if probability <= 0:
        return ids
    drop = uniform(ids.shape[0]) < probability
    return torch.where(drop[:, None].to(ids.device), null_ids.to(ids.device), ids)
