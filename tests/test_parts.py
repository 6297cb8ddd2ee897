"""``--part I/N`` parsing: each malformed spec gets the message that fits it."""

from __future__ import annotations

import pytest

from machex.parts import Part, PartError


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0/0", "--part 0/0: N must be at least 1 (--part 0/1 is the whole)"),
        ("2/0", "--part 2/0: N must be at least 1"),
        ("3/3", "--part 3/3: I must be in 0..2 (parts are numbered from 0"),
        ("1/1", "--part 1/1: I must be in 0..0 (parts"),
        ("a/b", "--part a/b: expected I/N"),
    ],
)
def test_bad_part_names_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(PartError) as caught:
        Part.parse(spec)
    assert str(caught.value).startswith(message)


def test_good_part() -> None:
    assert Part.parse("0/1").label == "0/1" and Part.parse("3/4").select(list(range(9))) == [3, 7]
