"""The declarative tables under manifests/ parse, validate and say what the code assumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from machex.adapters import ADAPTERS
from machex.records import FINDINGS
from machex.tables import TableError, load_composition, load_source_tables, tables_root


@pytest.mark.parametrize("source", sorted(ADAPTERS))
def test_every_adapter_has_valid_tables(source: str) -> None:
    tables = load_source_tables(source)
    assert tables.views, "a source needs a view rule"
    assert any(keep for keep, _ in tables.views.values())
    for findings in tables.label_map.values():
        assert set(findings) <= set(FINDINGS)
    assert set(tables.label_values.values()) <= {1, 0, -1, None}
    assert set(tables.absent.values()) <= {0, None}


def test_unknown_view_values_are_skipped_not_kept() -> None:
    tables = load_source_tables("chexpert")
    assert tables.view_decision("Frontal") == (True, "frontal")
    assert tables.view_decision("Lateral") == (False, "lateral")
    assert tables.view_decision("Oblique") == (False, "unknown_view")


def test_paper_composition_lists_the_six_sources() -> None:
    pairs = load_composition("paper-2023")
    assert ("chestxray14", "train") in pairs and ("chestxray14", "test") not in pairs
    assert ("chexpert", "train") in pairs and ("chexpert", "val") not in pairs
    assert {s for s, _ in pairs} == {
        "chestxray14",
        "chexpert",
        "mimic",
        "padchest",
        "brax",
        "vindr",
    }


def test_unknown_composition_names_the_known_ones() -> None:
    with pytest.raises(TableError, match="paper-2023"):
        load_composition("no-such-collection")


def _copy_tables(tmp_path: Path, source: str) -> Path:
    root = tmp_path / "tables"
    (root / source).mkdir(parents=True)
    for file in (tables_root() / source).glob("*.csv"):
        (root / source / file.name).write_text(file.read_text())
    return root


def test_a_bad_label_value_names_file_and_row(tmp_path: Path) -> None:
    root = _copy_tables(tmp_path, "chexpert")
    values = root / "chexpert" / "label_values.csv"
    values.write_text(values.read_text() + "2.0,2,not a tri-state value\n")
    with pytest.raises(TableError, match=r"label_values\.csv row \d+: value '2'"):
        load_source_tables("chexpert", root)


def test_an_unknown_finding_is_rejected(tmp_path: Path) -> None:
    root = _copy_tables(tmp_path, "chestxray14")
    labels = root / "chestxray14" / "labels.csv"
    labels.write_text(labels.read_text() + "Hernia,Hiatus Hernia,not a CheXpert finding\n")
    with pytest.raises(TableError, match="unknown finding 'Hiatus Hernia'"):
        load_source_tables("chestxray14", root)


def test_an_uninformative_name_must_feed_no_finding(tmp_path: Path) -> None:
    tables = load_source_tables("padchest")
    assert tables.uninformative == {"exclude", "unchanged", "suboptimal study"}
    assert tables.says_nothing(()) and tables.says_nothing(("exclude", "unchanged"))
    assert not tables.says_nothing(("unchanged", "cardiomegaly"))
    root = _copy_tables(tmp_path, "padchest")
    table = root / "padchest" / "uninformative.csv"
    for name, why in (("cardiomegaly", "feeds a finding"), ("not a tag", "not in labels.csv")):
        table.write_text(f"native_label,note\n{name},{why}\n")
        with pytest.raises(TableError, match=r"uninformative\.csv row 2: .* blank finding"):
            load_source_tables("padchest", root)


def test_view_values_the_table_does_not_list_are_named_in_the_plan(tmp_path) -> None:
    """A value missing from views.csv (a typo in the table, a new value in a release) was
    counted as unknown_view and its images dropped without a word."""
    from collections import Counter

    import pandas as pd

    from machex.adapters.base import finish_plan, keep_views
    from machex.tables import load_source_tables

    tables = load_source_tables("chexpert")
    listed = next(v for v, (keep, _) in tables.views.items() if keep)
    frame = pd.DataFrame({"view": [listed, "pa", "pa", "Frontal/Oblique"]})
    skipped: Counter[str] = Counter()
    assert len(keep_views(frame, "view", tables, skipped)) == 1  # images, not distinct values
    assert skipped["unknown_view"] == 3
    plan = finish_plan("chexpert", tmp_path, [], Counter(), tables)
    (warning,) = plan.warnings
    assert "3 images have a view value that manifests/chexpert/views.csv does not list" in warning
    assert "'pa' (2), 'Frontal/Oblique' (1)" in warning
    clean = load_source_tables("chexpert")
    assert finish_plan("chexpert", tmp_path, [], Counter(), clean).warnings == []
