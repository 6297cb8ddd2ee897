"""Free-text radiology reports: section parsing and the conditioning texts built from them.

Pure functions on strings, no file access. The parser follows the MIMIC-CXR report format
(``../shared/datasets/SOURCES.md`` section 3), which is the common shape of English chest
radiograph reports::

                                     FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)

     INDICATION:  ___F with cough

     FINDINGS:

     The lungs are clear.  There is no pleural effusion or pneumothorax.  The
     cardiomediastinal silhouette is normal.

     IMPRESSION:

     No acute cardiopulmonary process.

- A section starts with an upper-case header and a colon at the start of a line (usually one
  space in), e.g. ``FINDINGS:``; its text may follow on the same line. Spellings are
  normalised by ``SECTION_NAMES`` (``CONCLUSION`` is an impression, ``COMPARISONS`` a
  comparison...); a header not listed still ends the section before it, under its own name.
- Addenda come first, each separated from what follows by a full line of underscores; an
  ``ADDENDUM:`` section may also stand inside a report. The report proper is the last block
  that is not an addendum; ``findings`` and ``impression`` are taken from it, and from the
  addenda (newest first) only where it has no such section. Addendum text never leaks into
  the sections.
- Clean section text: hard-wrapped lines are joined into paragraphs (one space), paragraphs
  are separated by a blank line, a numbered item (``2. ...``) starts its own line, runs of
  white space become one space, and every de-identification mark (a run of 3 or more
  underscores) is written ``___``, with no space between it and the punctuation after it.

``mimic_text_v1`` is the exact text the original MaCheX fed its report model, kept for
models trained on it; ``findings_impression`` is the clean conditioning text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from machex.records import Report

#: Header spelling (upper case, as written before the colon) -> canonical section name.
#: The variants are those listed in SOURCES.md section 3 and the frequent ones of the
#: MIT-LCP MIMIC-CXR section parser; ``CHEST, TWO VIEWS`` heads the findings there.
SECTION_NAMES: dict[str, str] = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "CHEST, TWO VIEWS": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
    "CONCLUSIONS": "impression",
    "FINDINGS AND IMPRESSION": "impression",
    "FINDINGS/IMPRESSION": "impression",
    "FINDINGS/ IMPRESSION": "impression",
    "EXAMINATION": "examination",
    "EXAM": "examination",
    "TYPE OF EXAMINATION": "examination",
    "INDICATION": "indication",
    "CLINICAL INDICATION": "indication",
    "REASON FOR EXAMINATION": "indication",
    "REASON FOR EXAM": "indication",
    "HISTORY": "history",
    "CLINICAL HISTORY": "history",
    "CLINICAL INFORMATION": "history",
    "PATIENT HISTORY": "history",
    "TECHNIQUE": "technique",
    "COMPARISON": "comparison",
    "COMPARISONS": "comparison",
    "COMPARISON EXAM": "comparison",
    "COMPARISON FILM": "comparison",
    "REFERENCE EXAM": "comparison",
    "RECOMMENDATION": "recommendations",
    "RECOMMENDATIONS": "recommendations",
    "RECOMMENDATION(S)": "recommendations",
    "NOTIFICATION": "notification",
    "ADDENDUM": "addendum",
    "WET READ": "wet read",
    "WETREAD": "wet read",
    "COMMENT": "comment",
    "COMMENTS": "comment",
}

#: A section header at the start of a line: upper-case words (and ``( ) / , & -``), a colon.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&-]*[A-Z)]):", re.MULTILINE)
#: A full line of underscores: separates an addendum from the report below it.
_SEPARATOR = re.compile(r"^[ \t]*_{10,}[ \t]*$", re.MULTILINE)
#: One or more blank (or white) lines: a paragraph break.
_PARAGRAPH = re.compile(r"\n(?:[ \t]*\n)+")
#: A line break before a numbered item, e.g. ``2. Small left effusion.``: kept.
_ITEM_BREAK = re.compile(r"[ \t]*\n[ \t]*(?=\d{1,2}[.)][ \t]+\S)")
#: A de-identification mark: MIMIC writes ``___``; any run of 3 or more is one mark.
_DEID = re.compile(r"_{3,}")
#: Spaces between a mark and the punctuation after it (``on ___ , at`` -> ``on ___, at``).
_DEID_PUNCT = re.compile(r"___ +(?=[,.;:)])")
#: Stands for a kept line break while white space is collapsed (never in a report's text).
_KEPT_BREAK = "\0"


@dataclass(frozen=True)
class ReportSections:
    """What ``parse_report`` finds in one report.

    ``sections`` are the report proper's sections in order, ``(canonical name, clean text)``
    (the text before the first header is ``preamble``, left out when empty); ``addendum`` the
    clean text of every addendum (blocks above the report and ``ADDENDUM:`` sections), newest
    first, ``None`` when there is none."""

    findings: str | None
    impression: str | None
    addendum: str | None
    sections: tuple[tuple[str, str], ...]

    @property
    def findings_impression(self) -> str | None:
        return join_findings_impression(self.findings, self.impression)


@lru_cache(maxsize=4096)
def section_name(header: str) -> str:
    """The canonical name of a header as written (``CONCLUSION`` -> ``impression``); a header
    not in ``SECTION_NAMES`` is its own name, lower case with single spaces."""
    spelled = " ".join(header.split())
    return SECTION_NAMES.get(spelled, spelled.lower())


def clean_text(raw: str) -> str | None:
    """Section text as clean paragraphs: wrapped lines joined with one space, paragraphs
    separated by a blank line, numbered items on their own line, white space collapsed,
    de-identification marks written ``___``. ``None`` when nothing is left."""
    paragraphs = []
    for paragraph in _PARAGRAPH.split(_newlines(raw)):
        paragraph = " ".join(_ITEM_BREAK.sub(_KEPT_BREAK, paragraph).split())
        if paragraph:
            paragraphs.append(paragraph.replace(_KEPT_BREAK, "\n"))
    text = _DEID.sub("___", "\n\n".join(paragraphs))
    return _DEID_PUNCT.sub("___", text) or None


def split_sections(text: str) -> list[tuple[str, str]]:
    """``(canonical name, raw text)`` of every section of one block, in order; the text before
    the first header is ``preamble``. Raw text keeps its line breaks."""
    text = _newlines(text)
    sections: list[tuple[str, str]] = []
    name, start = "preamble", 0
    for match in _HEADER.finditer(text):
        sections.append((name, text[start : match.start()]))
        name, start = section_name(match.group(1)), match.end()
    sections.append((name, text[start:]))
    return sections


def split_blocks(text: str) -> list[str]:
    """The blocks of a report separated by full lines of underscores, top first."""
    return [block for block in _SEPARATOR.split(_newlines(text)) if block.strip()]


def _is_addendum(sections: list[tuple[str, str]]) -> bool:
    """A block is an addendum when its title says so (``FINAL ADDENDUM``) or its first
    section is ``ADDENDUM:``."""
    if sections[0][0] == "preamble" and "ADDENDUM" in sections[0][1].upper():
        return True
    named = [name for name, _ in sections if name != "preamble"]
    return bool(named) and named[0] == "addendum"


def _blocks(text: str) -> tuple[list[list[tuple[str, str]]], int, list[int]]:
    """The raw sections of every block, the index of the report proper (the last block that
    is not an addendum; the last block if all are) and the indices of the addenda."""
    blocks = [split_sections(block) for block in split_blocks(text)]
    addenda = [i for i, sections in enumerate(blocks) if _is_addendum(sections)]
    proper = [i for i in range(len(blocks)) if i not in addenda]
    main = proper[-1] if proper else len(blocks) - 1
    return blocks, main, addenda


def _last_clean(sections: list[tuple[str, str]], wanted: str) -> str | None:
    """The clean text of the last non-empty ``wanted`` section (cleaning only what is needed)."""
    for name, raw in reversed(sections):
        if name == wanted:
            value = clean_text(raw)
            if value:
                return value
    return None


def findings_and_impression(text: str) -> tuple[str | None, str | None]:
    """The clean findings and impression of a report: the report proper's last non-empty
    section of each, else the newest addendum's. The fast path of ``parse_report``."""
    blocks, main, addenda = _blocks(text)
    if not blocks:
        return None, None
    found = []
    for wanted in ("findings", "impression"):
        value = _last_clean(blocks[main], wanted)
        for i in addenda:  # top first: the newest addendum
            if value is None and i != main:
                value = _last_clean(blocks[i], wanted)
        found.append(value)
    return found[0], found[1]


