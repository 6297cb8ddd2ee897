"""The report parser (machex/reports.py) on reports in the MIMIC-CXR format: written here after
the documented format (SOURCES.md section 3; the real ones are credentialed) and, for real
English prose, the Open-i (Indiana University) report texts of ../shared set into that format."""

from __future__ import annotations

import re
import tarfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from machex.reports import (
    clean_text,
    join_findings_impression,
    make_report,
    mimic_report,
    mimic_text_v1,
    parse_report,
    section_name,
    split_blocks,
)

TITLE = "                                 FINAL REPORT"


def report(*lines: str) -> str:
    """A report as MIMIC-CXR writes it: every line one space in, blank lines one space."""
    return "".join(f" {line}\n" for line in lines)


FULL = report(
    TITLE,
    "EXAMINATION:  CHEST (PA AND LAT)",
    "",
    "INDICATION:  ___M with chest pain.",
    "",
    "TECHNIQUE:  Chest PA and lateral",
    "",
    "COMPARISON:  ___",
    "",
    "FINDINGS: ",
    "",
    "The lungs are clear without focal consolidation.  No pleural effusion or",
    "pneumothorax is seen.  The cardiac and mediastinal silhouettes are",
    "unremarkable.",
    "",
    "IMPRESSION: ",
    "",
    "No acute cardiopulmonary process.",
)
FULL_FINDINGS = (
    "The lungs are clear without focal consolidation. No pleural effusion or pneumothorax is "
    "seen. The cardiac and mediastinal silhouettes are unremarkable."
)

NO_FINDINGS = report(
    TITLE,
    "EXAMINATION:  CHEST (PORTABLE AP)",
    "",
    "INDICATION:  ___ year old woman with hypoxia  // ? edema",
    "",
    "IMPRESSION: ",
    "",
    "In comparison with the study of ___, there is increased opacification at the",
    "left base, consistent with atelectasis and effusion.",
)

ADDENDUM_ON_TOP = report(
    "                               FINAL ADDENDUM",
    "ADDENDUM:",
    "",
    "Findings were telephoned to Dr. ___ at 10:15 on ___.",
    "",
    "_" * 78,
    TITLE,
    "EXAMINATION:  CHEST (PA AND LAT)",
    "",
    "FINDINGS: ",
    "",
    "Small left apical pneumothorax.  Lungs otherwise clear.",
    "",
    "IMPRESSION: ",
    "",
    "Small left apical pneumothorax.",
)

VARIANTS = report(
    TITLE,
    "PA AND LATERAL CHEST RADIOGRAPH",
    "",
    "REASON FOR EXAM:  Shortness of breath.",
    "",
    "CLINICAL HISTORY:  Heart failure.",
    "",
    "COMPARISONS:  ___ and ___.",
    "",
    "FINDINGS:  Moderate cardiomegaly is stable.  Mild interstitial edema has",
    "improved since ___  .",
    "",
    "CONCLUSION:  Improving interstitial edema.",
    "",
    "RECOMMENDATION(S):  Follow-up in ___ weeks.",
)


# --- sections -----------------------------------------------------------------------------


def test_findings_and_impression() -> None:
    parsed = parse_report(FULL)
    assert parsed.findings == FULL_FINDINGS
    assert parsed.impression == "No acute cardiopulmonary process."
    assert parsed.addendum is None
    assert [name for name, _ in parsed.sections] == [
        "examination",
        "indication",
        "technique",
        "comparison",
        "findings",
        "impression",
    ]
    assert dict(parsed.sections)["indication"] == "___M with chest pain."
    assert dict(parsed.sections)["comparison"] == "___"
    assert parsed.findings_impression == f"{FULL_FINDINGS}\n\nNo acute cardiopulmonary process."


def test_a_report_without_findings() -> None:
    parsed = parse_report(NO_FINDINGS)
    assert parsed.findings is None
    assert parsed.impression == (
        "In comparison with the study of ___, there is increased opacification at the left "
        "base, consistent with atelectasis and effusion."
    )
    assert parsed.findings_impression == parsed.impression


def test_a_report_with_neither_section() -> None:
    text = report(TITLE, "EXAMINATION:  CHEST", "", "INDICATION:  Line placement.")
    parsed = parse_report(text)
    assert (parsed.findings, parsed.impression, parsed.findings_impression) == (None, None, None)
    assert parse_report("").sections == ()


def test_an_addendum_on_top_stays_out_of_the_sections() -> None:
    parsed = parse_report(ADDENDUM_ON_TOP)
    assert parsed.findings == "Small left apical pneumothorax. Lungs otherwise clear."
    assert parsed.impression == "Small left apical pneumothorax."
    assert parsed.addendum == "Findings were telephoned to Dr. ___ at 10:15 on ___."
    assert len(split_blocks(ADDENDUM_ON_TOP)) == 2


def test_an_addendum_section_ends_the_impression() -> None:
    text = FULL + report("", "ADDENDUM:  Comparison with ___ shows no change.")
    parsed = parse_report(text)
    assert parsed.impression == "No acute cardiopulmonary process."
    assert parsed.addendum == "Comparison with ___ shows no change."


