"""The uniform records that flow from a source adapter to the build.

Adapters turn one dataset's metadata into ``ImageRecord``s; nothing downstream reads a
source's CSV again. Everything is frozen so a record can be shipped to worker processes
and compared in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The 14 CheXpert observations: the unified label space of MaCheX, in CheXpert's order.
FINDINGS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: Findings that make an image not "No Finding" (CheXpert: Support Devices do not).
PATHOLOGIES: tuple[str, ...] = tuple(
    f for f in FINDINGS if f not in ("No Finding", "Support Devices")
)

#: Official split names every source is mapped onto.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Tri-state label value: 1 positive, 0 negative, -1 uncertain, None not mentioned.
Label = int | None


@dataclass(frozen=True)
class BoxRecord:
    """One annotated box, ``x, y`` top-left plus ``width, height``.

    ``frame`` is the (width, height) of the pixel frame the coordinates refer to. NIH boxes
    are given in the 1024x1024 PNG frame even where a user's copy is smaller, so the build
    first rescales from ``frame`` to the decoded image, then applies the resize and crop.
    ``None`` means the decoded image's own frame.
    """

    label: str
    x: float
    y: float
    width: float
    height: float
    frame: tuple[int, int] | None = None
    reader: str | None = None
    finding: str | None = None  # the unified finding the label maps to, if any


#: The report texts a build can condition on (``--report-text``); ``text_v1`` is what the
#: original MaCheX fed the released report model.
REPORT_TEXTS: tuple[str, ...] = ("text_v1", "findings_impression", "impression", "findings", "text")


@dataclass(frozen=True)
class Report:
    """One study's free-text report: the full ``text`` as released and its sections.

    ``findings_impression`` is the clean conditioning text (the two sections, joined);
    ``text_v1`` is the text the original MaCheX built for the released report model.
    ``language`` is an ISO 639-1 code: ``es`` reports (PadChest) are kept but never used as
    conditioning text unless asked for.
    """

    study_id: str
    language: str
    text: str
    findings: str | None = None
    impression: str | None = None
    findings_impression: str | None = None
    text_v1: str | None = None

    def conditioning(self, field_name: str, languages: tuple[str, ...] = ("en",)) -> str | None:
        """The text to condition on: ``field_name`` of ``REPORT_TEXTS``, if the report is in
        one of ``languages`` and the field is not empty."""
        if self.language not in languages:
            return None
        value = getattr(self, field_name)
        return value or None


@dataclass(frozen=True)
class ReportChoice:
    """Which report text a sample's ``report`` field carries (``--report-text``) and for
    which report languages (``--report-languages``)."""

    field: str = "text_v1"
    languages: tuple[str, ...] = ("en",)

    def __post_init__(self) -> None:
        if self.field not in REPORT_TEXTS:
            raise ValueError(f"--report-text {self.field!r}: choose one of {list(REPORT_TEXTS)}")
        if not self.languages:
            raise ValueError("--report-languages: name at least one language, e.g. en")
        # One spelling per choice, so that build.json's record compares equal on resume.
        object.__setattr__(self, "languages", tuple(sorted({x.lower() for x in self.languages})))

    def as_dict(self) -> dict[str, object]:
        """JSON-ready (as ``build.json`` records it)."""
        return {"field": self.field, "languages": list(self.languages)}

    def text(self, report: Report | None) -> str | None:
        return report.conditioning(self.field, self.languages) if report else None


@dataclass(frozen=True)
class ReaderLabel:
    """One reader marked one native label present on one image (VinDr-CXR: three
    radiologists read each training image). Only positive calls are kept: the image's
    ``extras["readers"]`` lists who read it, so every other (reader, label) is a 0."""

    reader: str
    label: str
    finding: str | None = None  # the unified finding the label maps to, if any


@dataclass(frozen=True)
class ImageRecord:
    """One frontal image as the source describes it, before any pixel is read.

    ``source_key`` is the path relative to the dataset root as released; ``path`` is where
    the file was found on disk (``None`` when it is missing: the build then records a
    failure instead of crashing). A plain ``str``: plans hold hundreds of thousands.
    """

    key: str
    source: str
    source_key: str
    path: str | None
    patient_id: str
    study_id: str | None
    view: str
    split: str
    sex: str | None = None
    age: float | None = None
    labels: dict[str, Label] = field(default_factory=dict)
    native_labels: tuple[str, ...] = ()
    report: Report | None = None  # the study's report, shared by the study's images
    boxes: tuple[BoxRecord, ...] = ()
    reader_labels: tuple[ReaderLabel, ...] = ()  # per-reader votes where a source has them
    #: Source-specific fields, JSON-ready (plain values, lists of them, or str -> int maps).
    extras: dict[str, object] = field(default_factory=dict)
    window: tuple[float, float] | None = None  # (centre, width) when the source gives one


@dataclass(frozen=True)
class Failure:
    """A record that could not be built, kept in the ``failures`` table."""

    key: str
    source: str
    source_key: str
    path: str | None
    error_type: str
    message: str
