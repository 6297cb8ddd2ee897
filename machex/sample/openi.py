"""Miniature Open-i (Indiana University Chest X-ray Collection) in its real layout.

``NLMCXR_reports.tgz`` holds ``ecgen-radiology/<n>.xml`` reports with the element structure of
the real files (copied from ``../shared/real/metadata/NLMCXR_reports.tgz``; the report text is
synthetic), ``nlmcxr_dicom_metadata.csv.gz`` a subset of the real file's columns, in its order,
with the real ``imageid`` and ``View Position`` spellings, and ``NLMCXR_png/`` one small 8-bit
PNG per listed image. Eight reports cover what the adapter handles: PA, AP, ``LL`` and
``LATERAL`` views, a blank ``View Position`` and an image without a metadata row; report 1's
image ids with their extra ``_1`` (``CXR1_1_IM-0001-3001``, ``CXR1_IM-0001-3001`` in the
CSV); image ids with a ``-0001`` suffix; a report without images; empty sections (a
self-closing ``FINDINGS``); MeSH terms that map (``Cardiomegaly/mild``), that map only with a
qualifier (``Nodule/lung`` but not ``Nodule/breast``), that the table lists as unmapped
(``Cardiomegaly/borderline``) and that it does not know (``Pulmonary Artery/enlarged``).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from machex.sample.common import save_image, synthetic_radiograph

#: The source this module writes a miniature of (found by ``machex.sample``).
SOURCE = "openi"

FOLDER = "NLMCXR"
#: A subset of the 190 columns of the real ``nlmcxr_dicom_metadata.csv``, in its order.
CSV_COLUMNS = (
    "imageid",
    "Accession Number",
    "Bits Allocated",
    "Bits Stored",
    "Columns",
    "Modality",
    "Patient ID",
    "Photometric Interpretation",
    "Rows",
    "View Position",
    "filename",
)
#: The real tarball's timestamp (2016-02-02), so the bytes do not depend on the clock.
MTIME = 1454448782
NO_ROW = None  # an image the DICOM metadata has no row for


@dataclass(frozen=True)
class SampleReport:
    number: int
    sections: tuple[str, str, str, str]  # COMPARISON, INDICATION, FINDINGS, IMPRESSION ("": empty)
    major: tuple[str, ...]
    automatic: tuple[str, ...]
    images: tuple[tuple[str, str | None], ...]  # (parentImage id, View Position or NO_ROW)


SECTION_LABELS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")
REPORTS = (
    SampleReport(
        1,
        ("None.", "Synthetic indication one.", "Heart size normal. Lungs clear.", "Normal chest."),
        ("normal",),
        (),
        (("CXR1_1_IM-0001-3001", "PA"), ("CXR1_1_IM-0001-4001", "LL")),
    ),
    SampleReport(
        2,
        ("None.", "Synthetic indication two.", "Borderline heart size.", "No acute disease."),
        ("Cardiomegaly/borderline", "Pulmonary Artery/enlarged"),
        ("Cardiomegaly",),
        (("CXR2_IM-0652-1001", "PA"), ("CXR2_IM-0652-2001", "LATERAL")),
    ),
    SampleReport(
        3,
        (
            "Synthetic prior XXXX.",
            "XXXX-year-old with dyspnea.",
            "Mild cardiomegaly. Small bilateral effusions. Right catheter tip in the SVC.",
            "Cardiomegaly with small effusions.",
        ),
        ("Cardiomegaly/mild", "Pleural Effusion/bilateral/small", "Catheters, Indwelling/right"),
        ("Cardiomegaly", "effusion", "catheter"),
        (("CXR3_IM-1384-1001", "AP"), ("CXR3_IM-1384-2001", "LL")),
    ),
    SampleReport(
        4,
        (
            "None.",
            "Synthetic cough.",
            "Left basilar opacity with atelectasis. Calcified granuloma in the right upper lobe.",
            "Left basilar atelectasis.",
        ),
        (
            "Opacity/lung/base/left",
            "Pulmonary Atelectasis/base/left",
            "Calcified Granuloma/lung/upper lobe/right",
        ),
        ("opacity", "atelectases"),
        (("CXR4_IM-2050-1001", ""), ("CXR4_IM-2050-2001", "PA")),
    ),
    SampleReport(
        5,
        ("None.", "Synthetic report without images.", "Clear lungs.", "Normal."),
        ("normal",),
        (),
        (),
    ),
    SampleReport(
        6,
        (
            "",
            "Synthetic fall.",
            "Healing left rib fractures. Breast nodule shadow.",
            "Old left rib fractures.",
        ),
        ("Fractures, Bone/ribs/left/healed", "Nodule/breast/left"),
        ("Fractures, Bone",),
        (("CXR6_IM-2192-1001", NO_ROW), ("CXR6_IM-2192-2001", "PA")),
    ),
    SampleReport(
        7,
        ("None.", "Synthetic follow-up.", "", "No acute cardiopulmonary abnormality."),
        ("No Indexing",),
        (),
        (
            ("CXR7_IM-2263-1001-0001", "PA"),
            ("CXR7_IM-2263-1001-0002", "PA"),
            ("CXR7_IM-2263-2001", "LL"),
        ),
    ),
    SampleReport(
        8,
        (
            "None.",
            "Synthetic chest tube check.",
            "Right hydropneumothorax with a chest tube. A nodule in the left lung.",
            "Right hydropneumothorax. Left lung nodule.",
        ),
        ("Hydropneumothorax/right", "Tube, Inserted/thorax", "Nodule/lung/upper lobe/left"),
        ("Pneumothorax", "nodule"),
        (("CXR8_IM-2333-1001", "AP"),),
    ),
)


def _xml(report: SampleReport) -> str:
    """One report in the element order and indentation of the real files."""
    abstract = "\n".join(
        f"            <AbstractText Label={quoteattr(label)}>{escape(text)}</AbstractText>"
        if text
        else f"            <AbstractText Label={quoteattr(label)}/>"
        for label, text in zip(SECTION_LABELS, report.sections)
    )
    mesh = "\n".join(
        [f"      <major>{escape(term)}</major>" for term in report.major]
        + [f"      <automatic>{escape(term)}</automatic>" for term in report.automatic]
    )
    images = "".join(
        f"""
   <parentImage id={quoteattr(image_id)}>
      <figureId>F{n}</figureId>
      <caption>Xray Chest PA and Lateral</caption>
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/{escape(image_id)}.jpg</url>
         <imgModality>7</imgModality>
         <region type="panel">
            <globalImageFeatures>
               <CEDD>f2p0k{1000 + n}</CEDD>
            </globalImageFeatures>
         </region>
      </panel>
   </parentImage>"""
        for n, (image_id, _) in enumerate(report.images, 1)
    )
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{report.number}"/>
   <pmcId id="{report.number}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{report.number}"/>
   <licenseType>open-access</licenseType>
   <licenseURL>http://creativecommons.org/licenses/by-nc-nd/4.0/</licenseURL>
   <ccLicense>byncnd</ccLicense>
   <articleURL/>
   <articleDate>2013-08-01</articleDate>
   <articleType>XR</articleType>
   <publisher>Indiana University</publisher>
   <title>Indiana University Chest X-ray Collection</title>
   <note>The data are drawn from multiple hospital systems.</note>
   <specialty>pulmonary diseases</specialty>
   <subset>CXR</subset>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Journal>
            <JournalIssue>
               <PubDate>
                  <Year>2013</Year>
                  <Month>08</Month>
                  <Day>01</Day>
               </PubDate>
            </JournalIssue>
         </Journal>
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
{abstract}
         </Abstract>
         <Affiliation>Indiana University</Affiliation>
         <AuthorList CompleteYN="Y">
            <Author ValidYN="Y">
               <LastName>Sample</LastName>
               <ForeName>Synthetic</ForeName>
               <Initials>S</Initials>
            </Author>
         </AuthorList>
         <Language>eng</Language>
         <PublicationTypeList>
            <PublicationType>Radiology Report</PublicationType>
         </PublicationTypeList>
      </Article>
      <EssieArticleTitle>Indiana University Chest X-ray Collection</EssieArticleTitle>
      <IMedAuthor>Synthetic Sample S</IMedAuthor>
   </MedlineCitation>
   <MeSH>
{mesh}
   </MeSH>{images}
</eCitation>
"""