def test_sections_missing_from_the_report_are_taken_from_an_addendum() -> None:
    text = report(
        "                               FINAL ADDENDUM",
        "ADDENDUM:  Corrected impression below.",
        "",
        "IMPRESSION:  Right upper lobe pneumonia.",
        "",
        "_" * 78,
        TITLE,
        "FINDINGS:  Right upper lobe opacity.",
    )
    parsed = parse_report(text)
    assert parsed.findings == "Right upper lobe opacity."
    assert parsed.impression == "Right upper lobe pneumonia."


def test_header_variants() -> None:
    parsed = parse_report(VARIANTS)
    sections = dict(parsed.sections)
    assert sections["indication"] == "Shortness of breath."
    assert sections["history"] == "Heart failure."
    assert sections["comparison"] == "___ and ___."
    assert sections["recommendations"] == "Follow-up in ___ weeks."
    assert parsed.findings == "Moderate cardiomegaly is stable. Mild interstitial edema has " + (
        "improved since ___."
    )
    assert parsed.impression == "Improving interstitial edema."  # CONCLUSION


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("FINDINGS", "findings"),
        ("IMPRESSION", "impression"),
        ("CONCLUSION", "impression"),
        ("FINDINGS AND IMPRESSION", "impression"),
        ("HISTORY", "history"),
        ("CLINICAL HISTORY", "history"),
        ("REASON FOR EXAMINATION", "indication"),
        ("REASON FOR EXAM", "indication"),
        ("COMPARISONS", "comparison"),
        ("RECOMMENDATION(S)", "recommendations"),
        ("NOTIFICATION", "notification"),
        ("ADDENDUM", "addendum"),
        ("PORTABLE  CHEST", "portable chest"),  # not listed: its own name
    ],
)
def test_section_names(header: str, name: str) -> None:
    assert section_name(header) == name


def test_an_unlisted_header_still_ends_the_section() -> None:
    text = FULL.replace(" IMPRESSION: ", " WET READ:  ___ 3:12 PM\n \n IMPRESSION: ")
    text += report("", "PORTABLE CHEST:  see above.")
    parsed = parse_report(text)
    assert parsed.findings == FULL_FINDINGS
    assert parsed.impression == "No acute cardiopulmonary process."
    assert dict(parsed.sections)["portable chest"] == "see above."


def test_only_upper_case_headers_at_a_line_start_count() -> None:
    text = report(
        "FINDINGS:  Heart size is normal.",
        "Impression: lower case is prose, and so is IMPRESSION: within a line.",
    )
    parsed = parse_report(text)
    assert parsed.impression is None
    assert parsed.findings == (
        "Heart size is normal. Impression: lower case is prose, and so is IMPRESSION: within a "
        "line."
    )


# --- clean text ---------------------------------------------------------------------------


def test_hard_wraps_become_paragraphs() -> None:
    raw = " First line of a\n wrapped   sentence.\n \n Second\n paragraph.\n\n\n"
    assert clean_text(raw) == "First line of a wrapped sentence.\n\nSecond paragraph."
    assert clean_text(" \n  \n") is None


def test_numbered_items_keep_their_lines() -> None:
    raw = " 1.  Small effusion.\n 2.  Catheter in the SVC.  No\n pneumothorax.\n"
    assert clean_text(raw) == "1. Small effusion.\n2. Catheter in the SVC. No pneumothorax."


def test_deidentification_marks() -> None:
    assert clean_text(" Dr. ___   was paged at ___ , on  ______ .") == (
        "Dr. ___ was paged at ___, on ___."
    )
    assert clean_text(" ___-year-old ___F (___)") == "___-year-old ___F (___)"
    # In the full text the marks stay as released.
    assert "since ___  ." in make_report("1", VARIANTS).text


def test_a_line_of_underscores_separates_but_a_mark_does_not() -> None:
    text = report("FINDINGS:  Normal.", "___", "IMPRESSION:  ___")
    assert len(split_blocks(text)) == 1
    parsed = parse_report(text)
    assert (parsed.findings, parsed.impression) == ("Normal. ___", "___")


def test_windows_line_ends() -> None:
    parsed = parse_report(FULL.replace("\n", "\r\n"))
    assert parsed.findings == FULL_FINDINGS


def test_join_findings_impression() -> None:
    assert join_findings_impression("F.", "I.") == "F.\n\nI."
    assert join_findings_impression("F.", None) == "F."
    assert join_findings_impression(None, "I.") == "I."
    assert join_findings_impression(None, None) is None


# --- MaCheX v1 text -----------------------------------------------------------------------


def machex_v1(r: str) -> str:
    """The original code (saiboxx/machex ``MIMICParser._get_meta_data``), verbatim."""
    if "FINDINGS:" in r:  # noqa: SIM108 - as written there
        r = r.split("FINDINGS:")[-1]
    else:
        r = r.split("IMPRESSION:")[-1]
    r = r.replace("IMPRESSION:", "")
    r = r.replace("\n", "")
    r = re.sub(" +", " ", r)
    return r.strip()


