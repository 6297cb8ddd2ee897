"""Training conditions: every image's report text or labels, looked up by key.

Read once from the collection's manifests (reports joined to images on source and study,
labels by key), so they reach the loss the same way whether the run streams images or
``cheff encode`` latents (both carry the key). Images without a condition (no report, or no
finding stated) are left out of a conditioned run: ``keys`` of the table select them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cheff.config import ConditionConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConditionTable:
    """key -> condition (report text, or a (14,) float label vector with NaN = not stated)."""

    kind: str
    conditions: dict[str, Any]

    def __len__(self) -> int:
        return len(self.conditions)

    @property
    def keys(self) -> list[str]:
        return list(self.conditions)

    def lookup(self, keys: list[str]) -> list[Any]:
        try:
            return [self.conditions[key] for key in keys]
        except KeyError as error:
            raise KeyError(f"no {self.kind} condition for image {error.args[0]}") from None


def load_conditions(
    root: str | Path, config: ConditionConfig, sources: tuple[str, ...] = ()
) -> ConditionTable:
    """The conditions of the built MaCheX ``root`` (``sources``: () = every built source)."""
    from machex.manifests import load_manifest

    root = Path(root)
    if not (root / "manifests").is_dir():
        raise ValueError(f"{root} is not a built MaCheX collection (no manifests/)")
    chosen = list(sources) or None
    if config.kind == "report":
        # Only the columns used: at 650k images all of them took 3 GB and twice the time.
        images = load_manifest(root, "images", chosen, columns=["key", "study_id"])
        columns = ["study_id", "language", config.report_text]
        reports = load_manifest(root, "reports", chosen, columns=columns)
        other = ~reports["language"].isin(config.report_languages)
        if other.any():  # PadChest's stemmed Spanish, say, in an English model
            counts = reports["language"][other].value_counts().to_dict()
            log.warning(
                "leaving out %d reports in other languages than %s (%s); add them with "
                "--set condition.report_languages=%s",
                int(other.sum()),
                ", ".join(config.report_languages),
                ", ".join(f"{n} {lang}" for lang, n in sorted(counts.items())),
                ",".join(sorted({*config.report_languages, *counts})),
            )
            reports = reports[~other]
        column = config.report_text
        frame = images.merge(
            reports[["source", "study_id", column]], on=["source", "study_id"], how="inner"
        )
        texts = frame[column].astype(object)
        keep = texts.notna() & (texts.fillna("").str.strip() != "")
        table = dict(zip(frame["key"][keep], texts[keep]))
        lacking = sorted(set(frame["source"]) - set(frame["source"][keep]))
        if lacking:  # e.g. Open-i: the original MaCheX (text_v1) never had it
            log.warning(
                "%s: reports without a %s text, so their images are left out; condition on "
                "another text (--report-text findings_impression) to use them",
                ", ".join(lacking),
                column,
            )
        _log_coverage(root, "a report text", column, len(table), len(images))
        return ConditionTable("report", table)
    if config.kind == "labels":
        from machex.records import FINDINGS

        labels = load_manifest(root, "labels", chosen)
        values = labels[list(FINDINGS)].astype("float32").to_numpy(np.float32, na_value=np.nan)
        stated = ~np.isnan(values).all(axis=1)
        table = dict(zip(labels["key"][stated], values[stated]))
        _log_coverage(root, "a stated finding", "labels", len(table), len(labels))
        return ConditionTable("labels", table)
    raise ValueError(f"condition kind {config.kind!r}: choose report or labels")


def _log_coverage(root: Path, what: str, column: str, found: int, total: int) -> None:
    if found == 0:
        raise ValueError(
            f"no image of {root} has {what} ({column}); a report model needs a source with "
            "reports (mimic, openi), a label model a labelled one"
        )
    log.info("%d of %d images of %s have %s (%s)", found, total, root, what, column)
