"""Open-i (Indiana University Chest X-ray Collection, NLM): 3,955 English radiology reports,
each listing its images (7,470 PNGs, frontal and lateral), indexed with MeSH terms.

Layout (``docs/sources/openi.md``), as downloaded from https://openi.nlm.nih.gov/faq::

    <root>/
      NLMCXR_reports.tgz              # the reports, read in place; or ecgen-radiology/ unpacked
      nlmcxr_dicom_metadata.csv.gz    # per-image DICOM header fields (View Position); optional
      NLMCXR_png/<image id>.png       # or the PNGs directly in the root

The reports are the metadata: ``ecgen-radiology/<n>.xml`` holds one report (``uId``, the
``AbstractText`` sections COMPARISON, INDICATION, FINDINGS, IMPRESSION, the MeSH ``major``
and ``automatic`` terms) and one ``parentImage`` per image. One record per listed image.

The PNGs carry no view, so the view comes from ``nlmcxr_dicom_metadata.csv(.gz)`` beside the
reports (the DICOM headers of the same images, as shipped by torchxrayvision): its ``View
Position`` through ``manifests/openi/views.csv``. An image without a known view (blank, no row,
no file) is skipped as ``unknown_view``. Labels are the report's MeSH major terms through
``labels.csv``, matched on the longest ``/``-prefix of the term (``Cardiomegaly/mild`` ->
``Cardiomegaly``); a term the table does not list is kept in ``native_labels`` only. No patient
id is published: each report stands for its patient. No official split: all ``train``.
"""

from __future__ import annotations

import logging
import re
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from machex.adapters.base import (
    DEFAULT_PLAN,
    MetadataError,
    PlanOptions,
    SourceAdapter,
    SourcePlan,
    find_metadata,
    finish_plan,
    index_files,
    keep_views,
    make_key,
    read_metadata_csv,
)
from machex.records import FINDINGS, ImageRecord, Label, Report
from machex.tables import SourceTables

log = logging.getLogger(__name__)

REPORTS_TGZ = "NLMCXR_reports.tgz"
REPORTS_FOLDER = "ecgen-radiology"
VIEWS_CSV = "nlmcxr_dicom_metadata.csv"
VIEW_COLUMNS = ("imageid", "View Position")
IMAGE_FOLDER = "NLMCXR_png"
IMAGE_SUFFIX = ".png"
#: The sections whose text makes ``findings`` and ``impression``.
FINDINGS_SECTION, IMPRESSION_SECTION = "FINDINGS", "IMPRESSION"
#: ``CXR1_1_IM-0001-3001`` (report 1 writes its image ids with an extra ``_1``) is
#: ``CXR1_IM-0001-3001`` in the DICOM metadata; every other id is written the same in both.
_INFIX = re.compile(r"^(CXR\d+)_\d+_(IM-)")
#: How many malformed report files a warning names before it only counts them.
NAMED_FILES = 10


@dataclass(frozen=True)
class ParsedReport:
    """What one ``ecgen-radiology/<n>.xml`` says."""

    report_id: str  # uId, e.g. CXR1
    sections: tuple[tuple[str, str], ...]  # (label, text) in document order, text stripped
    major: tuple[str, ...]  # MeSH major terms as written (stripped), document order
    automatic: tuple[str, ...]  # MeSH automatic terms
    images: tuple[str, ...]  # parentImage ids

    def section(self, label: str) -> str | None:
        return next((text for name, text in self.sections if name == label and text), None)

    def report(self) -> Report | None:
        """The study's ``Report``; None when every section is empty."""
        text = "\n".join(f"{name}: {body}" for name, body in self.sections if body)
        if not text:
            return None
        findings, impression = self.section(FINDINGS_SECTION), self.section(IMPRESSION_SECTION)
        # Separated by a blank line, as for every source with reports (MIMIC-CXR too).
        joined = "\n\n".join(part for part in (findings, impression) if part)
        return Report(
            study_id=self.report_id,
            language="en",
            text=text,
            findings=findings,
            impression=impression,
            findings_impression=joined or None,
            text_v1=None,  # the original MaCheX had no Open-i
        )