def write_reports_tgz(path: Path, files: dict[str, bytes]) -> None:
    """A gzipped tar of ``{member name: bytes}`` under ``ecgen-radiology/``, with fixed
    timestamps and owners (and no name or time in the gzip header): same input, same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        folder = tarfile.TarInfo("ecgen-radiology/")
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, MTIME
        archive.addfile(folder)
        for name, data in files.items():
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            archive.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(buffer.getvalue())


def _csv_cell(text: str) -> str:
    return f'"{text}"' if "," in text or '"' in text else text


def write_view_csv(path: Path, rng: np.random.Generator) -> None:
    """``nlmcxr_dicom_metadata.csv.gz``: one row per listed image that has one."""
    lines = [",".join(_csv_cell(c) for c in CSV_COLUMNS)]
    for report in REPORTS:
        accession = str(int(rng.integers(10**15, 10**16)))
        for image_id, view in report.images:
            if view is NO_ROW:
                continue
            dicom_id = image_id.replace("CXR1_1_", "CXR1_")  # the CSV's spelling of report 1
            rows, columns = ("2828", "2320") if view in ("PA", "AP") else ("2320", "2828")
            photometric = "MONOCHROME1" if report.number % 2 else "MONOCHROME2"
            cells = {
                "imageid": dicom_id,
                "Accession Number": accession,
                "Bits Allocated": "16",
                "Bits Stored": "12",
                "Columns": columns,
                "Modality": "CR",
                "Patient ID": str(report.number),
                "Photometric Interpretation": photometric,
                "Rows": rows,
                "View Position": view,
                "filename": f"./{dicom_id.removeprefix('CXR')}.dcm",
            }
            lines.append(",".join(_csv_cell(cells[c]) for c in CSV_COLUMNS))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write("".join(line + "\n" for line in lines).encode("utf-8"))


def make_openi(dest: Path, rng: np.random.Generator) -> Path:
    """Write the miniature under ``dest/NLMCXR`` and return that folder."""
    root = Path(dest) / FOLDER
    files = {f"{r.number}.xml": _xml(r).encode("utf-8") for r in REPORTS}
    write_reports_tgz(root / "NLMCXR_reports.tgz", files)
    write_view_csv(root / "nlmcxr_dicom_metadata.csv.gz", rng)
    for report in REPORTS:
        for image_id, view in report.images:
            lateral = view in ("LL", "LATERAL")
            width, height = (320, 272) if lateral else (272, 320)
            save_image(
                root / "NLMCXR_png" / f"{image_id}.png", synthetic_radiograph(rng, width, height)
            )
    return root


def make(dest: Path, rng: np.random.Generator) -> Path:
    return make_openi(dest, rng)