@pytest.mark.parametrize("text", [FULL, NO_FINDINGS, ADDENDUM_ON_TOP, VARIANTS])
def test_text_v1_is_the_original_rule(text: str) -> None:
    assert mimic_text_v1(text) == machex_v1(text)


def test_text_v1_examples() -> None:
    assert mimic_text_v1(FULL) == f"{FULL_FINDINGS} No acute cardiopulmonary process."
    assert mimic_text_v1(NO_FINDINGS) == (
        "In comparison with the study of ___, there is increased opacification at the left "
        "base, consistent with atelectasis and effusion."
    )
    # After the last FINDINGS:, even inside a line; newlines dropped, not made spaces.
    assert mimic_text_v1("FINDINGS: a\nPRIOR FINDINGS: b\nc  IMPRESSION: d") == "bc d"
    # Neither: the whole report.
    assert mimic_text_v1(" EXAMINATION:  CHEST\n INDICATION:  ___ \n") == (
        "EXAMINATION: CHEST INDICATION: ___"
    )
    # Only spaces are collapsed (tabs stay), then stripped; \r\n is read as \n.
    assert mimic_text_v1("IMPRESSION:\r\n a\t\tb \r\n") == "a\t\tb"


@pytest.mark.parametrize("text", [None, "", "   \n ", "FINDINGS:   \n"])
def test_text_v1_of_nothing_is_none(text: str | None) -> None:
    assert mimic_text_v1(text) is None


def test_mimic_report_stores_equal_texts_once() -> None:
    only_impression = mimic_report("50000001", NO_FINDINGS)
    assert only_impression.language == "en" and only_impression.study_id == "50000001"
    assert only_impression.text == NO_FINDINGS
    assert only_impression.findings_impression is only_impression.impression
    assert only_impression.text_v1 is only_impression.impression  # equal: the same object
    full = mimic_report("50000002", FULL)
    assert full.findings_impression == f"{full.findings}\n\n{full.impression}"
    assert full.text_v1 == machex_v1(FULL)


# --- real English prose (Open-i) in the MIMIC-CXR format ------------------------------------


def _openi_sections(tgz: Path) -> list[tuple[str, str]]:
    """(findings, impression) of every Open-i report that has both, its ``XXXX``
    de-identification written as MIMIC's ``___``; reports whose prose itself holds an
    upper-case ``WORD:`` (which reads as a header at a line start) are left out."""
    pairs = []
    with tarfile.open(tgz) as archive:
        for member in archive:
            if not member.name.endswith(".xml"):
                continue
            root = ET.fromstring(archive.extractfile(member).read())
            texts = {e.get("Label"): (e.text or "").strip() for e in root.iter("AbstractText")}
            findings, impression = texts.get("FINDINGS"), texts.get("IMPRESSION")
            if findings and impression and not re.search(r"[A-Z]{2,}:", findings + impression):
                pairs.append((findings.replace("XXXX", "___"), impression.replace("XXXX", "___")))
    return pairs


def _wrap(text: str) -> list[str]:
    """Hard-wrapped at 79 characters with the leading space, as MIMIC-CXR reports are."""
    return textwrap.wrap(text, 78, break_on_hyphens=False, break_long_words=False)


def _squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def openi(real_metadata: Path) -> list[tuple[str, str]]:
    pairs = _openi_sections(real_metadata / "NLMCXR_reports.tgz")
    assert len(pairs) > 3000
    return pairs


def test_real_prose_round_trips_through_the_format(openi: list[tuple[str, str]]) -> None:
    for n, (findings, impression) in enumerate(openi):
        addendum = ["                               FINAL ADDENDUM", "ADDENDUM:", ""]
        addendum += [*_wrap(f"Reviewed with Dr. ___ on ___: {impression}"), "", "_" * 78]
        text = report(
            *(addendum if n % 3 == 0 else ()),
            TITLE,
            "EXAMINATION:  CHEST (PA AND LAT)",
            "",
            "FINDINGS: ",
            "",
            *_wrap(findings),
            "",
            "CONCLUSION: " if n % 5 == 0 else "IMPRESSION: ",
            "",
            *_wrap(impression),
        )
        assert all(len(line) <= 80 for line in text.splitlines())
        parsed = make_report(str(n), text, text_v1=mimic_text_v1(text))
        assert parsed.findings is not None and parsed.impression is not None, text
        assert _squash(parsed.findings) == _squash(findings)
        assert _squash(parsed.impression) == _squash(impression)
        # Wrapped lines are joined: a line break survives only before a numbered item.
        for section in (parsed.findings, parsed.impression):
            for line in section.split("\n")[1:]:
                assert re.match(r"\d{1,2}[.)] ", line), section
        assert parsed.findings_impression == f"{parsed.findings}\n\n{parsed.impression}"
        assert parsed.text_v1 == machex_v1(text)
        if n % 5:  # IMPRESSION: deleted, the two sections run together
            assert _squash(parsed.text_v1) == _squash(f"{findings} {impression}")