def parse_report(data: bytes) -> ParsedReport:
    """One report file's bytes -> ``ParsedReport``; ``ValueError`` when it is not one."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as error:
        raise ValueError(f"not well-formed XML ({error})") from None
    if root.tag != "eCitation":
        raise ValueError(f"root element <{root.tag}>, expected <eCitation>")
    uid = root.find("uId")
    report_id = (uid.get("id") or "").strip() if uid is not None else ""
    if not report_id:
        raise ValueError("no <uId id=...>")
    sections = tuple(
        ((node.get("Label") or "").strip(), "".join(node.itertext()).strip())
        for node in root.iterfind(".//Abstract/AbstractText")
    )
    images = tuple((node.get("id") or "").strip() for node in root.iterfind("parentImage"))
    if "" in images:
        raise ValueError("a <parentImage> without an id")
    return ParsedReport(
        report_id=report_id,
        sections=sections,
        major=_terms(root, "MeSH/major"),
        automatic=_terms(root, "MeSH/automatic"),
        images=images,
    )


def _terms(root: ET.Element, path: str) -> tuple[str, ...]:
    terms = ("".join(node.itertext()).strip() for node in root.iterfind(path))
    return tuple(dict.fromkeys(t for t in terms if t))  # as written, once each, in order


def _reports_location(root: Path) -> Path | None:
    """The reports tarball (preferred, as downloaded) or the unpacked folder, if present."""
    tgz = find_metadata(root, REPORTS_TGZ)
    if tgz is not None:
        return tgz
    folder = root / REPORTS_FOLDER
    return folder if folder.is_dir() else None


def read_report_files(location: Path) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every ``.xml`` file of the tarball or folder, in name order."""
    if location.is_dir():
        for path in sorted(location.glob("*.xml")):
            yield f"{location.name}/{path.name}", path.read_bytes()
        return
    try:
        with tarfile.open(location, "r:*") as archive:
            members = sorted(
                (m for m in archive.getmembers() if m.isfile() and m.name.endswith(".xml")),
                key=lambda m: m.name,
            )
            for member in members:
                handle = archive.extractfile(member)
                assert handle is not None  # a regular file
                yield member.name, handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise MetadataError(
            f"{location}: cannot read as a .tgz of report XML files ({error})"
        ) from None


def view_table(path: Path | None) -> dict[str, str]:
    """``{imageid: View Position}`` from the DICOM metadata CSV (empty without one)."""
    if path is None:
        return {}
    frame = read_metadata_csv(path, VIEW_COLUMNS, usecols=VIEW_COLUMNS)
    return dict(zip(frame["imageid"].str.strip(), frame["View Position"].str.strip()))


def metadata_id(image_id: str) -> str:
    """The id the DICOM metadata gives an image (``CXR1_1_IM-0001-3001`` ->
    ``CXR1_IM-0001-3001``; every other id is unchanged)."""
    return _INFIX.sub(r"\1_\2", image_id)


class TermMap:
    """MeSH term -> findings via ``labels.csv``: the longest ``/``-prefix of the term that the
    table lists (``Pleural Effusion/bilateral/small`` -> ``Pleural Effusion``), matched without
    regard to case or repeated spaces; a term with no listed prefix maps to nothing."""

    def __init__(self, tables: SourceTables) -> None:
        self.findings: dict[str, tuple[str, ...]] = {}
        for native, findings in tables.label_map.items():
            key = self.normal(native)
            if key in self.findings and self.findings[key] != findings:
                raise MetadataError(
                    f"manifests/openi/labels.csv: {native!r} repeats another row's term "
                    "with other findings"
                )
            self.findings[key] = findings
        self._cache: dict[str, tuple[str, ...]] = {}

    @staticmethod
    def normal(term: str) -> str:
        return "/".join(" ".join(part.split()).lower() for part in term.split("/"))

    def __call__(self, term: str) -> tuple[str, ...]:
        if term not in self._cache:
            parts = self.normal(term).split("/")
            prefixes = ("/".join(parts[:n]) for n in range(len(parts), 0, -1))
            self._cache[term] = next((self.findings[p] for p in prefixes if p in self.findings), ())
        return self._cache[term]


def mesh_labels(
    terms: tuple[str, ...], term_map: TermMap, tables: SourceTables
) -> dict[str, Label]:
    """The 14 findings of one report: ``1`` for each finding a major term maps to; the others
    from ``absent.csv`` (none: null, since MeSH indexing lists what a report says, not what it
    rules out)."""
    labels: dict[str, Label] = {f: tables.absent.get(f) for f in FINDINGS}
    for term in terms:
        for finding in term_map(term):
            labels[finding] = 1
    return labels