def parse_report(text: str) -> ReportSections:
    """Split a report into its sections and find the findings, impression and addenda."""
    blocks, main, addenda = _blocks(text)
    if not blocks:
        return ReportSections(None, None, None, ())
    findings, impression = findings_and_impression(text)
    addendum_texts = []
    for i, sections in enumerate(blocks):
        if i == main:
            wanted = [raw for name, raw in sections if name == "addendum"]
        elif i in addenda:
            wanted = [raw for name, raw in sections if name != "preamble"]
        else:
            continue
        addendum_texts += filter(None, map(clean_text, wanted))
    cleaned = ((name, clean_text(raw)) for name, raw in blocks[main])
    return ReportSections(
        findings=findings,
        impression=impression,
        addendum="\n\n".join(addendum_texts) or None,
        sections=tuple((n, v) for n, v in cleaned if v and not _is_title(n, v)),
    )


def _is_title(name: str, value: str) -> bool:
    """The centred ``FINAL REPORT`` line is a title, not a preamble worth keeping."""
    return name == "preamble" and value in ("FINAL REPORT", "FINAL ADDENDUM")


def join_findings_impression(findings: str | None, impression: str | None) -> str | None:
    """The clean conditioning text: findings and impression separated by a blank line, or
    whichever of the two there is."""
    if findings and impression:
        return f"{findings}\n\n{impression}"
    return findings or impression or None