class OpenIAdapter(SourceAdapter):
    name = "openi"
    aliases = ("open-i", "iu-xray")
    title = "Open-i (Indiana University Chest X-ray Collection, NLM)"
    homepage = "https://openi.nlm.nih.gov/faq"
    licence = (
        "CC BY-NC-ND 4.0 (public download, no registration; named in every report's "
        "licenseURL and in the Open-i FAQ)"
    )
    citation = (
        "Demner-Fushman D. et al. Preparing a collection of radiology examinations for "
        "distribution and retrieval. J Am Med Inform Assoc 23(2), 304-310 (2016)."
    )
    metadata_files = (f"{REPORTS_TGZ}|{REPORTS_FOLDER}/",)
    image_formats = ("png",)

    def holds_metadata(self, folder: Path) -> bool:
        # The reports may be a folder (ecgen-radiology/ unpacked), which find_metadata,
        # looking for files, does not see.
        return _reports_location(folder) is not None

    def plan(
        self, root: Path, tables: SourceTables, options: PlanOptions = DEFAULT_PLAN
    ) -> SourcePlan:
        self.check_format(options.prefer)
        location = _reports_location(root)
        assert location is not None  # locate_root checked it
        skipped: Counter[str] = Counter()
        warnings: list[str] = []
        reports, malformed = self._read_reports(location, skipped)
        if malformed:
            named = ", ".join(malformed[:NAMED_FILES])
            more = (
                f" and {len(malformed) - NAMED_FILES} more" if len(malformed) > NAMED_FILES else ""
            )
            warnings.append(
                f"{location}: {len(malformed)} report files skipped "
                f"(malformed_report, duplicate_report): {named}{more}"
            )
        without_images = sum(not r.images for _, r in reports)
        if without_images:
            warnings.append(f"reports that list no image: {without_images} (nothing to build)")

        views_path = find_metadata(root, VIEWS_CSV)
        views = view_table(views_path)
        if views_path is None:
            warnings.append(
                f"{VIEWS_CSV}(.gz) not found in {root}: the PNGs carry no view, so every image "
                "is skipped as unknown_view (get the file from torchxrayvision's package data, "
                "or write it from the DICOM headers; docs/sources/openi.md)"
            )
        rows = [
            (index, image_id, views.get(image_id, views.get(metadata_id(image_id))))
            for index, (_, report) in enumerate(reports)
            for image_id in report.images
        ]
        no_row = sum(view is None for *_, view in rows)
        blank = sum(view == "" for *_, view in rows)
        if views_path is not None and (no_row or blank):
            warnings.append(
                f"images without a View Position: {no_row + blank} ({blank} blank in "
                f"{views_path.name}, {no_row} without a row), skipped as unknown_view"
            )
        frame = pd.DataFrame(
            {
                "report": [index for index, _, _ in rows],
                "image_id": [image_id for _, image_id, _ in rows],
                "view": [view or "" for *_, view in rows],
            },
            dtype=object,
        )
        frame = keep_views(frame, "view", tables, skipped, options.views)

        files = index_files([root / IMAGE_FOLDER, root], IMAGE_SUFFIX)
        term_map = TermMap(tables)
        per_report: dict[int, tuple[dict[str, Label], Report | None, dict[str, object]]] = {}
        records: list[ImageRecord] = []
        for index, image_id, view in zip(frame["report"], frame["image_id"], frame["view"]):
            name, report = reports[index]
            if index not in per_report:
                extras: dict[str, object] = {"report_file": name}
                if report.automatic:
                    extras["mesh_automatic"] = list(report.automatic)
                labels = mesh_labels(report.major, term_map, tables)
                per_report[index] = (labels, report.report(), extras)
            labels, text, extras = per_report[index]
            records.append(
                ImageRecord(
                    key=make_key(self.name, image_id),
                    source=self.name,
                    source_key=f"{IMAGE_FOLDER}/{image_id}{IMAGE_SUFFIX}",
                    path=files.get(f"{image_id}{IMAGE_SUFFIX}"),
                    patient_id=report.report_id,  # none published: the report stands for it
                    study_id=report.report_id,
                    view=view.strip(),
                    split="train",  # no official split
                    labels=dict(labels),
                    native_labels=report.major,
                    report=text,
                    extras=dict(extras),
                )
            )
        log.info(
            "%s: %d reports, %d images listed, %d with a view the selection takes",
            self.name,
            len(reports),
            len(rows),
            len(records),
        )
        return finish_plan(self.name, root, records, skipped, tables, warnings)

    @staticmethod
    def _read_reports(
        location: Path, skipped: Counter[str]
    ) -> tuple[list[tuple[str, ParsedReport]], list[str]]:
        """Every readable report, with its file name; the names of the malformed ones (each
        counted as ``malformed_report``, a repeated report id as ``duplicate_report``)."""
        reports: list[tuple[str, ParsedReport]] = []
        malformed: list[str] = []
        seen: dict[str, str] = {}
        for name, data in read_report_files(location):
            try:
                report = parse_report(data)
            except ValueError as error:
                skipped["malformed_report"] += 1
                malformed.append(f"{name} ({error})")
                continue
            if report.report_id in seen:
                skipped["duplicate_report"] += 1
                malformed.append(
                    f"{name} (report id {report.report_id} also in {seen[report.report_id]})"
                )
                continue
            seen[report.report_id] = name
            reports.append((name, report))
        if not reports and malformed:
            raise MetadataError(f"{location}: no readable report ({malformed[0]})")
        if not reports:
            raise MetadataError(
                f"{location}: no report XML files (expected {REPORTS_FOLDER}/*.xml)"
            )
        return reports, malformed