def mimic_text_v1(text: str | None) -> str | None:
    """The report text of the original MaCheX build (``machex.py``, ``MIMICParser``), exactly:
    the text after the last ``FINDINGS:`` if there is one, else after the last
    ``IMPRESSION:`` (the whole report if neither), every literal ``IMPRESSION:`` deleted,
    newlines dropped (not replaced by a space), runs of spaces collapsed, stripped.

    ``text`` is the file's content; line ends are read as Python's text mode reads them
    (``\\r\\n`` and ``\\r`` become ``\\n``). A missing or empty report gives ``None``."""
    if not text:
        return None
    report = _newlines(text)
    if "FINDINGS:" in report:
        report = report.split("FINDINGS:")[-1]
    else:
        report = report.split("IMPRESSION:")[-1]
    report = report.replace("IMPRESSION:", "").replace("\n", "")
    report = re.sub(" +", " ", report).strip()
    return report or None


def make_report(
    study_id: str,
    text: str,
    language: str = "en",
    *,
    text_v1: str | None = None,
) -> Report:
    """A ``Report`` with its sections parsed from ``text``.

    Equal strings are stored once: ``findings_impression`` is the ``findings`` (or
    ``impression``) object itself when only one exists, and ``text_v1`` reuses it when equal."""
    findings, impression = findings_and_impression(text)
    joined = join_findings_impression(findings, impression)
    if text_v1 is not None:
        for same in (joined, findings, impression):
            if same is not None and same == text_v1:
                text_v1 = same
                break
    return Report(
        study_id=study_id,
        language=language,
        text=text,
        findings=findings,
        impression=impression,
        findings_impression=joined,
        text_v1=text_v1,
    )


def mimic_report(study_id: str, text: str) -> Report:
    """A MIMIC-CXR study's report: English, with the MaCheX v1 text."""
    return make_report(study_id, text, "en", text_v1=mimic_text_v1(text))


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


__all__ = [
    "SECTION_NAMES",
    "ReportSections",
    "clean_text",
    "findings_and_impression",
    "join_findings_impression",
    "make_report",
    "mimic_report",
    "mimic_text_v1",
    "parse_report",
    "section_name",
    "split_blocks",
    "split_sections",
]
